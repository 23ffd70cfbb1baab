"""From episodes to the tensors SFT and PPO train on, and from logits to per-token log-probabilities.

Who calls it: sft.py (the warm start's loss), ppo.py (π_old, π_θ and the micro-batches of an update), train.py (the
reference policy's log-probs, collating each iteration's episodes), advantages.py (the next-token shift).

Why a module of its own: SFT and PPO need the same four things, and neither should import the other for them:
 1. `collate`: a list of rollout.Episode, right-padded into (B, T) token tensors and (B, S) step tensors.
 2. `Microbatches`: rows grouped under a token budget (`pack_microbatches`), sorted by length so padding stays small,
    each micro-batch cut to its longest row. cpu_speed.SharedPromptMicrobatches is the same plan with the prompt every
    row shares run once.
 3. `predictors` / `after`: THE next-token shift (logits at t−1 predict token t; the value head at t−1 is the state
    before token t), in one place; token_logprobs, advantages.state_values and the value mask go through it.
 4. `token_logprobs`: log π of each token, gather minus logsumexp in chunks, never a float32 (B, T, V) log-softmax.

Shapes: B batch (episodes), T tokens, S steps, V vocabulary, N selected positions.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F


def collate(episodes: list, pad_id: int, device="cpu") -> dict:
    """Right-pad a list of rollout.Episode into the tensors ppo.py consumes (its contract and `ppo_update`'s
    docstring)."""
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
    return {k: v.to(device) for k, v in out.items()}


def pack_microbatches(lengths, token_budget, max_padding=1.0):
    """Group episode indices so each group's rows × longest row ≤ token_budget (a longer row goes alone) and at
    most `max_padding` of each group's slots are padding (so of all of them: 1.0 = no limit).

    Sorted by length (longest first) so rows of similar length share a group and padding stays small. A row that
    would pad its group beyond max_padding starts a new one: one more forward against fewer wasted slots."""
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


class Microbatches:
    """A batch's rows in micro-batches: grouped under a token budget by pack_microbatches (at most max_padding of
    each group's slots padding), each group cut to its longest row. ppo_update makes one per batch (`of_batch`),
    sft_train one per warm start (`of_episodes`). cpu_speed.SharedPromptMicrobatches has the same members."""

    def __init__(self, lengths: list[int], token_budget: int, max_padding: float = 1.0):
        self.lengths, self.token_budget, self.max_padding = lengths, token_budget, max_padding

    @classmethod
    def of_batch(cls, batch, cfg, dp=None, policy=None):
        """For ppo_update: the rows of a collated batch (right padding: row i is real on [0, lengths[i]))."""
        return cls(batch["attention_mask"].sum(1).tolist(), cfg.token_budget, cfg.max_padding)   # one host read

    @classmethod
    def of_episodes(cls, episodes, token_budget):
        return cls([len(ep.token_ids) for ep in episodes], token_budget)

    def width(self, rows) -> int:                    # the length a micro-batch of these rows is cut to
        return max(self.lengths[i] for i in rows)

    def __call__(self, rows, dp_microbatches=None) -> list:
        """[(rows, L, loss weight, gradient-sync context)]: `rows` packed into micro-batches, each cut to length L,
        through the data-parallel hook (ppo.OneProcess.microbatches: weight 1, no context) if one is given."""
        groups = [[rows[j] for j in g] for g in pack_microbatches([self.lengths[i] for i in rows], self.token_budget,
                                                                   self.max_padding)]
        with_sync = dp_microbatches(groups) if dp_microbatches else [(g, 1.0, nullcontext()) for g in groups]
        return [(g, self.width(g), weight, sync) for g, weight, sync in with_sync]

    def forwards(self, policy=None, autocast=None):
        """The scope of a group of forwards (a pass, or one optimizer step): nothing to share here."""
        return nullcontext()

    def padding_fraction(self, ran) -> float:       # ran: the (rows, L) of every micro-batch run
        return padding_fraction(self.lengths, [rows for rows, _ in ran], [L for _, L in ran])


def predictors(targets):
    """THE next-token shift: logits at position t−1 predict token t (position 0 has no predictor). (B, T) bool: the
    tokens to score -> (B, T) bool: the positions whose logits predict them. `after` is its inverse."""
    return F.pad(targets[:, 1:], (0, 1))


def after(x):
    """x (B, T) computed at every position -> (B, T) with x[:, t−1] at t, 0 at t = 0: what position t−1 says about
    token t (its log-prob), or the value head at t−1 as V of the state before token t. The inverse of `predictors`."""
    return F.pad(x[:, :-1], (1, 0))


def token_logprobs(logits, input_ids, with_entropy=False, entropy_grad=True, chunk=None, targets=None,
                   temperature=1.0):
    """log π(input_ids[:, t] | input_ids[:, <t]) for t ≥ 1, 0 at t = 0: (B, T) [and entropy H (B, T)], π =
    softmax(logits / temperature). Gather minus logsumexp, `chunk` positions at a time in float32: never a float32
    (B, T, V) log-softmax. With `targets` (B, T) bool, logits are (N, V), computed only at the N positions
    `predictors(targets)` selects (row-major order, model.Transformer(logits_to_keep=...)); tokens outside
    targets get 0, and the log-probs go through SelectedLogprobs (memory: see there)."""
    if targets is not None:
        return _sparse_logprobs(logits, input_ids, targets, with_entropy, entropy_grad, chunk, temperature)
    logits = logits / temperature if temperature != 1.0 else logits
    B, T, V = logits.shape
    chunk = chunk or max(1, 2**25 // (B * V))  # ~128 MB of float32 per chunk
    # THE shift (`predictors`, `after`): logits at t−1 predict token t; position 0 has none.
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
    scored = after(predictors(targets))  # (B, T): the targets, position 0 excepted (nothing predicts it)
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
    chunk, from the closed form  ∂ log p_y / ∂z_j = (1[j = y] − p_j) / T (docs/history.md §7: the peak it saves on SmolLM2)."""
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
