"""train.py end to end: the smoke preset, exact resume after SIGKILL, and one-line errors for bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from hf import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache):
    out = str(tmp_path_factory.mktemp("smoke"))
    result = train("--preset", "smoke", "--out", out, "--cache-dir", cache)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


@pytest.mark.slow
def test_the_smoke_preset_writes_metrics_a_loadable_checkpoint_and_the_final_table(smoke_run):
    out, result = smoke_run
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iter"] for r in lines] == [0, 1]
    assert all(k in lines[0] for k in ("return", "approx_kl", "clipfrac", "entropy", "v_loss", "explained_variance",
                                       "tokens_per_s", "val_pass"))
    model, tokenizer = load_pretrained(os.path.join(out, "final"))
    assert model.config.vocab_size >= tokenizer.vocab_size
    assert os.path.isdir(os.path.join(out, "ckpt-000001", "model"))
    assert "| SFT |" in result.stdout and "| StepTool |" in result.stdout
    table = open(os.path.join(out, "results.md")).read()
    assert table.count("\n") == 12 and "| gained / lost by StepTool |" in table and "| McNemar p (exact) |" in table
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["preset"] == "smoke" and config["advantages"]["gamma"] == 0.99
    # The critic (weight + bias of the value head) learns at --value-lr, the policy at --lr.
    groups = json.load(open(os.path.join(out, "ckpt-000001", "state.json")))["optimizer"]["param_groups"]
    assert [(g["lr"], len(g["params"])) for g in groups][1] == (config["value_lr"], 2)
    assert groups[0]["lr"] == config["lr"] != config["value_lr"]
    # Every result says what produced it: the code, and the warm start it stands on (trained by this run's code).
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["provenance"]["torch"] == torch.__version__ and "commit" in results["provenance"]
    assert results["warm_start"]["commit"] == results["provenance"]["commit"] and results["warm_start"]["key"]
    # ... and every test answer and call, so a later judge can re-judge them without re-running the model.
    transcript = next(iter(results["test_transcripts"].values()))
    assert {"actions", "calls", "answer", "stop"} <= set(transcript)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_bitwise_the_same_weights_and_metrics(tmp_path, cache, smoke_run):
    flags = ["--preset", "smoke", "--iters", "4", "--cache-dir", cache, "--eval-every", "2"]
    straight = str(tmp_path / "straight")
    assert train(*flags, "--out", straight).returncode == 0
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "train.py", *flags, "--out", killed], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(killed, "ckpt-000001")) and time.time() < deadline:
        time.sleep(0.05)                       # kill somewhere after the second checkpoint started to exist
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "results.json")), "the run finished before it was killed"
    resumed = train(*flags, "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = load_file(os.path.join(straight, "ckpt-000003", "trainable.safetensors"))
    b = load_file(os.path.join(killed, "ckpt-000003", "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.load(open(os.path.join(d, "results.json"))) for d in (straight, killed))
    timing = {"tokens_per_s", "rss_mb"}                 # measurements of the machine, not of the run
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_s") and k not in timing} for r in h]  # noqa
    assert strip(ra["history"]) == strip(rb["history"])
    assert ra["test"] == rb["test"]
    assert ra["sft_test"] == rb["sft_test"]             # the baseline row is the SFT model's, not the resumed one's


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be > 0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--episodes-per-iter", "0"], "--episodes-per-iter must be > 0"),
    (["--reward", "best"], "--reward must be one of"),
    (["--contribution", "gpt4"], "--contribution must be one of ['lcs', 'reference', 'used']"),
    (["--succ-calling", "both"], "--succ-calling must be one of ['bonus', 'penalty']"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
    (["--preset", "huge"], "unknown --preset 'huge'"),
    (["--advantage", "step-group"], "--advantage step-group compares rollouts of one task: it needs --group-size >= 2"),
    (["--iters", "0", "--no-sft-test-eval"], "--no-sft-test-eval with --iters 0 would evaluate nothing"),
])
@pytest.mark.slow
def test_bad_flags_fail_with_one_clear_line_and_a_nonzero_exit(flags, message):
    result = train(*flags, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_corrupt_model_directory_is_refused_with_one_line(tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    result = train("--model", str(bad), "--eval-only", "--out", str(tmp_path / "out"), timeout=60)
    assert result.returncode == 2
    assert "unsupported model_type 'gpt2'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_offline_data_in_the_authors_format_trains_for_one_iteration(tmp_path, cache, smoke_run):
    out = str(tmp_path / "offline")
    result = train("--preset", "smoke", "--iters", "1", "--out", out, "--cache-dir", cache,
                   "--offline-data", os.path.join("tests", "data", "offline_sample.tsv"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rows loaded, 3 skipped" in result.stdout
    [record] = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert record["optimizer_steps"] > 0 and record["skipped_steps"] == 0


@pytest.mark.slow
def test_a_toolbench_query_file_evaluates_end_to_end(tmp_path, smoke_run):
    out, _ = smoke_run
    result = train("--preset", "tiny", "--eval-only", "--model", os.path.join(out, "final"),
                   "--out", str(tmp_path / "tb"),
                   "--tasks", "toolbench:" + os.path.join("tests", "data", "toolbench_G2_sample.json"),
                   "--max-steps", "2", "--max-action-tokens", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on the 0 tasks that can be judged (2 cannot)" in result.stdout
    assert "| model |" in result.stdout


@pytest.mark.slow
def test_a_200_iteration_soak_run_does_not_grow_resident_memory(tmp_path, cache, smoke_run):
    out = str(tmp_path / "soak")
    result = train("--preset", "smoke", "--iters", "200", "--eval-every", "1000", "--keep-checkpoints", "1",
                   "--out", out, "--cache-dir", cache, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rss = [json.loads(line)["rss_mb"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rss) == 200
    assert max(rss[20:]) <= 1.10 * rss[20]          # no growth beyond 10% after warm-up


def test_sft_demonstrations_can_be_recorded_under_faults_and_then_show_retries():
    from sft import demonstration_env, sft_hash
    from tools import expert_episode, make_suite
    from train import parse_config
    clean, faulty = parse_config(["--preset", "smoke"]), parse_config(["--preset", "smoke", "--sft-fault-rate", "0.5"])
    suite = make_suite("tiny")
    assert sft_hash(clean, suite) != sft_hash(faulty, suite)             # a separate cached warm start
    tasks = suite.tasks("sft", 40, seed=0)
    env = demonstration_env(clean, suite)
    assert not any(r.fault for t in tasks for _, r in expert_episode(t, env) if r is not None)
    env, faults, retries = demonstration_env(faulty, suite), 0, 0
    for task in tasks:
        history = expert_episode(task, env)
        for (action, result), (next_action, _) in zip(history, history[1:]):
            if result is not None and result.fault:
                faults += 1
                retries += next_action == action
    assert faults > 10 and retries >= 0.6 * faults        # the expert retries up to twice, then gives up


@pytest.mark.slow
def test_step_group_trains_without_a_value_head_on_groups_of_rollouts_of_one_task(tmp_path, cache, monkeypatch):
    import train as T
    made = []
    monkeypatch.setattr(T, "ValueHead", lambda *a, **k: made.append(1))     # would record any critic created
    seen = []
    real_update = T.ppo_update

    def update(policy, optimizer, batch, cfg, adv_cfg, **kw):                   # look at what PPO is given
        seen.append((batch["episode_group"].tolist(), len(optimizer.param_groups), policy.value_head))
        return real_update(policy, optimizer, batch, cfg, adv_cfg, **kw)
    monkeypatch.setattr(T, "ppo_update", update)
    cfg = T.parse_config(["--preset", "smoke", "--out", str(tmp_path), "--cache-dir", cache, "--iters", "1",
                          "--advantage", "step-group", "--group-size", "4"])
    T.main(cfg)
    groups, n_param_groups, head = seen[0]
    assert made == [] and head is None and n_param_groups == 1                  # no critic, no critic optimizer
    assert sorted(groups.count(g) for g in set(groups)) == [4, 4]                # 8 episodes = 2 tasks x 4 rollouts
    ckpt = os.path.join(str(tmp_path), "ckpt-000000")
    assert load_file(os.path.join(ckpt, "value_head.safetensors")) == {}
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        logged = json.loads(f.readline())
    assert logged["v_loss"] == 0.0 and math.isnan(logged["explained_variance"])  # no critic: nothing to log for one


def test_a_group_size_that_does_not_divide_the_episodes_is_a_one_line_error():
    result = train("--preset", "smoke", "--advantage", "step-group", "--group-size", "3")
    assert result.returncode == 2 and "--group-size must be >= 1 and divide --episodes-per-iter" in result.stderr


@pytest.mark.slow
def test_resuming_with_other_settings_is_refused_in_one_line_but_more_iterations_are_fine(tmp_path, cache):
    out, flags = str(tmp_path / "run"), ["--preset", "smoke", "--iters", "1", "--cache-dir", cache]
    assert train(*flags, "--out", out).returncode == 0
    changed = train(*flags, "--out", out, "--resume", "--token-budget", "2048")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1].startswith("error: cannot resume from")
    assert "--token-budget 4096, not 2048" in changed.stderr
    longer = train("--preset", "smoke", "--iters", "2", "--cache-dir", cache, "--out", out, "--resume")
    assert longer.returncode == 0, longer.stderr[-2000:]
    with open(os.path.join(out, "results.json")) as f:
        trained = json.load(f)
    # A finished run resumed with another --n-test trains nothing more and is evaluated on that many test tasks
    # (experiment.py --n-test): the same history, a new test list.
    shorter = train("--preset", "smoke", "--iters", "2", "--cache-dir", cache, "--out", out, "--resume",
                    "--n-test", "6")
    assert shorter.returncode == 0, shorter.stderr[-2000:]
    with open(os.path.join(out, "results.json")) as f:
        reevaluated = json.load(f)
    assert len(trained["test_outcomes"]) == 18 and len(reevaluated["test_outcomes"]) == 6
    assert reevaluated["history"] == trained["history"]
    assert "resumed from" in longer.stdout


@pytest.mark.slow
def test_the_warm_start_is_evaluated_once_and_a_second_run_reads_the_same_sft_row(tmp_path, cache, monkeypatch,
                                                                                   capsys):
    import evaluation
    import train as T
    flags = ["--preset", "smoke", "--cache-dir", cache, "--iters", "1"]
    first = T.main(T.parse_config([*flags, "--out", str(tmp_path / "a")]))
    calls = []
    real = evaluation.evaluate_split
    counted = lambda *a, **k: calls.append(len(a[4])) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(T, "evaluate_split", counted)              # the RL run's validation and test
    monkeypatch.setattr(evaluation, "evaluate_split", counted)     # the SFT row (evaluation.evaluate_warm_start)
    second = T.main(T.parse_config([*flags, "--out", str(tmp_path / "b"), "--seed", "1"]))
    n_val, n_test = 12, 18                     # the smoke preset's splits
    assert calls == [n_val, n_test]            # only the trained model is evaluated: validation + test, no SFT row
    assert second["sft_test_outcomes"] == first["sft_test_outcomes"] and len(first["sft_test_outcomes"]) == n_test
    assert second["sft_test"] == first["sft_test"]
    assert second["sft_test_transcripts"] == first["sft_test_transcripts"]
    assert {len(t["actions"]) for t in first["test_transcripts"].values()} <= set(range(1, 5))    # max_steps 4
    faults = T.main(T.parse_config([*flags, "--out", str(tmp_path / "c"), "--fault-rate", "0.3"]))
    assert len(calls) == 2 + 4                 # other faults: the SFT row is evaluated again (val + test), then RL's
    assert faults["sft_test_outcomes"].keys() == first["sft_test_outcomes"].keys()
    capsys.readouterr()
    sft_only = T.main(T.parse_config([*flags[:-2], "--iters", "0", "--out", str(tmp_path / "d")]))
    table = capsys.readouterr().out.split("Test split")[-1]
    assert "| SFT |" in table and "StepTool" not in table   # no RL: the table has no row for a method
    assert len(calls) == 6                     # --iters 0: the cached SFT row is the test row; nothing runs again
    assert sft_only["test_outcomes"] == sft_only["sft_test_outcomes"] == first["sft_test_outcomes"]
    assert sft_only["test_transcripts"] == first["sft_test_transcripts"]
    # --no-sft-test-eval (experiment.py, when its record holds the SFT row): the trained model alone is tested
    skipped = T.main(T.parse_config([*flags, "--out", str(tmp_path / "e"), "--no-sft-test-eval",
                                     "--cache-dir", str(tmp_path / "empty-cache")]))
    table = capsys.readouterr().out.split("Test split")[-1]
    assert "| StepTool |" in table and "SFT" not in table
    assert skipped["sft_test"] is skipped["sft_test_outcomes"] is skipped["sft_test_transcripts"] is None
    assert len(skipped["test_outcomes"]) == n_test and skipped["sft_val"]["all"]["pass_rate"] >= 0
    assert calls[6:] == [n_val, n_val, n_test]  # a new cache: the SFT val row, RL's validation, test; no SFT test row



PEAK_CHECK = """
import torch, bench
bench.peak_rss_mb(reset=True)
block = torch.ones(2**26)                              # 256 MB, touched
del block
first = bench.peak_rss_mb(reset=True)                  # the peak held it; the reset starts from what is resident now
second = bench.peak_rss_mb()
print(first, second)
"""


def test_the_per_phase_peak_memory_sees_a_freed_block_and_forgets_it_after_a_reset():
    """bench.py's per-phase peak (VmHWM, reset through /proc/self/clear_refs), in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PEAK_CHECK], capture_output=True, text=True, cwd=ROOT, check=True)
    first, second = map(float, out.stdout.split())
    assert first - second > 200                         # of the 256 MB allocated and freed before the reset


def test_the_warm_start_cache_key_covers_the_code_that_trains_it(tmp_path, monkeypatch):
    """A warm start trained by other code is never reused: editing the code of any file of sft.WARM_START_CODE (here
    model.py, in a copy of the repository) gives another key; an unrelated file (experiment.py), a comment or a
    docstring does not."""
    import shutil
    import checkpoint
    from sft import WARM_START_CODE, sft_hash
    from tools import make_suite
    from train import parse_config
    cfg, suite = parse_config(["--preset", "smoke"]), make_suite("tiny")
    copy = tmp_path / "repo"
    for name in WARM_START_CODE + ["experiment.py", "tools/judge.py"]:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), copy / name)
    monkeypatch.setattr(checkpoint, "REPO", str(copy))
    before = sft_hash(cfg, suite)
    for other in ("experiment.py", "tools/judge.py"):      # not on the warm start's path (a judge fix re-evaluates it)
        with open(copy / other, "a") as f:
            f.write("\n# not on the warm start's path\n")
    assert sft_hash(cfg, suite) == before
    source = (copy / "model.py").read_text()
    docstring = source.split('"""')[1]
    (copy / "model.py").write_text(source.replace(docstring, docstring + " An edited explanation.", 1)
                                   + "\n# a comment\n")
    assert sft_hash(cfg, suite) == before
    with open(copy / "model.py", "a") as f:
        f.write("\nMODEL_PY_EDITED = 1\n")
    assert sft_hash(cfg, suite) != before


def test_provenance_names_the_commit_the_tree_state_torch_and_threads():
    import checkpoint
    p = checkpoint.provenance()
    assert p["torch"] == torch.__version__ and p["threads"] == torch.get_num_threads()
    done = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode == 0:                            # a git checkout (CI's clone is one)
        assert p["commit"] == done.stdout.strip() and isinstance(p["dirty"], bool)
    else:
        assert p["commit"] is None


def test_the_final_table_pairs_sft_and_the_trained_policy_task_by_task():
    """Six tasks, worked by hand: G1 a b c, G2 d e f. SFT solves a, d, e; the policy solves a, b, c, d (e Unsure).
    G1: gained b and c, lost none -> 2 / 0, McNemar p = 2 * (1/2)^2 = 0.5. G2: gained none, lost e -> 0 / 1, p = 1.
    All: 2 / 1, p = 2 * (1 + 3) / 8 = 1 (capped). Pass: SFT 1/3 and 2/3, policy 3/3 and 1/3."""
    from evaluation import paired_table
    groups = {"a": 1, "b": 1, "c": 1, "d": 2, "e": 2, "f": 2}
    sft = {"a": 1, "b": 0, "c": 0.5, "d": 1, "e": 1, "f": 0}
    policy = {"a": 1, "b": 1, "c": 1, "d": 1, "e": 0.5, "f": 0}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in paired_table("StepTool", sft, policy, groups).splitlines()[2:]}
    assert rows["SFT pass"] == ["0.333", "0.667", "0.500"] and rows["StepTool pass"] == ["1.000", "0.333", "0.667"]
    assert rows["gained / lost by StepTool"] == ["2 / 0", "0 / 1", "2 / 1"]
    assert rows["McNemar p (exact)"] == ["0.5", "1", "1"]
