"""A hand-written Llama / Mistral / Qwen2 / Qwen3 decoder that reads and writes Hugging Face checkpoints.

Who calls it: rollout.py (KVCache, extend, decode), ppo.py/train.py (PolicyWithValue, LoRA, lora_disabled as the
reference policy), sft.py (from-scratch ModelConfig + Transformer), checkpoint.py (save_pretrained).
Module names equal the HF checkpoint keys (model.layers.N.self_attn.q_proj, lm_head, ...), RoPE uses HF's
rotate_half layout, so loading is "build on the meta device, assign the tensors" with no permutation.

Deviations and choices (vs transformers / the StepTool authors' code, which used HF + TRL):
 1. Only model_type llama | mistral | qwen2 | qwen3, hidden_act silu, rope default | linear | llama3. Sliding-window
    attention that would change results (window < max_position_embeddings) is refused, not implemented.
 2. Default position ids are per row `cumsum(attention_mask) - 1`, so left padding and holes change nothing;
    HF's forward uses 0..T-1 whatever the mask (HF's generate() does what we do).
 3. Every query may attend to itself, even a padding query: no all-masked softmax row, no NaN. Padding outputs
    are garbage by design and never read.
 4. KV cache: one shared write pointer for the whole batch; rows with shorter chunks leave masked holes
    (cheaper bookkeeping than per-row pointers, costs a few slots). RoPE positions are per row, so holes are free.
 5. decode() feeds every sampled token (stop token included) into the cache; the next extend() appends only new
    tokens. Finished rows keep stepping with a masked pad until the batched "all done" check (every 8 tokens).
 6. Sampling by inverse CDF (one uniform per row, searchsorted in the cumulative probabilities): no host sync, the
    law of multinomial, and 8x cheaper on a CPU than the exponential race (one Exp(1) draw per vocabulary entry: 70 ms
    of a 425 ms SmolLM2 decode step for 32 rows). Greedy (temperature 0) reports the model's own log-prob, not the
    log 1 = 0 of a point mass.
 7. ValueHead starts at zero (V = 0 everywhere), a common critic init; TRL uses a small random init.
 8. RoPE frequencies are recomputed in float32 per device (not a buffer), so .to(bfloat16) never rounds them.

Shape legend: B batch, T tokens, S cache slots, V vocabulary, H query heads, K kv heads, D head dim, C model dim,
L layers, F MLP dim, r LoRA rank.
"""
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    """The subset of HF config.json this model needs. Field names are HF's."""
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None     # None -> num_attention_heads (MHA); fewer -> GQA
    head_dim: int | None = None                # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None           # {"rope_type": "linear"|"llama3", "factor": ..., ...} or None
    tie_word_embeddings: bool = False
    attention_bias: bool = False               # bias on q/k/v (and o for llama/qwen3); qwen2 forces q/k/v only
    mlp_bias: bool = False                     # llama only
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r} (supported: {', '.join(MODEL_TYPES)})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.attention_bias = self.attention_bias or self.model_type == "qwen2"    # Qwen2 always has q/k/v bias
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
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
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"], num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"), max_position_embeddings=max_pos, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=None if scaling["rope_type"] == "default" else scaling,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=mt != "mistral" and d.get("attention_bias", False),
            mlp_bias=mt == "llama" and d.get("mlp_bias", False),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))

    def to_hf(self) -> dict:
        """config.json for transformers 5 (rope_parameters); qwen/mistral windows written as off."""
        d = {k: v for k, v in asdict(self).items() if k not in ("rope_theta", "rope_scaling")}
        d.update(architectures=[MODEL_TYPES[self.model_type]], hidden_act="silu",
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})})
        if self.model_type == "qwen2":
            del d["attention_bias"], d["mlp_bias"]
        if self.model_type in ("qwen2", "qwen3"):
            d.update(use_sliding_window=False, sliding_window=None)
        if self.model_type == "mistral":
            d.update(sliding_window=None)
        return d


# ------------------------------------------------------------------------------------------------------ layers
PACKED_MAX_ROWS = 256   # above this many rows oneDNN's packed bf16 matmul is no faster than F.linear (measured, CPU)


def linear(x, layer):
    """x W^T + b. Under no grad, for at most PACKED_MAX_ROWS rows (a decode step), and when packed_weights() has
    reordered the weight into oneDNN's blocked layout: the matmul on that copy, 1.5-2x faster for the few-row bf16
    matmuls of a decode step on a CPU (F.linear re-blocks the weight at every call)."""
    if (layer.packed is not None and not torch.is_grad_enabled() and x.dtype == layer.weight.dtype
            and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]):
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")
    return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) that can use a prepacked weight; see packed_weights."""
    packed = None

    def forward(self, x):
        return linear(x, self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # y = w · x / sqrt(mean(x²) + ε), computed in float32 like HF
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device) -> torch.Tensor:
    """θ_i = theta^(-2i/D), then the configured scaling.  (D/2,) float32"""
    D = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.int64).float() / D)
    sc = cfg.rope_scaling or {"rope_type": "default"}
    if sc["rope_type"] == "linear":                  # position p -> p / factor
        inv = inv / sc["factor"]
    elif sc["rope_type"] == "llama3":                # Llama 3.1: long wavelengths / factor, short kept, smooth between
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def rotate_half(x):                                  # (x1, x2) -> (-x2, x1) on the two halves of D
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):                         # x (B, H, T, D); cos/sin (B, 1, T, D)
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.H, self.K, self.D = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias, o_bias = cfg.attention_bias, cfg.attention_bias and cfg.model_type != "qwen2"
        self.q_proj = Linear(cfg.hidden_size, self.H * self.D, bias=qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.K * self.D, bias=qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.K * self.D, bias=qkv_bias)
        self.o_proj = Linear(self.H * self.D, cfg.hidden_size, bias=o_bias)
        if cfg.model_type == "qwen3":                # per-head RMSNorm on q and k, before RoPE
            self.q_norm, self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps), RMSNorm(self.D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, prefix=None):   # x (B, T, C); mask None (causal) or (B, 1, T, S)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D)
        k = self.k_proj(x).view(B, T, self.K, self.D)
        v = self.v_proj(x).view(B, T, self.K, self.D).transpose(1, 2)          # (B, K, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)                             # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)                             # (B, K, T, D)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)                                # (B, K, S, D) up to the new tokens
        if prefix is not None:                       # one shared prefix (1, K, P, D) before every row's own keys
            P = prefix.length
            y = attend_with_prefix(q, k, v, mask, prefix.k[self.layer][:, :, :P], prefix.v[self.layer][:, :, :P])
        else:
            # GQA: SDPA broadcasts each kv head over H/K query heads itself (enable_gqa), no repeat_kv copy
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.H != self.K)     # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


def attend_with_prefix(q, k, v, mask, pk, pv):
    """Every row's queries attend to [a prefix all rows share ; the row's own keys].
    q (B, H, T, D); k, v (B, K, S, D); mask (B, 1, T, S) bool over the own keys; pk, pv (1, K, P, D), every prefix
    slot a real token. -> (B, H, T, D)"""
    B, H, T, D = q.shape
    K, P, G = k.shape[1], pk.shape[2], H // k.shape[1]          # G query heads per kv head
    if torch.is_grad_enabled() or q.device.type != "cpu" or T > 32:
        # One SDPA over the prefix broadcast to every row, then the own keys (training; long chunks; any device)
        full = torch.cat((mask.new_ones(B, 1, T, P), mask), -1)                 # (B, 1, T, P + S)
        return F.scaled_dot_product_attention(q, torch.cat((pk.expand(B, -1, -1, -1), k), 2),
                                              torch.cat((pv.expand(B, -1, -1, -1), v), 2), attn_mask=full,
                                              enable_gqa=H != K)
    # Decode steps (no grad, <= 32 new tokens per row, CPU): the prefix's keys are read once for all rows, not once
    # per row (32 SmolLM2 rows after a 392-token prompt, one new token: 1.3 ms per layer with the prompt copied into
    # every row's cache -> 0.5-1.0 ms; at 64 new tokens the two paths are even). Two softmaxes, each with its
    # log-sum-exp l, joined exactly:
    # o = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2), l = log(e^l1 + e^l2).
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q_all = q.view(B, K, G, T, D).transpose(0, 1).reshape(1, K, B * G * T, D)    # every row's queries as one row
    o1, l1 = flash(q_all, pk, pv)                                              # (1, K, B·G·T, D), (1, K, B·G·T)
    o1 = o1.view(K, B, G, T, D).transpose(0, 1).reshape(B, H, T, D)
    l1 = l1.view(K, B, G, T).transpose(0, 1).reshape(B, H, T)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -math.inf)
    o2, l2 = flash(q, k, v, attn_mask=bias)                                    # (B, H, T, D), (B, H, T)
    lse = torch.logaddexp(l1, l2)
    return (o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, Fd, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = Linear(C, Fd, bias=b), Linear(C, Fd, bias=b)
        self.down_proj = Linear(Fd, C, bias=b)

    def forward(self, x):                            # SwiGLU: W_down (silu(W_gate x) ⊙ W_up x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, prefix=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()                     # a bare container so parameter names read "model.layers.0..."
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()
        self._inv_freq = {}                          # device -> (D/2,) float32; see deviation 8
        self.checkpoint_layers = False               # activation checkpointing, set from Config.checkpoint_layers

    @staticmethod
    def _init_weights(m):                            # from-scratch init, as HF: N(0, 0.02), zero bias, unit norms
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, cache=None, return_hidden=False, logits_to_keep=None,
                prefix=None):
        """input_ids (B, T) -> logits (B, T, V) [, final hidden (B, T, C)]. `cache`: continue each row's KV cache.
        `prefix`: a one-row KVCache holding a prompt prefix all rows share, computed once (with grad, if enabled)
        and broadcast: the rows are its continuations. `logits_to_keep`: index of the positions to project."""
        B, T = input_ids.shape
        dev, mask, position_ids = input_ids.device, None, None
        if cache is not None and cache.prefix is not None:
            prefix = cache.prefix                    # rows that continue a shared prefix, kept once (share_prefix)
        if prefix is not None and cache is None:     # every row continues the shared prefix of P tokens
            m = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            position_ids = prefix.length + (m.cumsum(1) - 1).clamp(min=0)
            mask = (torch.ones(T, T, dtype=torch.bool, device=dev).tril() & m[:, None, :]) | \
                torch.eye(T, dtype=torch.bool, device=dev)                       # (B, T, T), see deviation 3
            mask = mask[:, None]                     # (B, 1, T, T) over the own keys; the prefix is all visible
        elif cache is not None:
            m = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            # per-row positions continue where each row stopped
            position_ids = (cache.next_pos[:, None] + m.cumsum(1) - 1).clamp(min=0)
            mask = cache.reserve(m)                  # (B, 1, T, S)
        elif attention_mask is not None:
            m = attention_mask.bool()
            # Host sync (one per forward): right padding or none -> plain causal SDPA (the fast kernel), because a
            # causal query never sees the pads after it. Left padding / holes need the explicit mask.
            if not torch.equal(m, m.int().cummin(1).values.bool()):
                position_ids = (m.cumsum(1) - 1).clamp(min=0)
                causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
                mask = (causal & m[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)  # see deviation 3
                mask = mask[:, None]                 # (B, 1, T, T)
        if position_ids is None:                     # no mask, or right padding: 0..T-1
            position_ids = torch.arange(T, device=dev)[None]                    # (1, T)
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.config, dev)
        freqs = position_ids[..., None].float() * self._inv_freq[dev]           # (B, T, D/2): p · θ_i
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                        # (B, 1, T, D)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(input_ids)                                  # (B, T, C)
        # Activation checkpointing (training forwards only): keep each layer's input, recompute the rest in backward.
        recompute = self.checkpoint_layers and torch.is_grad_enabled() and cache is None
        for block in self.model.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, prefix, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, prefix)
        if cache is not None:
            cache.advance(T, m)
        x = self.model.norm(x)                                                  # hidden: what lm_head sees
        if logits_to_keep is None:
            logits = self.lm_head(x)                                            # (B, T, V)
        elif isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            logits = self.lm_head(x[logits_to_keep])                            # (N, V): only the selected positions
        else:
            # contiguous: a strided (B, 1, C) view sends F.linear to a batched matmul that copies the (V, C) weight
            # once per row (measured: 6 s instead of 12 ms for SmolLM2's head on 32 rows, bf16, CPU)
            logits = self.lm_head(x[:, logits_to_keep].contiguous())            # (B, T', V)
        return (logits, x) if return_hidden else logits


class ValueHead(nn.Module):
    """The critic: V(h_t) = w·h_t + b on the final hidden state. Zero init (deviation 7)."""
    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, hidden):                       # (B, T, C) -> (B, T) float32
        return self.proj(hidden).squeeze(-1).float()


class PolicyWithValue(nn.Module):
    """Actor and critic in one module and one forward, so DDP / one backward sees both."""
    def __init__(self, model: Transformer, value_head: ValueHead, detach_critic: bool = False):
        super().__init__()
        self.model, self.value_head, self.detach_critic = model, value_head, detach_critic
        self.prefix = None                           # a SharedPrefix the forwards continue, while one is entered

    def forward(self, input_ids, attention_mask=None, prefix_len=0, logits_at=None):
        """-> logits (B, T, V), or (N, V) at the positions logits_at (B, T) selects; values (B, T) float32.
        prefix_len: see forward_with_prefix."""
        logits, hidden = forward_with_prefix(self.model, input_ids, attention_mask, prefix_len, logits_at,
                                             self.prefix and self.prefix.cache)
        if self.value_head is None:                  # a critic-free advantage (ppo --advantage step-group)
            return logits, hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)
        # detach_critic: the value loss trains the head only, never the shared trunk (the policy's features).
        return logits, self.value_head(hidden.detach() if self.detach_critic else hidden)

    def share_prefix(self, prefix_ids):
        """-> a SharedPrefix of prefix_ids (1, P): inside `with`, every forward with prefix_len P continues it."""
        return SharedPrefix(self, prefix_ids)


class SharedPrefix:
    """A prompt prefix run once for a group of forwards (the micro-batches of one optimizer step) instead of once per
    forward. Exact with gradients: each forward reads detached copies of the prefix's keys and values (leaves) and
    its backward adds its part of their gradient there; on leaving `with` without an error, one backward carries the
    sum through the prefix's own graph into the adapters. One process only: under DDP the ranks would exchange
    gradients before that last backward."""
    def __init__(self, policy: PolicyWithValue, prefix_ids):
        model, self.policy = policy.model, policy

        def keys_and_values(ids):                   # the prefix's forward -> its L + L tensors (1, K, P, D)
            cache = prefix_cache(model, ids)
            return cache.k + cache.v
        if torch.is_grad_enabled() and model.checkpoint_layers:   # keep only its keys and values, recompute in backward
            self.graph = torch.utils.checkpoint.checkpoint(keys_and_values, prefix_ids, use_reentrant=False)
        else:
            self.graph = keys_and_values(prefix_ids)
        L = len(self.graph) // 2
        self.cache = KVCache(model.config, 1, 0, prefix_ids.device)              # a holder: the tensors are set here
        self.cache.k, self.cache.v, self.cache.length = self.graph[:L], self.graph[L:], prefix_ids.shape[1]
        if torch.is_grad_enabled():
            leaves = [t.detach().requires_grad_() for t in self.graph]
            self.cache.k, self.cache.v = leaves[:L], leaves[L:]

    def __enter__(self):
        self.policy.prefix = self
        return self

    def __exit__(self, error, *_):
        self.policy.prefix = None
        pairs = [(t, leaf.grad) for t, leaf in zip(self.graph, self.cache.k + self.cache.v) if leaf.grad is not None]
        if pairs and error is None:                  # Σ over the forwards of ∂loss/∂(prefix k, v), back through it
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def prefix_cache(model, prefix_ids):
    """The one-row KVCache of prefix_ids (1, P), filled by one forward (with grad, if enabled)."""
    cache = KVCache(model.config, 1, prefix_ids.shape[1], prefix_ids.device, model.model.embed_tokens.weight.dtype)
    model(prefix_ids, cache=cache, logits_to_keep=slice(0, 0))
    return cache


def forward_with_prefix(model, input_ids, attention_mask=None, prefix_len=0, logits_at=None, prefix=None):
    """The training forward -> (logits, final hidden (B, T, C)). Two savings, both exact:
    - prefix_len P > 0: the first P tokens are the same in every row (the system prompt); they run once, as a one-row
      prefix every row continues from (with gradient: adapters that shape the prefix get exactly the summed gradient
      of every row). Hidden states over the prefix come back as zeros (never read: no action token lies in it).
      One row has nothing to share: it runs the plain forward (on SmolLM2, 1 row of 392 + 1,000 tokens, forward and
      backward: 7.9 s plain vs 9.4 s through the prefix, whose attention needs an explicit mask) -- unless `prefix`
      is that one-row prefix already computed (a SharedPrefix's cache, one per optimizer step): then every row,
      one alone too, continues it.
    - logits_at (B, T) bool: the LM head (V × C, a fifth of SmolLM2's FLOPs) runs only there -> logits (N, V)."""
    if not prefix_len or (input_ids.shape[0] == 1 and prefix is None):   # nothing to share: the plain forward
        return model(input_ids, attention_mask, return_hidden=True, logits_to_keep=logits_at)
    P = prefix_len
    if prefix is None:
        prefix = prefix_cache(model, input_ids[:1, :P])
    elif prefix.length != P:
        raise ValueError(f"forward_with_prefix: a shared prefix of {prefix.length} tokens for prefix_len {P}")
    rest = None if attention_mask is None else attention_mask[:, P:]
    logits, hidden = model(input_ids[:, P:], rest, prefix=prefix, return_hidden=True,
                           logits_to_keep=None if logits_at is None else logits_at[:, P:])
    if logits_at is None:
        logits = F.pad(logits, (0, 0, P, 0))                                            # (B, T, V)
    return logits, F.pad(hidden, (0, 0, P, 0))                                          # (B, T, C)


def store_frozen_weights_in(model, dtype):
    """Keep the frozen base weights in `dtype` (bfloat16 under LoRA): half the memory and KV cache, and autocast no
    longer casts them at every forward. Trainable weights (adapters) stay float32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


# ------------------------------------------------------------------------------------------ KV cache + sampling
class KVCache:
    """Cache written by index (deviation 4). Slot j of row b holds a real token iff valid[b, j].

    The buffers grow `grow_by` slots at a time up to `max_len` (0: all max_len slots at once). A rollout's bound is
    its worst case (every step the batch's longest action and observation), about three times what a batch of
    SmolLM2 episodes uses, and by the time the cache is long most rows have finished and left it (`keep`)."""
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device="cpu", dtype=torch.float32,
                 grow_by: int = 256):
        # One buffer per layer (L × (B, K, capacity, D)): a layer only ever writes its own, so a prefix cache filled
        # with grad enabled can be read by later forwards without autograd seeing an in-place change.
        shape = (batch_size, config.num_key_value_heads, 0, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)       # (B, capacity)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)         # (B,) next RoPE position
        self.length, self.max_len, self.grow_by = 0, max_len, grow_by   # shared write pointer (python int: no sync)
        self.prefix = None                           # a one-row KVCache every row continues (share_prefix)
        self.ensure(0 if grow_by else max_len)

    def ensure(self, n):
        """Make room for n slots: grow every buffer to n + grow_by slots (at most max_len), one layer at a time."""
        if n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} used + {n - self.length} new slots > max_len {self.max_len}")
        have = self.valid.shape[1]
        if n <= have:
            return
        more = min(self.max_len, n + self.grow_by) - have
        for buffers in (self.k, self.v):
            for i, x in enumerate(buffers):          # the old buffer is freed as its grown copy replaces it
                buffers[i] = torch.cat((x, x.new_zeros(*x.shape[:2], more, x.shape[3])), 2)
        self.valid = torch.cat((self.valid, self.valid.new_zeros(self.valid.shape[0], more)), 1)

    @property
    def batch_size(self):
        return self.valid.shape[0]

    def reserve(self, m):                            # m (B, T) bool -> attention mask (B, 1, T, S) for these tokens
        T, s = m.shape[1], self.length
        self.ensure(s + T)
        self.valid[:, s:s + T] = m
        q_slot = torch.arange(s, s + T, device=m.device)[:, None]              # (T, 1)
        k_slot = torch.arange(s + T, device=m.device)[None]                    # (1, S)
        mask = ((k_slot <= q_slot) & self.valid[:, None, :s + T]) | (k_slot == q_slot)   # (B, T, S); deviation 3
        return mask[:, None]

    def write(self, layer, k, v):                    # k, v (B, K, T, D) -> the layer's (B, K, S, D) views
        s, T = self.length, k.shape[2]
        self.k[layer][:, :, s:s + T] = k
        self.v[layer][:, :, s:s + T] = v
        return self.k[layer][:, :, :s + T], self.v[layer][:, :, :s + T]

    def advance(self, T, m):
        self.length += T
        self.next_pos += m.sum(1)

    def share_prefix(self, prefix: "KVCache"):
        """Every row continues the one-row cache `prefix` (a prompt prefix all rows share, computed once). It stays one
        row: the rows' own slots start after it, and attention reads it once for all of them (attend_with_prefix)."""
        if self.length:
            raise ValueError("share_prefix: the cache must be empty")
        self.prefix, self.next_pos[:] = prefix, prefix.next_pos

    def keep(self, rows: torch.Tensor):
        """Keep only these batch rows (finished episodes leave the batch)."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.valid, self.next_pos = self.valid[rows], self.next_pos[rows]


@torch.no_grad()
def extend(model, cache: KVCache, chunks: list[list[int]]) -> torch.Tensor:
    """Append one token list per row (left-padded into one block, pads masked) in one forward.
    Returns the logits at each row's last new token, (B, V)."""
    if len(chunks) != cache.batch_size:
        raise ValueError(f"extend: {len(chunks)} chunks for a cache of {cache.batch_size} rows")
    if any(len(c) == 0 for c in chunks):
        raise ValueError("extend: every row needs at least one new token")
    W = max(map(len, chunks))
    ids = torch.tensor([[0] * (W - len(c)) + list(c) for c in chunks])                      # (B, W)
    m = torch.tensor([[False] * (W - len(c)) + [True] * len(c) for c in chunks])
    dev = cache.valid.device
    logits = model(ids.to(dev), attention_mask=m.to(dev), cache=cache, logits_to_keep=slice(-1, None))
    return logits[:, -1]                                                                      # (B, V)


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> token (B,), log-prob (B,) float32 under the processed distribution (deviation 6)."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]
    logits = logits / temperature
    if top_k > 0:                                    # keep the k largest
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:                                  # nucleus: keep tokens whose preceding mass is < top_p
        srt, idx = logits.sort(-1, descending=True)
        p = srt.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p
        logits = logits.scatter(1, idx, srt.masked_fill(drop, -math.inf))
    logp = logits.log_softmax(-1)                                                            # (B, V)
    # Inverse CDF: the first token whose cumulative probability exceeds u ~ U[0, F_V), no host sync (deviation 6)
    cdf = logp.exp().cumsum(-1)                                                              # (B, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]    # (B, 1)
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[1] - 1)           # (B,)
    return tok, logp.gather(1, tok[:, None])[:, 0]


@torch.no_grad()
def decode(model, cache: KVCache, last_logits, max_new_tokens, stop_ids, temperature=1.0, top_k=0, top_p=1.0,
           generator=None, check_every=8):
    """Sample per row until one of `stop_ids` (kept in the output) or its max_new_tokens (an int, or one per row);
    every sampled token enters the cache (deviation 5). Returns (tokens, logprobs) as python lists."""
    B, dev = last_logits.shape[0], last_logits.device
    max_new = torch.as_tensor(max_new_tokens, device=dev).long().expand(B)                   # (B,)
    n_steps = int(max_new.max()) if B else 0         # host sync, once
    stops = torch.tensor(list(stop_ids) or [-1], device=dev)                                # (n,); -1: none
    tokens = torch.zeros(B, n_steps, dtype=torch.long, device=dev)
    logps = torch.zeros(B, n_steps, dtype=torch.float32, device=dev)
    n_gen = torch.zeros(B, dtype=torch.long, device=dev)
    done = max_new <= 0
    logits = last_logits
    for i in range(n_steps):
        tok, lp = sample(logits, temperature, top_k, top_p, generator)
        active = ~done
        tokens[:, i], logps[:, i] = tok.masked_fill(done, 0), lp.masked_fill(done, 0.0)
        n_gen += active
        done = done | (active & (tok[:, None] == stops).any(-1)) | (n_gen >= max_new)
        logits = model(tokens[:, i:i + 1], attention_mask=active[:, None], cache=cache)[:, -1]
        if (i + 1) % check_every == 0 or i + 1 == n_steps:
            if bool(done.all()):                     # host sync, once every `check_every` tokens
                break
    n, toks, lps = n_gen.tolist(), tokens.tolist(), logps.tolist()                          # one transfer
    return [t[:k] for t, k in zip(toks, n)], [p[:k] for p, k in zip(lps, n)]


# ------------------------------------------------------------------------------------------------- tokenizer
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


# ---------------------------------------------------------------------------------------------------- files
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


def _atomic(file, write):                            # write(tmp) -> fsync -> rename: no half-written file survives
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
    config = ModelConfig.from_hf(raw)
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
    """Write an HF checkpoint directory, LoRA merged into the weights. `state`: the model's full state dict when the
    model's own parameters are shards (FSDP)."""
    os.makedirs(path, exist_ok=True)
    tensors = _merged_state(model, state)
    _atomic(os.path.join(path, "model.safetensors"), lambda t: save_file(tensors, t, {"format": "pt"}))
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _write_json(os.path.join(path, "config.json"), {**model.config.to_hf(), "dtype": dtype})
    eos = tokenizer.eos_ids if len(tokenizer.eos_ids) > 1 else tokenizer.eos_id
    _write_json(os.path.join(path, "generation_config.json"),
                {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id})
    tokenizer.save(path)


# ------------------------------------------------------------------------------------------------------ LoRA
class LoRALinear(nn.Module):
    """y = W x + b + (α/r) · B A x. Keeps the base Parameter objects (same names, no copy). No LoRA dropout: nothing
    here trains with it (peft's default is 0 as well)."""
    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.weight, self.bias, self.r, self.alpha, self.scale = base.weight, base.bias, r, alpha, alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))                 # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))                # (out, r)
        # A random, B = 0 -> the adapter starts as a no-op. A is drawn from `generator` (add_lora's seed), never
        # from the global RNG, whose state depends on what ran before (a cached or a freshly trained warm start).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.enabled = True                          # False: the base model (lora_disabled)
        self.packed = None                           # see packed_weights
        self.train(base.training)                    # the mode of the layer it replaces

    def forward(self, x):
        y = linear(x, self)                          # the frozen base: W x + b
        if self.enabled:
            # Adapters in their own dtype: a bf16 base runs without autocast too. Under autocast the matmuls run in
            # its dtype anyway, so x is not copied to float32 first; the scale multiplies the r-wide A x, not the output.
            if not torch.is_autocast_enabled(x.device.type):
                x = x.to(self.lora_A.dtype)
            y = y + F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B).to(y.dtype)
        return y


def add_lora(model, r=8, alpha=16, seed=0,
             targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Freeze every base weight and wrap the nn.Linear layers named in `targets`; the A matrices are drawn from a
    generator seeded with `seed` (the same adapters whatever ran before). Returns the model."""
    model.requires_grad_(False)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, m in list(model.named_modules()):
        for child, sub in list(m.named_children()):
            if child in targets and isinstance(sub, nn.Linear):
                setattr(m, child, LoRALinear(sub, r, alpha, generator))
    return model


@contextmanager
def lora_disabled(model):
    """The frozen base model (the PPO reference policy) without a second copy in memory."""
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in loras:
        m.enabled = False
    try:
        yield model
    finally:
        for m in loras:
            m.enabled = True


@contextmanager
def packed_weights(model, enabled: bool = True):
    """While inside: every bf16 CPU Linear / LoRALinear base weight also kept in oneDNN's blocked layout, used by
    linear() for decode-sized no-grad matmuls (rollouts: measured on SmolLM2, 32 rows, 1 thread, 576x1536 77 -> 42 us,
    the 49,152-row head 8.2 -> 5.7 ms). The same products in another kernel: equal to F.linear up to bf16 rounding.
    Costs a second copy of those weights while inside; packed again on each entry, so trained weights are never stale.
    A no-op off a CPU, for float32 weights, or for sharded (DTensor) weights."""
    layers = []
    if enabled and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        layers = [m for m in model.modules() if isinstance(m, (Linear, LoRALinear))
                  and type(m.weight.data) is torch.Tensor and m.weight.device.type == "cpu"
                  and m.weight.dtype == torch.bfloat16 and (m.bias is None or m.bias.dtype == torch.bfloat16)]
    try:
        for m in layers:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 32)   # tuned for 32 rows
        yield model
    finally:
        for m in layers:
            m.packed = None
