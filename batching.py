"""From episodes to the tensors SFT and PPO train on, and from logits to per-token log-probabilities.

Who calls it: sft.py (the warm start's loss), ppo.py (π_old, π_θ and the micro-batches of an update), train.py (the
reference policy's log-probs, collating each iteration's episodes), rollout.py (the shared prompt prefix).

Why a module of its own: SFT and PPO need the same four things, and neither should import the other for them:
 1. `collate`: a list of rollout.Episode, right-padded into (B, T) token tensors and (B, S) step tensors.
 2. `shared_prefix_len`: the prompt prefix every row shares (the system prompt), computed once per forward.
 3. `pack_microbatches`: rows grouped under a token budget, sorted by length so padding stays small.
 4. `token_logprobs`: log π of each token, the one place logits are shifted (logits at t−1 predict token t).

Shapes: B batch (episodes), T tokens, S steps, V vocabulary, N selected positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shared_prefix_len(rows: list[list[int]], min_len: int = 16) -> int:
    """Length of the token prefix every row shares (the system prompt, when every task shows the same tools), at
    most each row's length − 1 so every row keeps a token of its own; 0 if shorter than min_len (not worth it)."""
    n = min(map(len, rows)) - 1
    first = rows[0]
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n if n >= min_len else 0


def collate(episodes: list, pad_id: int, device="cpu", shared_prefix: bool = False) -> dict:
    """Right-pad a list of rollout.Episode into the tensors ppo.py consumes (its contract and `ppo_update`'s
    docstring). shared_prefix: also "prefix_len", the number of leading prompt tokens every episode shares (an int;
    0 = none), which model.forward_with_prefix then computes once per micro-batch."""
    B, T = len(episodes), max(len(ep.token_ids) for ep in episodes)
    S = max(max(len(ep.steps), 1) for ep in episodes)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.bool),
        "action_mask": torch.zeros(B, T, dtype=torch.bool),
        "step_id": torch.full((B, T), -1, dtype=torch.long),
        "old_logprobs": torch.zeros(B, T),
        "step_rewards": torch.zeros(B, S),
        "step_mask": torch.zeros(B, S, dtype=torch.bool),
        "step_start": torch.zeros(B, S, dtype=torch.long),
        "step_end": torch.zeros(B, S, dtype=torch.long),
        "state_id": torch.zeros(B, S, dtype=torch.long),
        "episode_group": torch.zeros(B, dtype=torch.long),
    }
    for b, ep in enumerate(episodes):
        n = len(ep.token_ids)
        out["input_ids"][b, :n] = torch.tensor(ep.token_ids)
        out["attention_mask"][b, :n] = True
        out["action_mask"][b, :n] = torch.tensor(ep.action_mask, dtype=torch.bool)
        out["step_id"][b, :n] = torch.tensor(ep.step_id)
        out["old_logprobs"][b, :n] = torch.tensor(ep.logprobs)
        s = len(ep.steps)
        out["step_rewards"][b, :len(ep.rewards)] = torch.tensor(ep.rewards, dtype=torch.float32)
        out["step_mask"][b, :s] = True
    # First and last action token of every step, from the masks in one vectorised pass.
    is_action = out["action_mask"]
    pos = torch.arange(T).expand(B, T)
    sid = torch.where(is_action, out["step_id"], S)                              # (B, T), S = "no step"
    first = torch.full((B, S + 1), T, dtype=torch.long).scatter_reduce(1, sid, pos, "amin")
    last = torch.zeros(B, S + 1, dtype=torch.long).scatter_reduce(1, sid, pos, "amax")
    out["step_start"], out["step_end"] = first[:, :S].clamp(max=T - 1), last[:, :S]
    # For --advantage step-group: an id per step for its state (the token ids before its first action token: the same
    # task, calls and observations so far) and an id per episode for its task.
    states, tasks = {}, {}
    for b, (ep, starts) in enumerate(zip(episodes, out["step_start"].tolist())):
        for s in range(len(ep.steps)):
            out["state_id"][b, s] = states.setdefault(tuple(ep.token_ids[:starts[s]]), len(states))
        out["episode_group"][b] = tasks.setdefault(getattr(ep.task, "id", f"row {b}"), len(tasks))
    prompts = [ep.token_ids[:ep.step_id.count(-1)] for ep in episodes]           # step_id -1 = the prompt
    prefix_len = shared_prefix_len(prompts) if shared_prefix else 0
    return {k: v.to(device) for k, v in out.items()} | {"prefix_len": prefix_len}


def pack_microbatches(lengths, token_budget, max_padding=1.0):
    """Group episode indices so each group's rows × longest row ≤ token_budget (a longer row goes alone) and at
    most `max_padding` of each group's slots are padding (so of all of them: 1.0 = no limit).

    Sorted by length (longest first) so rows of similar length share a group and padding stays small. A row that
    would pad its group beyond max_padding starts a new one: one more forward, and (with a shared prefix) the prefix
    once more, against fewer wasted slots."""
    groups, real = [], 0  # real: the open group's tokens without padding
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups:
            slots = (len(groups[-1]) + 1) * lengths[groups[-1][0]]  # the first row of a group is its longest
            if slots <= token_budget and slots - real - lengths[i] <= max_padding * slots:
                groups[-1].append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def padding_fraction(lengths, microbatches, widths=None):
    """Share of the micro-batches' (rows × width) slots that are padding; a micro-batch's width is the length it was
    cut to (default: its longest row)."""
    widths = widths or [max(lengths[i] for i in mb) for mb in microbatches]
    real = sum(lengths[i] for mb in microbatches for i in mb)
    padded = sum(len(mb) * width for mb, width in zip(microbatches, widths))
    return 1.0 - real / max(padded, 1)


def predictors(targets):
    """(B, T) bool: the tokens to score -> (B, T) bool: the positions whose logits predict them (see below)."""
    return F.pad(targets[:, 1:], (0, 1))


def token_logprobs(logits, input_ids, with_entropy=False, entropy_grad=True, chunk=None, targets=None,
                   temperature=1.0):
    """log π(input_ids[:, t] | input_ids[:, <t]) for t ≥ 1, 0 at t = 0: (B, T) [and entropy H (B, T)], π =
    softmax(logits / temperature). Gather minus logsumexp, `chunk` positions at a time in float32: never a float32
    (B, T, V) log-softmax. With `targets` (B, T) bool, logits are (N, V), computed only at the N positions
    `predictors(targets)` selects (row-major order, model.forward_with_prefix(logits_at=...)); tokens outside
    targets get 0, and the log-probs go through SelectedLogprobs (memory: see there)."""
    if targets is not None:
        return _sparse_logprobs(logits, input_ids, targets, with_entropy, entropy_grad, chunk, temperature)
    logits = logits / temperature if temperature != 1.0 else logits
    B, T, V = logits.shape
    chunk = chunk or max(1, 2**25 // (B * V))  # ~128 MB of float32 per chunk
    # THE logits shift: logits at t−1 predict token t; position 0 has none (`predictors` is the same shift).
    pred, target = logits[:, :-1], input_ids[:, 1:]  # (B, T−1, V), (B, T−1)
    lps, ents = [torch.zeros(B, 1, device=logits.device)], [torch.zeros(B, 1, device=logits.device)]
    for i in range(0, T - 1, chunk):
        lp, ent = _logprob_entropy(pred[:, i:i + chunk].float(), target[:, i:i + chunk], with_entropy, entropy_grad)
        lps.append(lp)  # (B, c)
        ents.append(ent)
    lp = torch.cat(lps, 1)  # (B, T)
    return (lp, torch.cat(ents, 1)) if with_entropy else lp


def _logprob_entropy(lf, y, with_entropy, entropy_grad):
    """float32 logits (..., V), tokens (...) -> log p of the tokens (...), entropy (...) or None."""
    lse = lf.logsumexp(-1)
    lp = lf.gather(-1, y[..., None]).squeeze(-1) - lse  # log p = z_y − logsumexp(z)
    if not with_entropy:
        return lp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return lp, lse - (lf.softmax(-1) * lf).sum(-1)  # H = logsumexp(z) − Σ p·z


def _sparse_logprobs(logits, input_ids, targets, with_entropy, entropy_grad, chunk, temperature):
    scored = F.pad(targets[:, 1:], (1, 0))  # (B, T): the targets, position 0 excepted (nothing predicts it)
    y = input_ids[scored]  # (N,): the n-th predicted token, in the order of predictors(targets)
    chunk = chunk or max(1, 2**23 // logits.shape[-1])  # ~32 MB of float32 per chunk
    if with_entropy and entropy_grad and torch.is_grad_enabled():  # an entropy bonus: plain autograd, chunk by chunk
        parts = [_logprob_entropy(logits[i:i + chunk].float() / temperature, y[i:i + chunk], True, True)
                 for i in range(0, len(y), chunk)]
        lp, ent = (torch.cat([p[k] for p in parts]) if parts else logits.new_zeros(0).float() for k in (0, 1))
    else:
        lp, ent = SelectedLogprobs.apply(logits, y, temperature, chunk, with_entropy)  # (N,), (N,) or None
    zeros = torch.zeros(scored.shape, device=logits.device)
    lp = zeros.masked_scatter(scored, lp)  # (B, T)
    return (lp, zeros.masked_scatter(scored, ent)) if with_entropy else lp


class SelectedLogprobs(torch.autograd.Function):
    """logits (N, V), tokens y (N,) -> log softmax(logits / T)[y] (N,) [, entropy (N,), no gradient], `chunk` rows at
    a time in float32. Memory: autograd through the plain ops keeps each chunk's float32 logits and builds a full
    (N, V) gradient per chunk; this keeps only the logits it was given and writes one (N, V) gradient, chunk by
    chunk, from the closed form  ∂ log p_y / ∂z_j = (1[j = y] − p_j) / T. Measured on SmolLM2 (49,152 words), one
    2 x 1,000-token micro-batch with 800 action tokens, forward + backward: peak +1,045 MB -> +583 MB (+470 MB
    without any log-probs), and 17.1 -> 14.8 s."""
    @staticmethod
    def forward(ctx, logits, y, temperature, chunk, with_entropy):
        lps, ents = [], []
        for i in range(0, len(y), chunk):
            lp, ent = _logprob_entropy(logits[i:i + chunk].float() / temperature, y[i:i + chunk], with_entropy, False)
            lps.append(lp)  # (c,)
            ents += [ent] if with_entropy else []
        ctx.save_for_backward(logits, y)
        ctx.temperature, ctx.chunk = temperature, chunk
        empty = logits.new_zeros(0, dtype=torch.float32)
        lp, ent = torch.cat(lps) if lps else empty, (torch.cat(ents) if ents else empty) if with_entropy else None
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):  # grad_lp (N,) -> ∂L/∂logits (N, V), in the logits' dtype
        logits, y = ctx.saved_tensors
        T, grad = ctx.temperature, torch.empty_like(logits)
        for i in range(0, len(y), ctx.chunk):
            p = (logits[i:i + ctx.chunk].float() / T).softmax(-1)  # (c, V)
            onehot_minus_p = p.neg_().scatter_add_(-1, y[i:i + ctx.chunk, None], p.new_ones(len(p), 1))
            grad[i:i + ctx.chunk] = onehot_minus_p.mul_(grad_lp[i:i + ctx.chunk, None] / T)
        return grad, None, None, None, None
