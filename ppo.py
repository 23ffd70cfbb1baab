"""Step-grained PPO for StepTool (arXiv 2410.07745). train.py calls `ppo_update(policy, optimizer, batch, cfg, adv_cfg)`
once per iteration on a batch from batching.collate; advantages.py turns its rewards into advantages.
    ∇J ≈ E[ Σ_t Â_t · Σ_i ∇ log π_θ(a_t^i | s_t, a_t^{<i}) ]   every token of step t shares the step's Â_t
    L = −min(ρ·Â, clip(ρ, 1−ε, 1+ε)·Â) + c_v·½(V − G)² − c_H·H,   ρ = π_θ(a|s) / π_old(a|s) per action token
The update reads as CleanRL's: (1) the old policy's pass, (2) advantages, (3) epochs × mini-batches (one optimizer
step each) × micro-batches (gradient accumulation), (4) statistics.
Implementation choices not in the paper (each a flag or a comment at the code):
 1. The advantages and their own choices (whitening, the KL in the reward, where V(s_t) is read, the released
    code's token-level GAE, critic-free step groups): advantages.py, with their settings (AdvantageConfig).
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
    step, on G_t, the numbers the advantage uses); in token mode on every action token (advantages.value_mask).
 6. Old log-probs are recomputed under the current policy before the update: equal to the sampling log-probs
    at temperature 1 up to numerics, right for any temperature; `use_sampling_logprobs` keeps the rollout's.
Data parallel: ppo.py never imports distributed.py. Under torchrun distributed.wrap gives the policy three hooks,
`policy.data_parallel`: all_sum (counts and batch statistics over ranks), microbatches (with loss weights and
gradient-sync contexts), clip_grad_norm_ (the global norm); ONE_PROCESS, the default, does nothing.
Speed: `microbatches` says how rows become micro-batches (batching.Microbatches); train.py passes
cpu_speed.SharedPromptMicrobatches under --cpu-speed, which runs the prompt every row shares once.
float16 autocast gets a GradScaler made by ppo_update; for any other dtype the scaler is disabled, the identity.
Shapes: B batch (episodes), T tokens, S steps, V vocabulary, b and L a micro-batch's rows and longest row.
"""
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from advantages import compute_advantages, masked_mean, one_process_sum, state_values, value_mask
from batching import Microbatches, predictors, token_logprobs


@dataclass
class PPOConfig:
    clip_eps: float = 0.2
    """ratio clip ε of the surrogate; authors 0.2"""
    vf_clip: float = 0.0
    """value clip around the old value, in reward units; 0 = off (default, contract 2); authors 0.2"""
    vf_coef: float = 0.1
    """value-loss coefficient; authors 0.1"""
    ent_coef: float = 0.0
    """entropy bonus coefficient; authors 0 (TRL has none)"""
    ppo_epochs: int = 2
    """passes over the batch per iteration; authors 4"""
    minibatches: int = 4
    """optimizer steps per epoch (authors: batch 8, mini-batch 2 -> 4)"""
    token_budget: int = 2048
    """max padded tokens (rows x longest row) per micro-batch; bounds activation memory"""
    max_padding: float = 0.1
    """max share of a micro-batch's slots that are padding: a row that would pad more starts a micro-batch of its own
    (exact: the same mini-batches, other sums; 1.0 = pack by token budget only)"""
    action_logits_only: bool = True
    """run the LM head only at positions that predict an action token (exact; less compute and memory)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip, per optimizer group (actor, critic)"""
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


@dataclass
class MicroBatch:
    """What the loss of one micro-batch reads: b rows cut to length L, each (b, L), and its mini-batch's counts."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    old_values: torch.Tensor              # V_old as state values (advantages.state_values)
    value_mask: torch.Tensor              # where the value loss applies (advantages.value_mask)
    ref_logprobs: torch.Tensor | None     # log π_ref (None: no reference)
    n_actions: torch.Tensor               # action tokens of the whole mini-batch, all ranks (contract 4)
    n_values: torch.Tensor                # value-loss positions of the whole mini-batch, all ranks

    @classmethod
    def cut(cls, data: dict, rows: list, L: int, n_actions, n_values) -> "MicroBatch":
        idx = torch.tensor(rows, device=data["input_ids"].device)
        return cls(**{k: None if v is None else v[idx, :L] for k, v in data.items()}, n_actions=n_actions,
                   n_values=n_values)


def ppo_loss(new_logprobs, new_values, entropy, mb: MicroBatch, cfg: PPOConfig, kl_coef=None):
    """Clipped PPO loss of one micro-batch: each term Σ over its tokens / the mini-batch's count (contract 4). Inputs
    (b, L); new_values are state values (token-aligned). kl_coef: β of the KL as a loss term (contract 3; None: the KL
    is in the reward). -> (loss, dict of detached tensors) that sum over a mini-batch's micro-batches to its means."""
    am, n = mb.action_mask, mb.n_actions

    def total(x, mask, count):  # where, not *: a masked-out inf/nan must not reach the sum or its gradient
        return torch.where(mask, x, 0.0).sum() / count

    logratio = torch.where(am, new_logprobs - mb.old_logprobs, 0.0)
    ratio = logratio.exp()  # π_θ(a|s) / π_old(a|s) per token
    pg_loss1 = -mb.advantages * ratio
    pg_loss2 = -mb.advantages * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
    pg_loss = total(torch.max(pg_loss1, pg_loss2), am, n)  # −min(ρÂ, clip(ρ)Â)
    v_clipped = mb.old_values + (new_values - mb.old_values).clamp(-cfg.vf_clip, cfg.vf_clip) if cfg.vf_clip > 0 \
        else new_values
    v_loss = 0.5 * total(torch.max((new_values - mb.returns) ** 2, (v_clipped - mb.returns) ** 2), mb.value_mask,
                         mb.n_values)
    entropy_loss = total(entropy, am, n)
    loss = pg_loss - cfg.ent_coef * entropy_loss + cfg.vf_coef * v_loss
    stats = {"pg_loss": pg_loss, "v_loss": v_loss, "entropy": entropy_loss}
    if kl_coef is not None and mb.ref_logprobs is not None:  # k3 = e^(ref−new) − (ref−new) − 1 ≥ 0
        d = torch.where(am, mb.ref_logprobs - new_logprobs, 0.0)
        kl_loss = total(d.exp() - d - 1, am, n)
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = kl_loss
    with torch.no_grad():
        stats["approx_kl"] = total((ratio - 1) - logratio, am, n)  # k3 of KL(old ‖ new)
        stats["clipfrac"] = total(((ratio - 1).abs() > cfg.clip_eps).float(), am, n)
    return loss, {k: v.detach() for k, v in stats.items()}


def policy_forward(policy, ids, att, am, cfg, temperature, with_entropy=False):
    """The policy on rows ids, att, am (b, L) -> log π (b, L) [, entropy H (b, L)], V (b, L). π = softmax(logits /
    temperature), the distribution the rollout sampled."""
    targets = am if cfg.action_logits_only else None  # None: the LM head everywhere
    logits, v = policy(ids, att, logits_at=None if targets is None else predictors(targets))  # (N, V) or (b, L, V)
    out = token_logprobs(logits, ids, with_entropy, cfg.ent_coef > 0, targets=targets, temperature=temperature)
    return (*out, v.float()) if with_entropy else (out, v.float())


@torch.no_grad()
def old_policy_pass(policy, batch, microbatches, forwards, cfg, temperature, autocast):
    """Pass (1) of an update: log π_old and V_old (B, T), one micro-batch (rows, L) at a time, inside `forwards` (the
    scope of the pass's forwards). With use_sampling_logprobs, log π_old is the rollout's and the policy runs for V_old
    only (no LM head)."""
    shape, dev, sampled = batch["input_ids"].shape, batch["input_ids"].device, cfg.use_sampling_logprobs
    old_lp = batch["old_logprobs"].float() if sampled else torch.zeros(shape, device=dev)
    values = torch.zeros(shape, device=dev)
    with forwards:
        for rows, L, _, _ in microbatches:
            idx = torch.tensor(rows, device=dev)
            ids, att, am = (batch[k][idx, :L] for k in ("input_ids", "attention_mask", "action_mask"))  # (b, L)
            with autocast:
                if sampled:
                    values[idx, :L] = policy(ids, att, logits_at=torch.zeros_like(am))[1].float()
                else:
                    old_lp[idx, :L], values[idx, :L] = policy_forward(policy, ids, att, am, cfg, temperature)
    return old_lp, values


@torch.no_grad()
def reference_pass(reference_logprobs_fn, batch, microbatches, forwards, cfg, autocast):
    """log π_ref (B, T) of the reference policy, one micro-batch (rows, L) at a time, inside `forwards`."""
    dev = batch["input_ids"].device
    ref_lp = torch.zeros(batch["input_ids"].shape, device=dev)
    with forwards:
        for rows, L, _, _ in microbatches:
            idx = torch.tensor(rows, device=dev)
            ids, att, am = (batch[k][idx, :L] for k in ("input_ids", "attention_mask", "action_mask"))  # (b, L)
            with autocast:
                ref_lp[idx, :L] = reference_logprobs_fn(ids, att, targets=am if cfg.action_logits_only else None)
    return ref_lp


def microbatch_loss(policy, mb: MicroBatch, cfg, temperature, autocast, kl_coef):
    """The policy's forward on one micro-batch (under autocast), then its loss."""
    with autocast:
        new_lp, entropy, v = policy_forward(policy, mb.input_ids, mb.attention_mask, mb.action_mask, cfg, temperature,
                                            with_entropy=True)
    return ppo_loss(new_lp, state_values(v), entropy, mb, cfg, kl_coef)


def within(scope, microbatches):
    """The micro-batches, with `scope` entered before the first and left after the last (cpu_speed: one optimizer
    step's shared prompt, computed once for all of them, its gradient added on leaving)."""
    with scope:
        yield from microbatches


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


def optimizer_step(optimizer, scaler, dp, cfg, sums):
    """One optimizer step on the accumulated gradients; its statistics (summed over its micro-batches, then over
    ranks) with the policy's gradient norm. -> (statistics, whether the step was taken)."""
    step = dict(zip(sums, dp.all_sum(torch.stack(list(sums.values())))))
    step["grad_norm"], finite = clip_and_step(optimizer, scaler, dp.clip_grad_norm_, cfg.max_grad_norm, step["loss"])
    return step, finite


def explained_variance(returns, values, mask, all_sum=one_process_sum):
    """1 − Var(G − V) / Var(G) over the masked positions: 1 when the critic predicts the returns, ≤ 0 when it does
    no better than their mean."""
    var = lambda x: masked_mean((x - masked_mean(x, mask, all_sum)) ** 2, mask, all_sum)  # noqa: E731
    return 1 - var(returns - values) / var(returns).clamp(min=1e-8)


def summary(steps, adv_stats, data, adv_cfg, dp):
    """Means over the optimizer steps taken, the advantages' statistics and the critic's explained variance, read
    from the device in one transfer. -> floats."""
    kept = [step for step, finite in steps if finite]
    stats = {k: sum(s[k] for s in kept) / len(kept) if kept else float("nan") for k in steps[-1][0]} | adv_stats
    stats["explained_variance"] = float("nan") if adv_cfg.advantage == "step-group" else explained_variance(
        data["returns"], data["old_values"], data["value_mask"], dp.all_sum)  # step-group: no critic
    dev = data["input_ids"].device
    out = dict(zip(stats, torch.stack([torch.as_tensor(x, device=dev).float() for x in stats.values()]).tolist()))
    return out | dict(skipped_steps=len(steps) - len(kept), optimizer_steps=len(steps))


def ppo_update(policy, optimizer, batch, cfg, adv_cfg, reference_logprobs_fn=None, autocast_dtype=None,
               device_type="cpu", generator=None, temperature=1.0, microbatches=Microbatches):
    """One PPO iteration on a batch from batching.collate: `cfg` PPO's settings, `adv_cfg` the advantages'.
    policy(input_ids, attention_mask, logits_at) -> (logits (B, T, V), or (N, V) at the positions logits_at (B, T)
    selects; values (B, T)), as model.PolicyWithValue; reference_logprobs_fn(input_ids, attention_mask, targets) ->
    log π_ref (B, T). `temperature`: the rollouts' sampling temperature (π is softmax(logits / T), what was sampled).
    `generator` shuffles the mini-batches (a fixed seed if None). Returns floats, read from the device once."""
    t0, B = time.perf_counter(), len(batch["input_ids"])
    dp = getattr(policy, "data_parallel", ONE_PROCESS)  # N ranks: distributed.DataParallel (contract)
    autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    scaler = torch.amp.GradScaler(device_type, enabled=autocast_dtype == torch.float16)  # float16 only (contract)
    plan = microbatches.of_batch(batch, cfg, dp, policy)  # rows -> micro-batches (rows, L, loss weight, grad sync)
    everyone = plan(list(range(B)), dp.microbatches)

    # (1) log π_old, V_old and log π_ref (B, T), without gradients
    old_lp, values = old_policy_pass(policy, batch, everyone, plan.forwards(policy, autocast), cfg, temperature,
                                     autocast)
    ref_lp = None if reference_logprobs_fn is None else reference_pass(reference_logprobs_fn, batch, everyone,
                                                                       plan.forwards(), cfg, autocast)

    # (2) advantages Â and returns G (B, T); V_old as state values; where the value loss applies (contract 5)
    adv, ret, adv_stats = compute_advantages(batch, values, old_lp, ref_lp, adv_cfg, dp.all_sum)
    data = {k: batch[k] for k in ("input_ids", "attention_mask", "action_mask")} | dict(
        old_logprobs=old_lp, advantages=adv, returns=ret, old_values=state_values(values),
        value_mask=value_mask(batch, adv_cfg), ref_logprobs=ref_lp)
    kl_coef = adv_cfg.kl_coef if adv_cfg.kl_in_loss else None  # the KL as a loss term (contract 3)

    # (3) epochs × shuffled mini-batches (one optimizer step each) × micro-batches (gradient accumulation)
    gen, steps, ran = generator or torch.Generator().manual_seed(0), [], []
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=gen, device=gen.device).tolist()
        for mini in [perm[k::cfg.minibatches] for k in range(min(cfg.minibatches, B))]:
            counts = torch.stack([data["action_mask"][mini].sum(), data["value_mask"][mini].sum()])
            n_actions, n_values = dp.all_sum(counts).clamp(min=1)  # over the whole mini-batch (contract 4)
            sums = {}  # this optimizer step's statistics, summed over its micro-batches
            for rows, L, weight, grad_sync in within(plan.forwards(policy, autocast), plan(mini, dp.microbatches)):
                with grad_sync:
                    mb = MicroBatch.cut(data, rows, L, n_actions, n_values)
                    loss, stats = microbatch_loss(policy, mb, cfg, temperature, autocast, kl_coef)
                    scaler.scale(loss * weight).backward()
                if weight:  # weight 0: an FSDP lock-step repeat, not data
                    ran.append((rows, L))
                    sums = {k: sums.get(k, 0.0) + x for k, x in ({"loss": loss.detach()} | stats).items()}
            steps.append(optimizer_step(optimizer, scaler, dp, cfg, sums))

    # (4) statistics: means over the optimizer steps taken, read from the device in one transfer
    return summary(steps, adv_stats, data, adv_cfg, dp) | dict(
        padding_fraction=plan.padding_fraction(ran),
        tokens_per_s=batch["attention_mask"].sum().item() * (1 + cfg.ppo_epochs) / (time.perf_counter() - t0))
