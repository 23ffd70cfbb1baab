"""Hugging Face checkpoint directories: config.json, safetensors weights and the tokenizer, read and written.

Who calls it: train.py and sft.py (`load_pretrained`, `save_pretrained`), checkpoint.py (the model inside a
checkpoint), gguf_import.py (writes the directory it imports into), bench.py, tests.
Why a module of its own: it is a file format, not the model. model.py builds the network from a ModelConfig; this
file turns a directory into one (and back). Module names equal the checkpoint keys, RoPE uses HF's rotate_half layout,
so loading is "build on the meta device, assign the tensors", with no renaming and no permutation.

Choices (vs transformers):
 1. config.json of transformers 4.x (rope_theta, rope_scaling) and 5.x (rope_parameters) are both read; 5.x is written.
    Sliding-window attention that would change results (window < max_position_embeddings) is refused.
 2. Every file is written to `<name>.tmp`, fsync-ed and renamed: a crash never leaves a half-written file.
 3. LoRA adapters are merged into the weights on save, so the directory loads in plain transformers.
 4. Weights load through safetensors only, never pickle.
"""
import json
import os
from dataclasses import asdict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from model import LoRALinear, ModelConfig, Transformer

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


# ------------------------------------------------------------------------------------------------------ config.json
def config_from_hf(d: dict) -> ModelConfig:
    """Read a config.json dict written by transformers 4.x (rope_theta/rope_scaling) or 5.x (rope_parameters)."""
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r} (supported: {', '.join(MODEL_TYPES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
    max_pos = d.get("max_position_embeddings", 2048)
    window = d.get("sliding_window")
    sliding_layers = ("sliding_attention" in (d.get("layer_types") or [])
                      or d["num_hidden_layers"] > d.get("max_window_layers", 28))   # qwen: layers >= max_window
    sliding = mt == "mistral" or (d.get("use_sliding_window") and sliding_layers)
    if sliding and window is not None and window < max_pos:
        raise ValueError(f"unsupported sliding_window {window} < max_position_embeddings {max_pos} ({mt})")
    rope = d.get("rope_parameters") or {}
    if rope and not any(k in rope for k in ("rope_type", "type", "rope_theta")):
        raise ValueError(f"unsupported per-layer rope_parameters {sorted(rope)}")
    scaling = dict(rope or d.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", d.get("rope_theta", 10000.0))
    scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {scaling['partial_rotary_factor']}")
    scaling.pop("partial_rotary_factor", None)
    if scaling["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {scaling['rope_type']!r} (supported: {', '.join(ROPE_TYPES)})")
    cfg = ModelConfig(
        model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"], num_key_value_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"), max_position_embeddings=max_pos, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=None if scaling["rope_type"] == "default" else scaling,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=mt != "mistral" and d.get("attention_bias", False),
        mlp_bias=mt == "llama" and d.get("mlp_bias", False),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {cfg.num_key_value_heads}")
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json for transformers 5 (rope_parameters); qwen/mistral windows written as off."""
    d = {k: v for k, v in asdict(cfg).items() if k not in ("rope_theta", "rope_scaling")}
    d.update(architectures=[MODEL_TYPES[cfg.model_type]], hidden_act="silu",
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})})
    if cfg.model_type == "qwen2":
        del d["attention_bias"], d["mlp_bias"]
    if cfg.model_type in ("qwen2", "qwen3"):
        d.update(use_sliding_window=False, sliding_window=None)
    if cfg.model_type == "mistral":
        d.update(sliding_window=None)
    return d


# ------------------------------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """Thin wrapper over tokenizers.Tokenizer. encode adds no special tokens; decode keeps them."""
    def __init__(self, hf: HFTokenizer, bos_id=None, eos_id=None, pad_id=None, eos_ids=None):
        eos_ids = [i for i in [eos_id, *(eos_ids or [])] if i is not None]
        if not eos_ids:
            raise ValueError("tokenizer has no eos token (set eos_token_id in config.json or generation_config.json)")
        self.hf, self.bos_id, self.eos_id = hf, bos_id, eos_ids[0]
        self.eos_ids = list(dict.fromkeys(eos_ids))  # all stop ids, primary first
        self.pad_id = self.eos_id if pad_id is None else pad_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_to_id(self, s: str):
        return self.hf.token_to_id(s)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str, config: dict | None = None) -> "Tokenizer":
        """tokenizer.json + ids from tokenizer_config.json (token strings), generation_config.json, config.json."""
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} not found")
        hf = HFTokenizer.from_file(file)
        tc, gc, cc = _read_json(path, "tokenizer_config.json"), _read_json(path, "generation_config.json"), config or {}

        def from_token(key):                         # "<s>" or {"content": "<s>", ...} -> id
            t = tc.get(key)
            return hf.token_to_id(t["content"] if isinstance(t, dict) else t) if t else None

        def ids(key):
            out = []
            for d in (gc, cc):
                v = d.get(key)
                out += v if isinstance(v, list) else [] if v is None else [v]
            return out

        first = lambda *xs: next((x for x in xs if x is not None), None)  # noqa: E731
        eos = [from_token("eos_token"), *ids("eos_token_id")]
        return cls(hf, bos_id=first(from_token("bos_token"), *ids("bos_token_id")), eos_ids=eos,
                   pad_id=first(from_token("pad_token"), *ids("pad_token_id")))

    def save(self, path: str):
        tok = lambda i: None if i is None else self.hf.id_to_token(i)  # noqa: E731
        _atomic(os.path.join(path, "tokenizer.json"), lambda f: self.hf.save(f))
        _write_json(os.path.join(path, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok(self.bos_id), "eos_token": tok(self.eos_id),
            "pad_token": tok(self.pad_id), "add_bos_token": False, "add_eos_token": False})


# ---------------------------------------------------------------------------------------------------------- files
def _read_json(path, name, required=False) -> dict:
    file = os.path.join(path, name)
    if not os.path.exists(file):
        if required:
            raise FileNotFoundError(f"{file} not found")
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def _atomic(file, write):                            # write(tmp) -> fsync -> rename (choice 2)
    tmp = file + ".tmp"
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _write_json(file, d):
    _atomic(file, lambda t: open(t, "w").write(json.dumps(d, indent=2) + "\n"))


def load_pretrained(path, device="cpu", dtype=torch.float32):
    """HF checkpoint directory -> (Transformer, Tokenizer). Built on the meta device and filled tensor by tensor,
    so at most one full copy of the weights (plus one tensor) exists at any time."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    raw = _read_json(path, "config.json", required=True)
    config = config_from_hf(raw)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(path, "model.safetensors.index.json")["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with torch.device("meta"):                       # NOTE: meta device -- do not touch weights before loading
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} not found (listed in the index)")
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    if key not in expected:
                        raise ValueError(f"{file}: unexpected tensor {key}")
                    t = f.get_tensor(key)
                    if t.shape != expected[key]:
                        raise ValueError(f"{file}: {key} has shape {tuple(t.shape)}, expected {tuple(expected[key])}")
                    state[key] = t.to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: missing weights {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()                              # assign replaced embed_tokens.weight: re-point lm_head at it
    tokenizer = Tokenizer.from_dir(path, raw)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    return model.eval(), tokenizer


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _merged_state(model, state=None) -> dict:
    """The model's weights (or `state`, the same keys gathered elsewhere, e.g. from FSDP shards) with every LoRA delta
    folded in, without changing the model. Tied lm_head dropped."""
    full = model.state_dict() if state is None else state
    state = {k: v for k, v in full.items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):                      # W + ΔW, ΔW = (α/r) B A
            weight, lora_A, lora_B = (full[f"{name}.{k}"] for k in ("weight", "lora_A", "lora_B"))
            state[name + ".weight"] = weight + (lora_B @ lora_A) * m.scale
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_pretrained(model, tokenizer, path, state=None):
    """Write an HF checkpoint directory, LoRA merged into the weights (choice 3). `state`: the model's full state dict
    when the model's own parameters are shards (FSDP)."""
    os.makedirs(path, exist_ok=True)
    tensors = _merged_state(model, state)
    _atomic(os.path.join(path, "model.safetensors"), lambda t: save_file(tensors, t, {"format": "pt"}))
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _write_json(os.path.join(path, "config.json"), {**config_to_hf(model.config), "dtype": dtype})
    eos = tokenizer.eos_ids if len(tokenizer.eos_ids) > 1 else tokenizer.eos_id
    _write_json(os.path.join(path, "generation_config.json"),
                {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id})
    tokenizer.save(path)
