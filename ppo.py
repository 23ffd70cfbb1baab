"""Step-grained PPO for StepTool (arXiv 2410.07745). train.py calls `ppo_update(policy, optimizer, batch, cfg)`
once per iteration on a batch from batching.collate; advantages.py turns its rewards into advantages.
    ∇J ≈ E[ Σ_t Â_t · Σ_i ∇ log π_θ(a_t^i | s_t, a_t^{<i}) ]   every token of step t shares the step's Â_t
    L = −min(ρ·Â, clip(ρ, 1−ε, 1+ε)·Â) + c_v·½(V − G)² − c_H·H,   ρ = π_θ(a|s) / π_old(a|s) per action token
Implementation choices not in the paper (each a flag or a comment at the code):
 1. The advantages and their own choices (whitening, the KL in the reward, where V(s_t) is read, the released
    code's token-level GAE, critic-free step groups): advantages.py.
 2. No value clipping by default (`vf_clip` 0): ½·(V−G)². The authors (TRL, PPO2 baselines) clip at 0.2 in
    reward units, v_loss = ½·max((V−G)², (V_clip−G)²), which caps V's move per iteration at 0.2 whatever the
    critic's learning rate; StepTool's returns reach ~4 on G3 (final-reward ones at most 1), so the clip kept its
    critic lagging longest (README, deviations). `--vf-clip 0.2` restores it.
 3. KL: −β·k1 in the reward by default (advantages.py); `kl_in_loss`: +β·k3 in the loss instead (GRPO,
    Schulman's k3, k3 = e^(ref−new) − (ref−new) − 1).
 4. Token aggregation (token mean, as TRL/CleanRL): each loss term is Σ over action tokens / the action-token
    count of the whole optimizer mini-batch, so gradient accumulation over micro-batches is exact; long steps
    weigh more than short ones (a per-step mean would not).
 5. V is trained where the advantage reads it: in step mode only at the state before each step (one sample per
    step, on G_t, the numbers the advantage uses); in token mode on every action token. `value_mask`.
 6. Old log-probs are recomputed under the current policy before the update: equal to the sampling log-probs
    at temperature 1 up to numerics, right for any temperature; `use_sampling_logprobs` keeps the rollout's.
Data parallel: ppo.py never imports distributed.py. Under torchrun distributed.wrap gives the policy three hooks,
`policy.data_parallel`: all_sum (counts and batch statistics over ranks), microbatches (with loss weights and
gradient-sync contexts), clip_grad_norm_ (the global norm); ONE_PROCESS, the default, does nothing.
float16 autocast gets a GradScaler made by ppo_update; for any other dtype the scaler is disabled, the identity.
Shapes: B batch (episodes), T tokens, S steps, V vocabulary, b and L a micro-batch's rows and longest row.
"""
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from advantages import compute_advantages, masked_mean, one_process_sum, state_values
from batching import pack_microbatches, padding_fraction, predictors, token_logprobs


@dataclass
class PPOConfig:
    gamma: float = 0.99
    """discount γ over steps (step mode) or tokens (token mode); authors 0.99"""
    lam: float = 0.95
    """GAE λ; authors 0.95"""
    clip_eps: float = 0.2
    """ratio clip ε of the surrogate; authors 0.2"""
    vf_clip: float = 0.0
    """value clip around the old value, in reward units; 0 = off (default, contract 2); authors 0.2"""
    vf_coef: float = 0.1
    """value-loss coefficient; authors 0.1"""
    ent_coef: float = 0.0
    """entropy bonus coefficient; authors 0 (TRL has none)"""
    kl_coef: float = 0.1
    """β of the KL to the reference policy (fixed; authors: adaptive from 0.3)"""
    kl_in_loss: bool = False
    """False: −β·k1 in the reward (paper, TRL); True: +β·k3 as a loss term"""
    ppo_epochs: int = 2
    """passes over the batch per iteration; authors 4"""
    minibatches: int = 4
    """optimizer steps per epoch (authors: batch 8, mini-batch 2 -> 4)"""
    token_budget: int = 4096
    """max padded tokens (rows x longest row) per micro-batch; bounds activation memory"""
    max_padding: float = 0.1
    """max share of a micro-batch's slots that are padding: a row that would pad more starts a micro-batch of its own
    (exact: the same mini-batches, other sums; 1.0 = pack by token budget only)"""
    length_multiple: int = 1
    """cut each micro-batch to a length (after the shared prefix) rounded up to a multiple of this: right padding,
    exact in float32 (SmolLM2: 2e-5), in bf16 the rounding noise any other grouping has. On a CPU, oneDNN compiles
    and keeps a kernel per matmul shape, ~30 MB per new length on SmolLM2: repeated lengths reuse them"""
    action_logits_only: bool = True
    """run the LM head only at positions that predict an action token (exact; a speed switch)"""
    prefix_per_step: bool = True
    """one process: run the shared prompt once per optimizer step and once for pass (1), not once per micro-batch
    (exact; a speed switch; needs policy.share_prefix, as model.PolicyWithValue has)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    advantage: str = "step"
    """step: GAE over tool steps (paper); token: token-level GAE (authors' code); step-group: critic-free,
    returns normalised over steps from the same state in a group of rollouts of one task (GiGPO-style)"""
    token_gae: str = "trl"
    """token mode: trl counts observation tokens as time steps (authors, default); skip: veRL's GAE"""
    whiten: bool = True
    """whiten advantages over the batch (advantages.py contract 1)"""
    authors_reward_scaling: bool = False
    """multiply step t's reward by (T−1−t) as the released code does (final reward -> 0)"""
    use_sampling_logprobs: bool = False
    """use batch["old_logprobs"] from the rollout instead of recomputing them (contract 6)"""


class OneProcess:
    """ppo_update's data-parallel hooks in a single process: nothing to do. distributed.DataParallel has the same
    three members for N ranks (see the contract); ppo_update uses `policy.data_parallel` when the policy has one."""
    all_sum = staticmethod(one_process_sum)  # Σ over ranks of a token count or a batch statistic
    # the micro-batches to run, each with its loss weight and its gradient-sync context
    microbatches = staticmethod(lambda groups: [(group, 1.0, nullcontext()) for group in groups])
    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)  # -> the global norm, before clipping


ONE_PROCESS = OneProcess()


def value_mask(batch, cfg):
    """Where the value loss applies, in token positions of state_values (contract 5): (B, T) bool. Nowhere under
    step-group, which has no critic (its value loss is 0, not a loss of zeros against the returns)."""
    if cfg.advantage == "step-group":
        return torch.zeros_like(batch["action_mask"])
    if cfg.advantage == "token":
        return batch["action_mask"]
    start = torch.where(batch["step_mask"], batch["step_start"], 0)  # position 0 is never a step start
    hits = torch.zeros_like(batch["action_mask"], dtype=torch.float32)
    return hits.scatter_add_(1, start, batch["step_mask"].float()) > 0  # first action token of each step


def ppo_loss(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, entropy, action_mask, cfg,
             normaliser, value_mask=None, value_normaliser=None, ref_logprobs=None):
    """Clipped PPO loss of one micro-batch: each term Σ over its tokens / the mini-batch's token count. Inputs
    (B, T); values are state_values (token-aligned); value_mask/value_normaliser default to the action ones.
    Returns (loss, dict of detached tensors) that sum over the micro-batches of a mini-batch to its means."""
    value_mask, value_normaliser = (action_mask, normaliser) if value_mask is None else (value_mask, value_normaliser)

    def total(x, mask, n):  # where, not *: a masked-out inf/nan must not reach the sum or its gradient
        return torch.where(mask, x, 0.0).sum() / n

    logratio = torch.where(action_mask, new_logprobs - old_logprobs, 0.0)
    ratio = logratio.exp()  # π_θ(a|s) / π_old(a|s) per token
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
    pg_loss = total(torch.max(pg_loss1, pg_loss2), action_mask, normaliser)  # −min(ρÂ, clip(ρ)Â)
    v_clipped = old_values + (new_values - old_values).clamp(-cfg.vf_clip, cfg.vf_clip) if cfg.vf_clip > 0 else \
        new_values
    v_loss = 0.5 * total(torch.max((new_values - returns) ** 2, (v_clipped - returns) ** 2), value_mask,
                         value_normaliser)
    entropy_loss = total(entropy, action_mask, normaliser)
    loss = pg_loss - cfg.ent_coef * entropy_loss + cfg.vf_coef * v_loss
    stats = {"pg_loss": pg_loss, "v_loss": v_loss, "entropy": entropy_loss}
    if cfg.kl_in_loss and ref_logprobs is not None:  # k3 = e^(ref−new) − (ref−new) − 1 ≥ 0
        d = torch.where(action_mask, ref_logprobs - new_logprobs, 0.0)
        kl_loss = total(d.exp() - d - 1, action_mask, normaliser)
        loss = loss + cfg.kl_coef * kl_loss
        stats["kl_loss"] = kl_loss
    with torch.no_grad():
        stats["approx_kl"] = total((ratio - 1) - logratio, action_mask, normaliser)  # k3 of KL(old ‖ new)
        stats["clipfrac"] = total(((ratio - 1).abs() > cfg.clip_eps).float(), action_mask, normaliser)
    return loss, {k: v.detach() for k, v in stats.items()}


def policy_forward(policy, batch, idx, L, cfg, temperature, with_entropy=False):
    """The policy on the episodes idx (b,), cut to their longest length L -> log π (b, L) [, entropy H (b, L)],
    V (b, L). π = softmax(logits / temperature), the distribution the rollout sampled."""
    ids = batch["input_ids"][idx, :L]  # (b, L)
    targets = batch["action_mask"][idx, :L] if cfg.action_logits_only else None  # None: the LM head everywhere
    logits, v = policy(ids, batch["attention_mask"][idx, :L], prefix_len=batch.get("prefix_len", 0),
                       logits_at=None if targets is None else predictors(targets))  # (N, V) or (b, L, V); (b, L)
    out = token_logprobs(logits, ids, with_entropy, cfg.ent_coef > 0, targets=targets, temperature=temperature)
    return (*out, v.float()) if with_entropy else (out, v.float())


@torch.no_grad()
def old_policy_pass(policy, batch, microbatches, cfg, temperature, reference_logprobs_fn, autocast, shared_prefix):
    """Pass (1) of an update: log π_old, V_old (B, T) and log π_ref (B, T) (None without a reference), one
    micro-batch (idx, L) at a time. With use_sampling_logprobs, log π_old is the rollout's and the policy runs for
    V_old only (no LM head)."""
    shape, dev, P = batch["input_ids"].shape, batch["input_ids"].device, batch.get("prefix_len", 0)
    sampled = cfg.use_sampling_logprobs
    old_lp = batch["old_logprobs"].float() if sampled else torch.zeros(shape, device=dev)
    values = torch.zeros(shape, device=dev)
    ref_lp = torch.zeros(shape, device=dev) if reference_logprobs_fn else None
    with shared_prefix():                            # the prompt once for the whole pass (one process)
        for idx, L in microbatches:
            ids, att, am = (batch[k][idx, :L] for k in ("input_ids", "attention_mask", "action_mask"))  # (b, L)
            with autocast:
                if sampled:
                    values[idx, :L] = policy(ids, att, prefix_len=P, logits_at=torch.zeros_like(am))[1].float()
                else:
                    old_lp[idx, :L], values[idx, :L] = policy_forward(policy, batch, idx, L, cfg, temperature)
                if ref_lp is not None:
                    ref_lp[idx, :L] = reference_logprobs_fn(ids, att, prefix_len=P,
                                                            targets=am if cfg.action_logits_only else None)
    return old_lp, values, ref_lp


def clip_and_step(optimizer, scaler, clip_grad_norm_, max_grad_norm, loss):
    """Unscale (float16), clip each optimizer group's gradient on its own norm, and step unless the loss or a norm
    is not finite. -> (the first group's (the policy's) norm before clipping, whether the step was taken)."""
    scaler.unscale_(optimizer)
    # Per group, actor then critic (FSDP: their shards): a large early critic gradient does not shrink the policy step.
    norms = torch.stack([clip_grad_norm_(group["params"], max_grad_norm) for group in optimizer.param_groups])
    # Numerical guard, the one host sync per optimizer step: never apply a non-finite update (global: the same
    # decision on every rank; float16's loss scale follows it, as an FSDP rank sees only its shard).
    finite = bool(torch.isfinite(norms).all() & torch.isfinite(loss))
    if finite:
        scaler.step(optimizer)
    scaler.update(None if finite else scaler.get_scale() / 2)  # / 2: GradScaler's default back-off
    optimizer.zero_grad(set_to_none=True)
    return norms[0], finite


def explained_variance(returns, values, mask, all_sum=one_process_sum):
    """1 − Var(G − V) / Var(G) over the masked positions: 1 when the critic predicts the returns, ≤ 0 when it does
    no better than their mean."""
    var = lambda x: masked_mean((x - masked_mean(x, mask, all_sum)) ** 2, mask, all_sum)  # noqa: E731
    return 1 - var(returns - values) / var(returns).clamp(min=1e-8)


def ppo_update(policy, optimizer, batch, cfg, reference_logprobs_fn=None, autocast_dtype=None, device_type="cpu",
               generator=None, temperature=1.0):
    """One PPO iteration on a batch from batching.collate. policy(input_ids, attention_mask, prefix_len, logits_at)
    -> (logits (B, T, V) or (N, V) at logits_at, values (B, T)) as model.PolicyWithValue;
    reference_logprobs_fn(input_ids, attention_mask, prefix_len, targets) -> log π_ref (B, T). `temperature`: the
    rollouts' sampling temperature, so π is softmax(logits / T), the distribution that was sampled. `generator`
    shuffles the mini-batches (a fixed seed if None). Returns floats, read from the device once."""
    t0, am, dev = time.perf_counter(), batch["action_mask"], batch["input_ids"].device
    lengths = batch["attention_mask"].sum(1).tolist()  # one host read: right padding, row i is real on [0, lengths[i])
    P = batch.get("prefix_len", 0)  # tokens every row shares (the system prompt): one forward per micro-batch
    dp = getattr(policy, "data_parallel", ONE_PROCESS)  # N ranks: distributed.DataParallel (contract)
    autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    scaler = torch.amp.GradScaler(device_type, enabled=autocast_dtype == torch.float16)  # float16 only (contract)

    def microbatches(rows):  # [(rows, loss weight, gradient-sync context)], packed by the tokens a forward processes
        groups = pack_microbatches([lengths[i] - P for i in rows], cfg.token_budget, cfg.max_padding)  # prefix once
        return dp.microbatches([[rows[j] for j in g] for g in groups])

    def shared_prefix():  # one process: the prompt every row shares, run once for a group of micro-batches
        if not (P and cfg.prefix_per_step and dp is ONE_PROCESS and hasattr(policy, "share_prefix")):
            return nullcontext()  # else once per micro-batch, inside the policy's forward
        with autocast:
            return policy.share_prefix(batch["input_ids"][:1, :P])  # on leaving: its gradient, in one backward

    def cut(rows):  # -> the rows as an index (b,) and their longest length L (rounded): tensors are cut to [idx, :L]
        m, L = cfg.length_multiple, max(lengths[i] for i in rows)
        rounded = P + -(-(L - P) // m) * m  # P + ⌈(L − P) / m⌉·m, at most the batch's width
        return torch.tensor(rows, device=dev), min(rounded, batch["input_ids"].shape[1])

    # (1) log π_old, V_old and log π_ref (B, T), without gradients
    whole_batch = [cut(rows) for rows, _, _ in microbatches(list(range(len(lengths))))]
    old_lp, values, ref_lp = old_policy_pass(policy, batch, whole_batch, cfg, temperature, reference_logprobs_fn,
                                             autocast, shared_prefix)

    # (2) advantages Â and returns G (B, T); V_old as state values; vmask: where the value loss applies
    adv, ret, adv_stats = compute_advantages(batch, values, old_lp, ref_lp, cfg, dp.all_sum)
    old_v, vmask = state_values(values), value_mask(batch, cfg)

    # (3) epochs × shuffled mini-batches (one optimizer step each) × micro-batches (gradient accumulation)
    gen, kept, packed, widths, n_steps = generator or torch.Generator().manual_seed(0), [], [], [], 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(len(lengths), generator=gen, device=gen.device).tolist()
        for mini in [perm[k::cfg.minibatches] for k in range(min(cfg.minibatches, len(perm)))]:
            n_tok, n_val = dp.all_sum(torch.stack([am[mini].sum(), vmask[mini].sum()])).clamp(min=1)  # contract 4
            sums = {}  # this optimizer step's statistics, summed over its micro-batches
            with shared_prefix():
                for rows, weight, grad_sync in microbatches(mini):
                    idx, L = cut(rows)
                    with grad_sync:
                        with autocast:
                            new_lp, ent, v = policy_forward(policy, batch, idx, L, cfg, temperature, with_entropy=True)
                        loss, st = ppo_loss(new_lp, old_lp[idx, :L], adv[idx, :L], state_values(v), old_v[idx, :L],
                                            ret[idx, :L], ent, am[idx, :L], cfg, n_tok, vmask[idx, :L], n_val,
                                            None if ref_lp is None else ref_lp[idx, :L])
                        scaler.scale(loss * weight).backward()
                    if weight:  # weight 0: an FSDP lock-step repeat, not data
                        packed.append(rows), widths.append(L - P)
                        sums = {k: sums.get(k, 0.0) + x for k, x in ({"loss": loss.detach()} | st).items()}
            step = dict(zip(sums, dp.all_sum(torch.stack(list(sums.values())))))  # ...and over ranks
            step["grad_norm"], finite = clip_and_step(optimizer, scaler, dp.clip_grad_norm_, cfg.max_grad_norm,
                                                      step["loss"])
            kept += [step] if finite else []
            n_steps += 1

    # (4) statistics: means over the optimizer steps taken, read from the device in one transfer
    stats = {k: sum(s[k] for s in kept) / len(kept) if kept else float("nan") for k in step} | adv_stats
    no_critic = cfg.advantage == "step-group"
    stats["explained_variance"] = float("nan") if no_critic else explained_variance(ret, old_v, vmask, dp.all_sum)
    out = dict(zip(stats, torch.stack([torch.as_tensor(x, device=dev).float() for x in stats.values()]).tolist()))
    return out | dict(skipped_steps=n_steps - len(kept), optimizer_steps=n_steps,
                      padding_fraction=padding_fraction([n - P for n in lengths], packed, widths),
                      tokens_per_s=sum(lengths) * (1 + cfg.ppo_epochs) / (time.perf_counter() - t0))
