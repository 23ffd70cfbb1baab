"""A hand-written Llama / Mistral / Qwen2 / Qwen3 decoder: the network this code trains, in one file.

Who calls it: rollout.py (KVCache, extend, decode), ppo.py/train.py (PolicyWithValue, LoRA, lora_disabled as the
reference policy), sft.py (from-scratch ModelConfig + Transformer), hf.py (checkpoint files, which it builds on the
meta device: module names are the HF keys, RoPE is HF's rotate_half layout). cpu_speed.py applies the CPU speed paths
(packed weights, a shared prompt computed once) to this model from outside.

Deviations and choices (vs transformers / the StepTool authors' code, which used HF + TRL):
 1. model_type llama | mistral | qwen2 | qwen3 only, hidden_act silu, rope default | linear | llama3 (hf.py refuses
    the rest, and sliding-window attention that would change results).
 2. Position ids are per row `cumsum(attention_mask) - 1`, so left padding and holes change nothing (HF's forward
    uses 0..T-1 whatever the mask; its generate() does what we do).
 3. Every query may attend to itself, even a padding query: no all-masked softmax row, no NaN. Padding outputs
    are garbage by design and never read.
 4. KV cache: one write pointer for the whole batch; rows with shorter chunks leave masked holes (cheaper than
    per-row pointers; RoPE positions are per row, so holes are free).
 5. decode() feeds every sampled token (stop token included) into the cache; the next extend() appends only new
    tokens. Finished rows step with a masked pad until the batched "all done" check (every 8 tokens).
 6. Sampling by inverse CDF (one uniform per row, searchsorted in the cumulative probabilities): no host sync, the
    law of multinomial, cheaper on a CPU than one Exp(1) draw per vocabulary entry. Greedy (temperature 0) reports
    the model's own log-prob, not the log 1 = 0 of a point mass.
 7. ValueHead starts at zero (V = 0 everywhere), a common critic init; TRL uses a small random init.
 8. RoPE frequencies are recomputed in float32 per device (not a buffer), so .to(bfloat16) never rounds them.

Shape legend: B batch, T tokens, S cache slots, V vocabulary, H query heads, K kv heads, D head dim, C model dim,
L layers, F MLP dim, r LoRA rank.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    """The subset of HF config.json this model needs. Field names are HF's."""
    model_type: str = "llama"                  # llama | mistral | qwen2 | qwen3
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

    def __post_init__(self):                         # the defaults HF resolves the same way (hf.py validates files)
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.attention_bias = self.attention_bias or self.model_type == "qwen2"    # Qwen2 always has q/k/v bias
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


# ------------------------------------------------------------------------------------------------------ layers
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
        self.q_proj = nn.Linear(cfg.hidden_size, self.H * self.D, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.K * self.D, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.K * self.D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, cfg.hidden_size, bias=o_bias)
        if cfg.model_type == "qwen3":                # per-head RMSNorm on q and k, before RoPE
            self.q_norm, self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps), RMSNorm(self.D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):     # x (B, T, C); mask None (causal) or (B, 1, T, S)
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
        y = self.attend(q, k, v, mask, cache)                                   # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))

    def attend(self, q, k, v, mask, cache):
        """softmax(q kᵀ / √D + mask) v. GQA: SDPA broadcasts each kv head over H/K query heads itself (enable_gqa),
        no repeat_kv copy. The one step cpu_speed.PrefixAttention replaces (for a prompt kept once in `cache`)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=self.H != self.K)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, Fd, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(C, Fd, bias=b), nn.Linear(C, Fd, bias=b)
        self.down_proj = nn.Linear(Fd, C, bias=b)

    def forward(self, x):                            # SwiGLU: W_down (silu(W_gate x) ⊙ W_up x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()                     # a bare container so parameter names read "model.layers.0..."
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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

    def forward(self, input_ids, attention_mask=None, cache=None, return_hidden=False, logits_to_keep=None):
        """input_ids (B, T) -> logits (B, T, V) [, final hidden (B, T, C)]. `cache`: continue each row's KV cache.
        `logits_to_keep`: the positions to project, a (B, T) bool mask (-> logits (N, V)) or a slice of T."""
        B, T = input_ids.shape
        dev, mask, position_ids = input_ids.device, None, None
        if cache is not None:
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
                mask = ((causal & m[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev))[:, None]  # deviation 3
        if position_ids is None:                     # no mask, or right padding: 0..T-1
            position_ids = torch.arange(T, device=dev)[None]                    # (1, T)
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.config, dev)
        freqs = position_ids[..., None].float() * self._inv_freq[dev]           # (B, T, D/2): p · θ_i
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                        # (B, 1, T, D)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(input_ids)                                  # (B, T, C)
        # Activation checkpointing (training forwards only): keep each layer's input, recompute the rest in backward.
        # Never while writing a KVCache: the recomputed layer would write its keys and values a second time.
        recompute = self.checkpoint_layers and torch.is_grad_enabled() and not isinstance(cache, KVCache)
        for block in self.model.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T, m)
        x = self.model.norm(x)                                                  # hidden: what lm_head sees
        if logits_to_keep is None:
            logits = self.lm_head(x)                                            # (B, T, V)
        elif isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            logits = self.lm_head(x[logits_to_keep])                            # (N, V): only the selected positions
        else:
            # contiguous: a strided (B, 1, C) view sends F.linear to a batched matmul that copies the (V, C) weight
            # once per row (README, "Where the time goes")
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

    def forward(self, input_ids, attention_mask=None, logits_at=None):
        """-> logits (B, T, V), or (N, V) at the positions logits_at (B, T) selects; values (B, T) float32."""
        logits, hidden = self.model(input_ids, attention_mask, return_hidden=True, logits_to_keep=logits_at)
        if self.value_head is None:                  # a critic-free advantage (--advantage step-group)
            return logits, hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)
        # detach_critic: the value loss trains the head only, never the shared trunk (the policy's features).
        return logits, self.value_head(hidden.detach() if self.detach_critic else hidden)


def store_frozen_weights_in(model, dtype):
    """Keep the frozen base weights in `dtype` (bfloat16 under LoRA): half the memory and KV cache, and autocast no
    longer casts them at every forward. Trainable weights (adapters) stay float32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


# ------------------------------------------------------------------------------------------ KV cache + sampling
class KVCache:
    """Cache written by index (deviation 4). Slot j of row b holds a real token iff valid[b, j]. The buffers grow
    `grow_by` slots at a time up to `max_len` (0: all at once): a rollout's bound is its worst case, far above what
    it uses, and by the time the cache is long most rows have finished and left it (`keep`)."""
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device="cpu", dtype=torch.float32,
                 grow_by: int = 256):
        # One buffer per layer (L × (B, K, capacity, D)): a layer only ever writes its own, so a cache filled with grad
        # enabled (cpu_speed's shared prompt) can be read by later forwards without autograd seeing an in-place change.
        shape = (batch_size, config.num_key_value_heads, 0, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)       # (B, capacity)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)         # (B,) next RoPE position
        self.length, self.max_len, self.grow_by = 0, max_len, grow_by   # shared write pointer (python int: no sync)
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
        if ((i + 1) % check_every == 0 or i + 1 == n_steps) and bool(done.all()):   # host sync every check_every
            break
    n, toks, lps = n_gen.tolist(), tokens.tolist(), logps.tolist()                          # one transfer
    return [t[:k] for t, k in zip(toks, n)], [p[:k] for p, k in zip(lps, n)]


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
        self.train(base.training)                    # the mode of the layer it replaces

    def frozen(self, x):                             # the frozen base W x + b (cpu_speed.PackedLoRALinear: packed)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x):
        y = self.frozen(x)
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
