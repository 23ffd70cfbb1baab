"""Step-grained PPO for StepTool (arXiv 2410.07745). train.py calls `ppo_update(policy, optimizer, batch, cfg)`
once per iteration on a batch from batching.collate; the rest are the small pure functions it is built from.
    ∇J ≈ E[ Σ_t Â_t · Σ_i ∇ log π_θ(a_t^i | s_t, a_t^{<i}) ]   every token of step t shares the step's Â_t
    δ_t = r_t + γ·V(s_{t+1}) − V(s_t)  (V after the last step = 0),   Â_t = Σ_l (γλ)^l · δ_{t+l}
Implementation choices not in the paper (each a flag or a comment at the code):
 1. Advantage whitening over the batch (TRL, lm-human-preferences): over steps in step mode (one sample per
    step), over action tokens in token mode (as TRL). `whiten`.
 2. No value clipping by default (`vf_clip` 0): ½·(V−G)². The authors (TRL, PPO2 baselines) clip at 0.2 in
    reward units, v_loss = ½·max((V−G)², (V_clip−G)²), which caps V's move per iteration at 0.2 whatever the
    critic's learning rate; StepTool's returns reach ~4 on G3 (final-reward ones at most 1), so the clip kept its
    critic lagging longest (README, deviations). `--vf-clip 0.2` restores it.
 3. KL placement (Ziegler et al. / TRL, as the paper): k1 = log π_old − log π_ref per action token, subtracted
    from the reward (summed over each step's tokens in step mode). `kl_in_loss`: +β·k3 in the loss instead
    (GRPO, Schulman's k3). Fixed β; the authors use TRL's adaptive controller (initial 0.3).
 4. Token aggregation (token mean, as TRL/CleanRL): each loss term is Σ over action tokens / the action-token
    count of the whole optimizer mini-batch, so gradient accumulation over micro-batches is exact; long steps
    weigh more than short ones (a per-step mean would not).
 5. The value head at position p estimates the state after token p: V(s_t) is read at step_start−1; in step
    mode V is trained only there, on G_t (the numbers the advantage uses, one sample per step).
 6. Old log-probs are recomputed under the current policy before the update: equal to the sampling log-probs
    at temperature 1 up to numerics, right for any temperature; `use_sampling_logprobs` keeps the rollout's.
 7. The released code (PAPER.md 1-2) as flags: `advantage="token"` = TRL token-level GAE, each step's reward on
    its last action token, observation tokens counted as time steps (`token_gae="trl"`, default; "skip" is
    veRL's GAE over action tokens only); `authors_reward_scaling` multiplies step t's reward by
    (n_steps − 1 − t), which zeroes the final IsSolved reward.
Data parallel: ppo.py never imports distributed.py. Under torchrun distributed.wrap gives the policy three hooks,
`policy.data_parallel`: all_sum (counts and batch statistics over ranks), microbatches (with loss weights and
gradient-sync contexts), clip_grad_norm_ (the global norm); ONE_PROCESS, the default, does nothing.
float16 autocast gets a GradScaler made by ppo_update; for any other dtype the scaler is disabled, the identity.
Shapes: B batch (episodes), T tokens, S steps, V vocabulary.
"""
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    action_logits_only: bool = True
    """run the LM head only at positions that predict an action token (exact; a speed switch)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    advantage: str = "step"
    """step: GAE over tool steps (paper); token: token-level GAE (authors' code); step-group: critic-free,
    returns normalised over steps from the same state in a group of rollouts of one task (GiGPO-style)"""
    token_gae: str = "trl"
    """token mode: trl counts observation tokens as time steps (authors, default); skip: veRL's GAE"""
    whiten: bool = True
    """whiten advantages over the batch (see contract 1)"""
    authors_reward_scaling: bool = False
    """multiply step t's reward by (T−1−t) as the released code does (final reward -> 0)"""
    use_sampling_logprobs: bool = False
    """use batch["old_logprobs"] from the rollout instead of recomputing them (contract 6)"""


class OneProcess:
    """ppo_update's data-parallel hooks in a single process: nothing to do. distributed.DataParallel has the same
    three members for N ranks (see the contract); ppo_update uses `policy.data_parallel` when the policy has one."""
    all_sum = staticmethod(lambda x: x)  # Σ over ranks of a token count or a batch statistic
    # the micro-batches to run, each with its loss weight and its gradient-sync context
    microbatches = staticmethod(lambda groups: [(group, 1.0, nullcontext()) for group in groups])
    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)  # -> the global norm, before clipping


ONE_PROCESS = OneProcess()


def masked_mean(x, mask, all_sum=OneProcess.all_sum):
    """Mean over the masked elements of the whole batch: on N ranks, of every rank's batch (all_sum over ranks)."""
    total, count = all_sum(torch.stack([torch.where(mask, x, 0.0).sum(), mask.sum().to(x.dtype)]))
    if not count > 0:  # NOTE: host sync; only used once per batch, never per micro-batch
        raise ValueError("masked_mean: the mask selects no element (no action tokens or steps in the batch?)")
    return total / count


def masked_whiten(x, mask, shift_mean=True, all_sum=OneProcess.all_sum):
    """(x − mean) / std over the masked elements of the whole batch; shift_mean=False adds the mean back."""
    mean = masked_mean(x, mask, all_sum)
    out = (x - mean) * torch.rsqrt(masked_mean((x - mean) ** 2, mask, all_sum) + 1e-8)
    return torch.where(mask, out if shift_mean else out + mean, 0.0)


def step_gae(rewards, values, step_mask, gamma, lam):
    """GAE over the steps of each episode (step_mask must select a prefix of the S slots). -> Â (B, S), G (B, S)."""
    B, S = rewards.shape
    advantages = torch.zeros_like(values)
    last_gae, next_value = values.new_zeros(B), values.new_zeros(B)  # V after the last valid step = 0
    for s in reversed(range(S)):  # S is small: a reverse loop over steps, vectorized over the batch
        delta = rewards[:, s] + gamma * next_value - values[:, s]  # δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
        last_gae = torch.where(step_mask[:, s], delta + gamma * lam * last_gae, 0.0)  # Â_t = δ_t + γλ·Â_{t+1}
        next_value = torch.where(step_mask[:, s], values[:, s], 0.0)
        advantages[:, s] = last_gae
    return advantages, torch.where(step_mask, advantages + values, 0.0)  # returns G_t = Â_t + V(s_t)


def token_gae(rewards, values, mask, gamma, lam, skip_masked=False):
    """Token-level GAE -> Â (B, T), returns (B, T), 0 outside mask. skip_masked=False (TRL, authors, default of
    --advantage token): masked tokens get r = V = 0 but still count as time steps, so credit decays by γλ per
    observation token. True (veRL): only action tokens are time steps; next value = next action token's."""
    B, T = rewards.shape
    rewards, values = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    advantages = torch.zeros_like(values)
    last_gae, next_value = values.new_zeros(B), values.new_zeros(B)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * last_gae
        if skip_masked:  # carry the running estimate through masked tokens unchanged
            last_gae = torch.where(mask[:, t], gae, last_gae)
            next_value = torch.where(mask[:, t], values[:, t], next_value)
        else:
            last_gae, next_value = gae, values[:, t]
        advantages[:, t] = last_gae
    return torch.where(mask, advantages, 0.0), torch.where(mask, advantages + values, 0.0)


def step_to_token(step_values, step_id, action_mask):
    """Every action token of step t takes step_values[:, t]; 0 elsewhere. (B, S) -> (B, T)."""
    return torch.where(action_mask, step_values.gather(1, step_id.clamp(min=0)), 0.0)  # (B, T)


def values_at(values, index):
    """values (B, T) read at token positions index (B, S) -> (B, S)."""
    return values.gather(1, index.clamp(min=0))


def state_values(values):
    """V of the state before token t = value head at t−1 (its own convention, contract 5): (B, T) -> (B, T)."""
    return F.pad(values[:, :-1], (1, 0))


def authors_scaling(step_rewards, step_mask):
    """Released code (PAPER.md 1): r_t · (n_steps − 1 − t) for 0-based t; the final step's reward becomes 0."""
    t = torch.arange(step_rewards.shape[1], device=step_rewards.device)  # (S,)
    return torch.where(step_mask, step_rewards * (step_mask.sum(1, keepdim=True) - 1 - t), 0.0)


def place_step_rewards_on_tokens(step_rewards, step_end, step_mask, T):
    """Token mode: each step's reward on its last action token (one scatter). (B, S) -> (B, T)."""
    rewards = torch.where(step_mask, step_rewards, 0.0)
    return rewards.new_zeros(rewards.shape[0], T).scatter_add_(1, step_end.clamp(min=0), rewards)


def apply_kl_penalty(rewards, kl, beta, step_id=None):
    """r − β·KL per token: (B, T) − β·kl (B, T); with step_id per step: (B, S) − β·Σ_{i∈step t} kl_i.
    kl (B, T) must be 0 outside action tokens (k1 = log π_old − log π_ref, contract 3)."""
    if step_id is not None:
        kl = torch.zeros_like(rewards).scatter_add_(1, step_id.clamp(min=0), kl)  # (B, S)
    return rewards - beta * kl


def _step_advantages(batch, values, rewards, kl, beta, cfg, all_sum):
    r = apply_kl_penalty(rewards, kl, beta, batch["step_id"])  # (B, S)
    v = values_at(values, batch["step_start"] - 1)  # V(s_t): value head just before the step's first token
    adv, ret = step_gae(r, v, batch["step_mask"], cfg.gamma, cfg.lam)  # (B, S)
    adv = masked_whiten(adv, batch["step_mask"], all_sum=all_sum) if cfg.whiten else adv
    return [step_to_token(x, batch["step_id"], batch["action_mask"]) for x in (adv, ret)]


def _token_advantages(batch, values, rewards, kl, beta, cfg, all_sum):
    am = batch["action_mask"]
    r = place_step_rewards_on_tokens(rewards, batch["step_end"], batch["step_mask"], am.shape[1])
    r = apply_kl_penalty(r, kl, beta)  # (B, T)
    adv, ret = token_gae(r, state_values(values), am, cfg.gamma, cfg.lam, skip_masked=cfg.token_gae == "skip")
    return (masked_whiten(adv, am, all_sum=all_sum) if cfg.whiten else adv), ret


def discounted_returns(rewards, step_mask, gamma):
    """G_t = Σ_{i≥t} γ^{i−t} r_i over each episode's steps: (B, S) -> (B, S)."""
    returns, running = torch.zeros_like(rewards), rewards.new_zeros(rewards.shape[0])
    for s in reversed(range(rewards.shape[1])):
        running = torch.where(step_mask[:, s], rewards[:, s] + gamma * running, 0.0)
        returns[:, s] = running
    return returns


def group_normalise(x, group, mask, eps=1e-6):
    """(x − mean) / (std + ε) of each masked element over the masked elements with the same group id; also the group
    sizes. x, group (long, ≥ 0), mask: same shape. A group of equal values gives 0, never NaN."""
    n = int(group.max()) + 1 if group.numel() else 1  # NOTE: host sync, once per batch
    ids, w = group.clamp(min=0).flatten(), mask.flatten().to(x.dtype)
    count = x.new_zeros(n).scatter_add_(0, ids, w)
    mean = x.new_zeros(n).scatter_add_(0, ids, x.flatten() * w) / count.clamp(min=1)
    var = x.new_zeros(n).scatter_add_(0, ids, (x.flatten() - mean[ids]) ** 2 * w) / count.clamp(min=1)
    out = (x.flatten() - mean[ids]) / (var[ids].sqrt() + eps)
    return torch.where(mask, out.view(x.shape), 0.0), count[ids].view(x.shape)


def step_group_advantages(rewards, step_mask, state_id, episode_group, gamma):
    """Critic-free step advantages (GiGPO's step-level groups, on StepTool's step rewards), (B, S):
        G_t = Σ_{i≥t} γ^{i−t} r_i                                    the step's return
        Â_t = (G_t − mean{G_t' : s_t' = s_t}) / std{G_t' : s_t' = s_t}   steps from the same state s_t (same task,
                                                                     same calls and observations so far), if ≥ 2
        Â_t = (G_0 − mean_group G_0) / std_group G_0                  otherwise: the episode's own return against
                                                                     the episodes of its task (GRPO)
    state_id (B, S) and episode_group (B,) are integer ids (rollout.collate)."""
    G = discounted_returns(rewards, step_mask, gamma)  # (B, S)
    by_state, n_same = group_normalise(G, state_id, step_mask)
    by_episode, _ = group_normalise(G[:, 0], episode_group, step_mask[:, 0])  # (B,)
    return torch.where(n_same >= 2, by_state, by_episode[:, None].expand_as(G)).where(step_mask, 0.0), G


def _step_group_advantages(batch, values, rewards, kl, beta, cfg, all_sum):
    r = apply_kl_penalty(rewards, kl, beta, batch["step_id"])  # (B, S); groups are normalised already: no whitening
    adv, ret = step_group_advantages(r, batch["step_mask"], batch["state_id"], batch["episode_group"], cfg.gamma)
    return [step_to_token(x, batch["step_id"], batch["action_mask"]) for x in (adv, ret)]


ADVANTAGES = {"step": _step_advantages, "token": _token_advantages, "step-group": _step_group_advantages}


def compute_advantages(batch, values, old_logprobs, ref_logprobs, cfg, all_sum=OneProcess.all_sum):
    """Rewards -> KL-penalised rewards -> GAE -> per-token advantages (B, T), returns (B, T), stats (tensors).

    values (B, T) is the raw value-head output; old/ref_logprobs (B, T) (ref None = no reference); all_sum makes the
    whitening and the stats global over data-parallel ranks."""
    if cfg.advantage not in ADVANTAGES or cfg.token_gae not in ("trl", "skip"):
        raise ValueError(f"advantage must be one of {list(ADVANTAGES)}, token_gae trl|skip; got {cfg}")
    am, step_mask = batch["action_mask"], batch["step_mask"]
    kl = torch.where(am, old_logprobs - ref_logprobs, 0.0) if ref_logprobs is not None else torch.zeros_like(values)
    rewards = torch.where(step_mask, batch["step_rewards"], 0.0)  # (B, S)
    if cfg.authors_reward_scaling:
        rewards = authors_scaling(rewards, step_mask)
    beta = 0.0 if cfg.kl_in_loss else cfg.kl_coef
    adv, ret = ADVANTAGES[cfg.advantage](batch, values.float(), rewards, kl, beta, cfg, all_sum)
    episode_return = batch["step_rewards"].where(step_mask, 0.0).sum(1)  # (B,)
    every_episode = torch.ones_like(episode_return).bool()
    stats = {"kl": masked_mean(kl, am, all_sum), "reward": masked_mean(episode_return, every_episode, all_sum)}
    return adv, ret, stats


def value_mask(batch, cfg):
    """Where the value loss applies, in token positions of state_values (contract 5): (B, T) bool."""
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


def ppo_update(policy, optimizer, batch, cfg, reference_logprobs_fn=None, autocast_dtype=None, device_type="cpu",
               generator=None, temperature=1.0):
    """One PPO iteration on a collated batch. policy(input_ids, attention_mask, prefix_len, logits_at) -> (logits
    (B, T, V) or (N, V) at logits_at, values (B, T)) as model.PolicyWithValue; reference_logprobs_fn(input_ids,
    attention_mask, prefix_len, targets) -> log π_ref (B, T). `temperature`: the rollouts' sampling temperature, so
    π is softmax(logits / T), the distribution that was sampled. `generator` shuffles the mini-batches (a fixed seed
    if None). Returns floats, read from the device once."""
    t0, dev = time.perf_counter(), batch["input_ids"].device
    am, att, ids = batch["action_mask"], batch["attention_mask"], batch["input_ids"]
    lengths = att.sum(1).tolist()  # one host read: right padding, row i is real on [0, lengths[i])
    P = batch.get("prefix_len", 0)  # tokens every row shares (the system prompt): one forward per micro-batch
    dp = getattr(policy, "data_parallel", ONE_PROCESS)  # N ranks: distributed.DataParallel (contract)
    autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    scaler = torch.amp.GradScaler(device_type, enabled=autocast_dtype == torch.float16)  # float16 only (contract)

    def rows(mb):  # a micro-batch: its row indices and its own longest length (trim the shared padding)
        return torch.tensor(mb, device=dev), max(lengths[i] for i in mb)

    def forward(idx, L, with_entropy=False):  # -> log π (b, L) [, entropy (b, L)], V (b, L) of micro-batch rows
        targets = am[idx, :L] if cfg.action_logits_only else None  # None: the LM head at every position
        logits, v = policy(ids[idx, :L], att[idx, :L], prefix_len=P,
                           logits_at=None if targets is None else predictors(targets))
        out = token_logprobs(logits / temperature, ids[idx, :L], with_entropy, cfg.ent_coef > 0, targets=targets)
        return (*out, v.float()) if with_entropy else (out, v.float())

    def pack(rows_):  # micro-batches by the tokens a forward really processes (the shared prefix counts once)
        return pack_microbatches([lengths[i] - P for i in rows_], cfg.token_budget)

    # (1) π_old, V_old and π_ref under no grad, micro-batch by micro-batch
    old_lp, values = torch.zeros(ids.shape, device=dev), torch.zeros(ids.shape, device=dev)  # (B, T)
    ref_lp = torch.zeros(ids.shape, device=dev) if reference_logprobs_fn else None
    with torch.no_grad():
        for mb, _, _ in dp.microbatches(pack(range(len(lengths)))):
            idx, L = rows(mb)
            with autocast:
                old_lp[idx, :L], values[idx, :L] = forward(idx, L)
                if ref_lp is not None:
                    ref_lp[idx, :L] = reference_logprobs_fn(ids[idx, :L], att[idx, :L], prefix_len=P,
                                                            targets=am[idx, :L] if cfg.action_logits_only else None)
    old_lp = batch["old_logprobs"].float() if cfg.use_sampling_logprobs else old_lp

    # (2) advantages and returns (B, T); the value loss applies where vmask is set
    adv, ret, adv_stats = compute_advantages(batch, values, old_lp, ref_lp, cfg, dp.all_sum)
    old_v, vmask = state_values(values), value_mask(batch, cfg)

    # (3) epochs × shuffled mini-batches (one optimizer step each) × micro-batches (gradient accumulation)
    gen = generator or torch.Generator().manual_seed(0)
    # What is stepped (FSDP: the shards), per optimizer group: actor, then critic. Each group's gradient is clipped
    # on its own norm, so a large early critic gradient does not shrink the policy's step.
    groups = [group["params"] for group in optimizer.param_groups]
    kept, packed, n_steps = [], [], 0  # kept: the statistics of the optimizer steps taken
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(len(lengths), generator=gen, device=gen.device).tolist()
        for mini in [perm[k::cfg.minibatches] for k in range(min(cfg.minibatches, len(perm)))]:
            n_tok, n_val = dp.all_sum(torch.stack([am[mini].sum(), vmask[mini].sum()])).clamp(min=1)  # contract 4
            micro = [[mini[j] for j in g] for g in pack(mini)]
            packed += micro
            sums = {}  # this optimizer step's statistics, summed over its micro-batches
            for mb, weight, grad_sync in dp.microbatches(micro):
                idx, L = rows(mb)
                with grad_sync:
                    with autocast:
                        new_lp, ent, v = forward(idx, L, with_entropy=True)  # (b, L) each
                    loss, st = ppo_loss(new_lp, old_lp[idx, :L], adv[idx, :L], state_values(v),
                                        old_v[idx, :L], ret[idx, :L], ent, am[idx, :L], cfg, n_tok,
                                        vmask[idx, :L], n_val, None if ref_lp is None else ref_lp[idx, :L])
                    scaler.scale(loss * weight).backward()
                if weight:  # weight 0: an FSDP lock-step repeat, not data
                    sums = {k: sums.get(k, 0.0) + x for k, x in ({"loss": loss.detach()} | st).items()}
            step = dict(zip(sums, dp.all_sum(torch.stack(list(sums.values())))))  # ...and over ranks
            scaler.unscale_(optimizer)
            norms = torch.stack([dp.clip_grad_norm_(g, cfg.max_grad_norm) for g in groups])  # before clipping
            step["grad_norm"] = norms[0]  # the policy's
            # Numerical guard, the one host sync per optimizer step: never apply a non-finite update (global: the
            # same decision on every rank; float16's loss scale follows it, as an FSDP rank sees only its shard).
            finite = bool(torch.isfinite(norms).all() & torch.isfinite(step["loss"]))
            if finite:
                scaler.step(optimizer)
                kept.append(step)
            scaler.update(None if finite else scaler.get_scale() / 2)  # / 2: GradScaler's default back-off
            optimizer.zero_grad(set_to_none=True)
            n_steps += 1

    # (4) statistics: means over the steps taken, and the explained variance 1 − Var(G − V) / Var(G)
    var = lambda x: masked_mean((x - masked_mean(x, vmask, dp.all_sum)) ** 2, vmask, dp.all_sum)  # noqa: E731
    stats = {k: sum(s[k] for s in kept) / len(kept) if kept else float("nan") for k in step} | adv_stats
    stats["explained_variance"] = 1 - var(ret - old_v) / var(ret).clamp(min=1e-8)
    out = dict(zip(stats, torch.stack([torch.as_tensor(x, device=dev).float() for x in stats.values()]).tolist()))
    return out | dict(skipped_steps=n_steps - len(kept), optimizer_steps=n_steps,
                      padding_fraction=padding_fraction([n - P for n in lengths], packed),
                      tokens_per_s=sum(lengths) * (1 + cfg.ppo_epochs) / (time.perf_counter() - t0))
