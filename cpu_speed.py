"""The CPU speed floor: machine-specific speed paths applied from outside to the plain model and loop, behind one
switch (Config.cpu_speed, `--cpu-speed` / `--no-cpu-speed`, on by default). model.py, ppo.py, sft.py and rollout.py
read as the plain algorithm and run as it without this file; with it they compute the same things faster on a CPU,
as gpt-fast's quantize.py swaps nn.Linear modules by walking the module tree and torchtitan's parallelize_* functions
apply checkpointing and compile to a plain model definition.

Who calls it: train.py (`apply` to the model, `SharedPromptMicrobatches` for ppo_update, `tune_allocator`),
evaluation.py (`ModelPolicy` for rollouts), sft.py (`apply`, `SharedPromptMicrobatches` for the warm start), bench.py,
tests/test_speed.py. How the plain code reaches it: `apply` swaps module classes; rollout.rollout drives whatever
ModelPolicy it is given; ppo_update and sft_train cut micro-batches with the Microbatches class they are given and run
its `forwards()` scope around a pass or a step, which sets the `shared_prompt` mode (like torch.no_grad) that the
swapped Transformer reads. P, the prompt's length, is computed here from token ids and never leaves this file.

What it changes (measurements: README "Performance", docs/history.md §7), each a no-op where it does not apply:
 1. The prompt every row shares (the system prompt, when every task shows the same tools; `shared_prefix_len`, at
    least 16 tokens) runs once instead of once per row:
    - rollouts: one row of KV cache every row continues (SharedPromptCache), read once per decode step for all rows
      (`attend_with_prefix`: two flash-attention passes joined by their log-sum-exp) instead of once per row;
    - SFT and PPO: a forward of several rows runs the prompt as a one-row prefix its rows continue
      (`forward_with_prefix`); in one process PPO runs it once per optimizer step and once for pass (1)
      (`SharedPrefix`, with a backward of its own). The token budget then counts each row's own tokens only.
    Exact in float32 up to summation order; in bf16 the same rounding noise as any other grouping of the work.
 2. Decode matmuls on oneDNN-prepacked copies of bf16 weights, during rollouts only (`packed_weights`): the same
    products in another kernel, equal to F.linear up to bf16 rounding.
 3. With bf16 weights on a CPU, PPO micro-batches cut to a length (after the prompt) rounded up to a multiple of 64:
    oneDNN compiles and keeps a kernel per matmul shape, and repeated lengths reuse them. Right padding: exact.
 4. glibc's allocator (`tune_allocator`): tensors of 16 MB or more get pages of their own, returned to the OS when
    freed, and the heap is trimmed after every rollout and update.
Data parallel: under FSDP the prompt is not shared (a rank whose episodes share none would run one forward fewer
than the others, and FSDP's collectives would hang); under DDP it runs once per forward, not per optimizer step (the
ranks exchange gradients before a step's last backward, which the shared prefix's gradient would miss).

Shapes: B rows, T tokens, P prompt tokens, S cache slots, H query heads, K kv heads, D head dim.
"""
import ctypes
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import rollout
from batching import Microbatches
from model import Attention, KVCache, LoRALinear, Transformer, extend
from ppo import ONE_PROCESS

MIN_PROMPT = 16          # a shorter shared prompt is not worth a forward of its own
DECODE_SPLIT_MAX = 32    # new tokens per row up to which attend_with_prefix reads the prompt once for all rows
PACKED_MAX_ROWS = 256    # rows up to which a packed bf16 matmul beats F.linear (decode steps)
LENGTH_MULTIPLE = 64     # PPO micro-batch lengths with bf16 weights on a CPU (part 3)
MMAP_THRESHOLD_MB = 16   # part 4


def apply(model: Transformer) -> Transformer:
    """Install the speed paths in a plain Transformer, in place, after add_lora (idempotent): every nn.Linear becomes
    a PackedLinear, every LoRALinear a PackedLoRALinear, every Attention a PrefixAttention, the model a
    SharedPromptTransformer. By swapping each module's class, as FSDP2's fully_shard does: same parameters, same
    names, same outputs until a rollout packs the weights or a shared prompt is set."""
    swaps = {nn.Linear: PackedLinear, LoRALinear: PackedLoRALinear, Attention: PrefixAttention,
             Transformer: SharedPromptTransformer}
    for m in model.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]
    return model


# ---------------------------------------------------------------------------------------------- 2. packed weights
def packed_linear(x, layer):
    """x Wᵀ + b: on the packed copy of W for a decode-sized no-grad matmul (while packed_weights holds one), else
    F.linear (which re-blocks the weight at every call)."""
    if (layer.packed is not None and not torch.is_grad_enabled() and x.dtype == layer.weight.dtype
            and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]):
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")
    return F.linear(x, layer.weight, layer.bias)


class PackedLinear(nn.Linear):
    packed = None                                    # W in oneDNN's blocked layout, while packed_weights holds one

    def forward(self, x):
        return packed_linear(x, self)


class PackedLoRALinear(LoRALinear):
    packed = None                                    # the frozen base W, packed; the adapters as they are

    def frozen(self, x):
        return packed_linear(x, self)


@contextmanager
def packed_weights(model):
    """While inside (a rollout): every bf16 CPU PackedLinear / PackedLoRALinear weight is also kept in oneDNN's
    blocked layout, for the few-row no-grad matmuls of decode steps. A second copy of those weights while inside;
    packed again on each entry, so trained weights are never stale. A no-op off a CPU, without oneDNN bf16, for
    float32 weights, or for sharded (DTensor) weights."""
    layers = []
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        layers = [m for m in model.modules() if isinstance(m, (PackedLinear, PackedLoRALinear))
                  and type(m.weight.data) is torch.Tensor and m.weight.device.type == "cpu"
                  and m.weight.dtype == torch.bfloat16 and (m.bias is None or m.bias.dtype == torch.bfloat16)]
    try:
        for m in layers:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 32)   # tuned for 32 rows
        yield model
    finally:
        for m in layers:
            m.packed = None


# ------------------------------------------------------------------------------------------- 1. the shared prompt
def shared_prefix_len(rows: list[list[int]], min_len: int = MIN_PROMPT) -> int:
    """Length of the token prefix every row shares, at most each row's length − 1 so every row keeps a token of its
    own; 0 if shorter than min_len."""
    n = min(map(len, rows)) - 1
    first = rows[0]
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n if n >= min_len else 0


def attend_with_prefix(q, k, v, mask, pk, pv):
    """Every row's queries attend to [a prefix all rows share ; the row's own keys].
    q (B, H, T, D); k, v (B, K, S, D); mask (B, 1, T, S) bool over the own keys; pk, pv (1, K, P, D), every prefix
    slot a real token. -> (B, H, T, D)"""
    B, H, T, D = q.shape
    K, P, G = k.shape[1], pk.shape[2], H // k.shape[1]          # G query heads per kv head
    if torch.is_grad_enabled() or q.device.type != "cpu" or T > DECODE_SPLIT_MAX:
        # One SDPA over the prefix broadcast to every row, then the own keys (training; long chunks; any device)
        full = torch.cat((mask.new_ones(B, 1, T, P), mask), -1)                 # (B, 1, T, P + S)
        return F.scaled_dot_product_attention(q, torch.cat((pk.expand(B, -1, -1, -1), k), 2),
                                              torch.cat((pv.expand(B, -1, -1, -1), v), 2), attn_mask=full,
                                              enable_gqa=H != K)
    # Decode steps (no grad, few new tokens per row, CPU): the prefix's keys are read once for all rows, not once per
    # row. Two softmaxes, each with its log-sum-exp l, joined exactly:
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


class PrefixAttention(Attention):
    """Attention that also reads `cache.prefix`, a one-row KVCache of a prompt every row continues, kept once."""
    def attend(self, q, k, v, mask, cache):
        prefix = getattr(cache, "prefix", None)
        if prefix is None:
            return super().attend(q, k, v, mask, cache)
        P = prefix.length
        return attend_with_prefix(q, k, v, mask, prefix.k[self.layer][:, :, :P], prefix.v[self.layer][:, :, :P])


class SharedPromptCache(KVCache):
    """A rollout's KVCache whose rows all continue `prefix` (a one-row KVCache of the prompt they share). It stays one
    row: the rows' own slots start after it, and PrefixAttention reads it once for all of them."""
    def __init__(self, prefix: KVCache, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix, self.next_pos[:] = prefix, prefix.next_pos


class PrefixRows:
    """The cache interface Transformer.forward expects, for training rows that all continue `prefix` without a cache
    of their own: positions after it, a causal mask over the rows' own tokens (deviation 3 of model.py), their keys
    and values passed through; PrefixAttention adds the prefix's."""
    def __init__(self, prefix: KVCache, rows: int, device):
        self.prefix, self.next_pos = prefix, torch.full((rows,), prefix.length, dtype=torch.long, device=device)

    def reserve(self, m):                            # m (B, T) bool -> (B, 1, T, T)
        T, dev = m.shape[1], m.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        return ((causal & m[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev))[:, None]

    def write(self, layer, k, v):
        return k, v

    def advance(self, T, m):
        pass


def prefix_cache(model, prefix_ids):
    """The one-row KVCache of prefix_ids (1, P), filled by one forward (with grad, if enabled)."""
    cache = KVCache(model.config, 1, prefix_ids.shape[1], prefix_ids.device, model.model.embed_tokens.weight.dtype)
    model(prefix_ids, cache=cache, logits_to_keep=slice(0, 0))
    return cache


def forward_with_prefix(model, input_ids, attention_mask, P, logits_at=None, prefix=None):
    """The training forward of rows whose first P tokens are the same -> (logits, final hidden (B, T, C)): those P run
    once, as a one-row prefix (`prefix`, if computed already) every row continues; with gradient, adapters that shape
    the prefix get exactly the summed gradient of every row. Hidden states over the prefix come back as zeros (never
    read: no action token lies in it). logits_at (B, T) bool: the LM head only there -> logits (N, V)."""
    prefix = prefix_cache(model, input_ids[:1, :P]) if prefix is None else prefix
    rest = None if attention_mask is None else attention_mask[:, P:]
    logits, hidden = model(input_ids[:, P:], rest, cache=PrefixRows(prefix, len(input_ids), input_ids.device),
                           return_hidden=True, logits_to_keep=None if logits_at is None else logits_at[:, P:])
    if logits_at is None:
        logits = F.pad(logits, (0, 0, P, 0))                                            # (B, T, V)
    return logits, F.pad(hidden, (0, 0, P, 0))                                          # (B, T, C)


class _Prompt:
    """The mode `shared_prompt` sets, like torch.no_grad: the length P of the prompt the rows of every forward inside
    start with (0: none), and its keys and values when computed once for all of them (a SharedPrefix's cache)."""
    length, prefix = 0, None


_PROMPT = _Prompt()


@contextmanager
def shared_prompt(length: int, prefix: KVCache | None = None):
    """Inside: every forward of a SharedPromptTransformer without a KV cache runs the first `length` tokens of its
    rows once (one row has nothing to share and runs as it is), or continues `prefix` if given (one row too)."""
    saved = _PROMPT.length, _PROMPT.prefix
    _PROMPT.length, _PROMPT.prefix = length, prefix
    try:
        yield
    finally:
        _PROMPT.length, _PROMPT.prefix = saved


class SharedPromptTransformer(Transformer):
    """A Transformer whose training forwards run the shared prompt once, inside `shared_prompt`."""
    def forward(self, input_ids, attention_mask=None, cache=None, return_hidden=False, logits_to_keep=None):
        P, prefix = _PROMPT.length, _PROMPT.prefix
        selected = logits_to_keep is None or getattr(logits_to_keep, "dtype", None) == torch.bool
        if cache is not None or not P or not selected or (len(input_ids) == 1 and prefix is None):
            return super().forward(input_ids, attention_mask, cache, return_hidden, logits_to_keep)
        logits, hidden = forward_with_prefix(self, input_ids, attention_mask, P, logits_to_keep, prefix)
        return (logits, hidden) if return_hidden else logits


class SharedPrefix:
    """The shared prompt run once for a group of forwards (the micro-batches of one optimizer step) instead of once per
    forward. Exact with gradients: each forward reads detached copies of the prefix's keys and values (leaves) and
    its backward adds its part of their gradient there; on leaving `with` without an error, one backward carries the
    sum through the prefix's own graph into the adapters. One process only: under DDP the ranks would exchange
    gradients before that last backward."""
    def __init__(self, model: Transformer, prefix_ids):
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

    def __enter__(self):                             # the mode of shared_prompt, with this prefix
        self.saved = _PROMPT.length, _PROMPT.prefix
        _PROMPT.length, _PROMPT.prefix = self.cache.length, self.cache
        return self

    def __exit__(self, error, *_):
        _PROMPT.length, _PROMPT.prefix = self.saved
        pairs = [(t, leaf.grad) for t, leaf in zip(self.graph, self.cache.k + self.cache.v) if leaf.grad is not None]
        if pairs and error is None:                  # Σ over the forwards of ∂loss/∂(prefix k, v), back through it
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


# ------------------------------------------------------------------------------- the loops: rollouts, SFT and PPO
class ModelPolicy(rollout.ModelPolicy):
    """rollout.ModelPolicy with the prompt its batch shares prefilled once and kept once (part 1), and decode matmuls
    on packed weights while the rollout runs (part 2). The model must have the speed paths installed (`apply`): a
    plain Attention does not read the shared prompt's cache, so its rows would continue without their system prompt."""
    def __init__(self, model, tokenizer, cfg, generator=None):
        if not any(isinstance(m, PrefixAttention) for m in model.modules()):
            raise TypeError("cpu_speed.ModelPolicy needs a model with the speed paths installed: call "
                            "cpu_speed.apply(model) first (or use rollout.ModelPolicy)")
        super().__init__(model, tokenizer, cfg, generator)

    def running(self):
        return packed_weights(self.model)

    def start(self, prompts: list[list[int]]):
        P = shared_prefix_len(prompts)
        if not P:
            return super().start(prompts)
        p = next(self.model.parameters())
        prefix = KVCache(self.model.config, 1, P, p.device, p.dtype)
        extend(self.model, prefix, [prompts[0][:P]])                                    # the system prompt, once
        self.cache = SharedPromptCache(prefix, self.model.config, len(prompts), self.slots(max(map(len, prompts)) - P),
                                       p.device, p.dtype)
        self.last_logits = extend(self.model, self.cache, [q[P:] for q in prompts])     # (B, V)


def shared_prompt_ids(batch) -> torch.Tensor | None:
    """The prompt tokens every row of a collated batch starts with, (1, P), or None (shared_prefix_len)."""
    ids, prompt_lens = batch["input_ids"], ((batch["step_id"] == -1) & batch["attention_mask"]).sum(1)
    P = shared_prefix_len([row[:n] for row, n in zip(ids.tolist(), prompt_lens.tolist())])   # step_id -1: the prompt
    return ids[:1, :P] if P else None


class SharedPromptMicrobatches(Microbatches):
    """batching.Microbatches for rows whose first tokens are `prompt_ids` (1, P) (None: no shared prompt): the token
    budget and the padding count each row's own tokens; the prompt runs once per forward, or once for all of a
    policy's forwards in a scope (`per_step`: pass (1), one optimizer step); lengths are rounded up to `multiple`
    (part 3), at most `max_width`."""
    def __init__(self, lengths, token_budget, max_padding=1.0, prompt_ids=None, multiple=1, max_width=None,
                 per_step=False):
        self.P = 0 if prompt_ids is None else prompt_ids.shape[1]
        self.prompt_ids, self.multiple, self.max_width, self.per_step = prompt_ids, multiple, max_width, per_step
        super().__init__([n - self.P for n in lengths], token_budget, max_padding)

    @classmethod
    def of_batch(cls, batch, cfg, dp=None, policy=None):
        """ppo_update's: the prompt its rows share (none under FSDP), once per optimizer step in one process."""
        net = policy if isinstance(policy, nn.Module) else getattr(policy, "model", None)
        bf16 = isinstance(net, nn.Module) and any(p.dtype == torch.bfloat16 for p in net.parameters())
        multiple = LENGTH_MULTIPLE if bf16 and batch["input_ids"].device.type == "cpu" else 1
        return cls(batch["attention_mask"].sum(1).tolist(), cfg.token_budget, cfg.max_padding,
                   None if getattr(dp, "fsdp", False) else shared_prompt_ids(batch), multiple,
                   batch["input_ids"].shape[1], per_step=dp is None or dp is ONE_PROCESS)

    @classmethod
    def of_episodes(cls, episodes, token_budget):
        """sft_train's: the prompt every demonstration shares, once per micro-batch."""
        prompts = [ep.token_ids[:ep.step_id.count(-1)] for ep in episodes]           # step_id -1 = the prompt
        P = shared_prefix_len(prompts)
        return cls([len(ep.token_ids) for ep in episodes], token_budget, 1.0, torch.tensor([prompts[0][:P]]) if P
                   else None)

    def width(self, rows) -> int:                    # P + ⌈(longest own part) / multiple⌉·multiple, at most the batch's
        width = self.P + -(-super().width(rows) // self.multiple) * self.multiple
        return width if self.max_width is None else min(width, self.max_width)

    @contextmanager
    def forwards(self, policy=None, autocast=None):
        model = getattr(policy, "model", None)
        if not self.P:
            yield
        elif self.per_step and isinstance(model, SharedPromptTransformer):
            with autocast or nullcontext():          # the prompt's forward (with grad, if enabled) under autocast
                shared = SharedPrefix(model, self.prompt_ids)
            with shared:                             # leaving: its gradient, in one backward
                yield
        else:
            with shared_prompt(self.P):
                yield

    def padding_fraction(self, ran) -> float:        # over each row's own tokens
        return super().padding_fraction([(rows, L - self.P) for rows, L in ran])


# -------------------------------------------------------------------------------------------- 4. glibc's allocator
def map_large_allocations(threshold_mb: int = MMAP_THRESHOLD_MB) -> bool:
    """glibc's M_MMAP_THRESHOLD: every allocation of at least threshold_mb gets pages of its own, unmapped when
    freed, so the activations of one micro-batch never stay resident in a fragmented heap. glibc's default adapts:
    after the first large tensor is freed the threshold rises (up to 32 MB) and later tensors come from the heap.
    -> whether it was set (False without glibc)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, threshold_mb << 20) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_freed_memory():
    """Hand the heap memory freed by the last phase back to the OS (glibc keeps freed blocks for reuse, and with
    tensors of new sizes every micro-batch it reuses few). A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tune_allocator():
    """Part 4 for a whole run: large tensors mmap'd from now on. -> the function that trims the heap after a phase."""
    map_large_allocations()
    return release_freed_memory
