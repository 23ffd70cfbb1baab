"""config.py: one field per concept, Config() is what `python train.py` runs, every field is a documented flag."""
import contextlib
import dataclasses
import io

import pytest
import torch

from config import PRESETS, Config, docstrings, flat_fields, parse_config, resolve_dtype


def flags_of(cfg):
    return ["--" + f.name.replace("_", "-") for _, f in flat_fields(cfg)]


def help_text(argv=()):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_config([*argv, "--help"])
    return out.getvalue()


def squash(text):  # argparse wraps and hyphenates help lines: compare without whitespace
    return "".join(text.split())


def test_no_flag_name_is_shared_by_two_fields():
    flags = flags_of(Config())
    assert len(flags) == len(set(flags)), sorted(f for f in flags if flags.count(f) > 1)


def test_the_concepts_that_were_once_two_fields_are_one():
    names = [f.name for _, f in flat_fields(Config())]
    assert names.count("temperature") == names.count("template") == names.count("seed") == 1
    owners = {f.name: type(owner).__name__ for owner, f in flat_fields(Config())}
    assert owners["temperature"] == owners["template"] == "RolloutConfig" and owners["seed"] == "Config"


def test_parse_config_with_no_flags_equals_config_field_by_field():
    parsed, default = parse_config([]), Config(dtype=resolve_dtype("auto", "cpu"))   # --dtype auto, resolved
    for (owner, f), (owner_default, _) in zip(flat_fields(parsed), flat_fields(default)):
        assert getattr(owner, f.name) == getattr(owner_default, f.name), f.name
    assert parsed == default


def test_the_default_run_is_smollm2_with_the_tuned_values_in_the_dataclass_defaults():
    cfg = Config()
    assert (cfg.model, cfg.suite, cfg.n_test, cfg.dtype) == ("smollm2", "large", 180, "auto")
    assert (cfg.ppo.ppo_epochs, cfg.rollout.temperature, cfg.advantages.kl_coef) == (2, 0.7, 0.05)
    tiny = parse_config(["--preset", "tiny"])           # the 2-layer model trained from scratch, as it always was
    assert (tiny.model, tiny.suite, tiny.iters, tiny.rollout.max_total_tokens, tiny.advantages.kl_coef) == \
        ("", "tiny", 16, 1024, 0.1)
    assert parse_config(["--preset", "smollm2"]) == dataclasses.replace(cfg, preset="smollm2", out="runs/smollm2",
                                                                        dtype=resolve_dtype("auto", "cpu"))


def test_dtype_auto_is_bf16_only_where_the_hardware_multiplies_it(monkeypatch):
    # An AVX2 CPU (this CI's kind) emulates bf16 matmuls ~30x slower than float32: auto must not pick it there.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False, "amx_bf16": False})
    assert parse_config([]).dtype == "float32"
    assert parse_config(["--dtype", "bfloat16"]).dtype == "bfloat16"      # asked for: as it is
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": True})
    assert parse_config([]).dtype == "bfloat16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_dtype("float16", "cuda") == "float16"
    assert parse_config(["--preset", "tiny"]).dtype == "float32"       # the tiny model is float32 everywhere


def test_every_field_has_a_docstring_and_help_lists_it_with_its_docstring():
    text = squash(help_text())
    for owner, f in flat_fields(Config()):
        doc = docstrings(type(owner)).get(f.name)
        assert doc, f"{type(owner).__name__}.{f.name} has no docstring"
        assert squash("--" + f.name.replace("_", "-")) in text
        assert squash(doc) in text, f.name


def test_presets_name_only_fields_and_help_shows_the_presets_values():
    assert sorted(PRESETS) == ["smoke", "smollm2", "tiny"]
    names = {f.name for _, f in flat_fields(Config())}
    for preset, values in PRESETS.items():
        assert set(values) <= names, set(values) - names
        cfg = parse_config(["--preset", preset])
        assert {f.name: getattr(owner, f.name) for owner, f in flat_fields(cfg) if f.name in values} == values
    text = squash(help_text(["--preset", "smollm2"]))
    assert squash("(default: 1536)") in text and squash("(default: smollm2)") in text


def test_flags_override_the_preset_and_booleans_have_a_no_form():
    cfg = parse_config(["--preset", "smoke", "--temperature", "0.3", "--no-whiten", "--seed", "5"])
    assert (cfg.rollout.temperature, cfg.advantages.whiten, cfg.seed, cfg.iters) == (0.3, False, 5, 2)


def test_every_flag_of_before_the_one_field_change_still_exists():
    # The flags README, experiment.py and the tests use; temperature, template and seed were each two fields once.
    assert {"--temperature", "--template", "--seed", "--ppo-epochs", "--kl-coef", "--preset", "--model", "--suite",
            "--gamma", "--lam", "--alpha", "--contribution", "--max-total-tokens", "--advantage"} \
        <= set(flags_of(Config()))
    assert dataclasses.fields(Config)[0].name == "preset"
