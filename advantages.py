"""Step-grained advantages for StepTool (arXiv 2410.07745, Sec. 3.2): from each step's reward and the critic's
values to an advantage Â and a return G on every action token. ppo.ppo_update calls `compute_advantages` and
`value_mask` once per update; the rest are the small pure functions they are built from; AdvantageConfig holds the
settings (flags --gamma, --lam, --advantage, ...).
    δ_t = r_t + γ·V(s_{t+1}) − V(s_t)  (V after the last step = 0),   Â_t = Σ_l (γλ)^l · δ_{t+l},   G_t = Â_t + V(s_t)
    every action token of step t takes its step's Â_t and G_t (the paper's step-grained optimisation)
Implementation choices not in the paper (each a flag or a comment at the code):
 1. Advantage whitening over the batch (TRL, lm-human-preferences): over steps in step mode (one sample per
    step), over action tokens in token mode (as TRL). `whiten`.
 2. KL placement (Ziegler et al. / TRL, as the paper): k1 = log π_old − log π_ref per action token, subtracted
    from the reward (summed over each step's tokens in step mode); with `kl_in_loss` β is 0 here and the KL is a
    loss term instead (ppo.py contract 3). Fixed β; the authors use TRL's adaptive controller (initial 0.3).
 3. The value head at position p estimates the state after token p: V(s_t), the state before step t's first action
    token, is `state_values` (the value head one token earlier: batching.after, the next-token shift) at step_start.
 4. The released code (PAPER.md 1-2) as flags: `advantage="token"` = TRL token-level GAE, each step's reward on
    its last action token, observation tokens counted as time steps (`token_gae="trl"`, default; "skip" is
    veRL's GAE over action tokens only); `authors_reward_scaling` multiplies step t's reward by
    (n_steps − 1 − t), which zeroes the final IsSolved reward.
 5. `advantage="step-group"`: no critic; returns normalised over the steps taken from the same state in a group
    of rollouts of one task (GiGPO's step-level groups, on StepTool's step rewards).
Data parallel: `all_sum` (Σ over ranks, from ppo_update) makes the whitening and the statistics global; in one
process it is the identity, `one_process_sum`.
Shapes: B batch (episodes), T tokens, S steps.
"""
from dataclasses import dataclass

import torch

from batching import after


@dataclass
class AdvantageConfig:
    gamma: float = 0.99
    """discount γ over steps (step mode) or tokens (token mode); authors 0.99"""
    lam: float = 0.95
    """GAE λ; authors 0.95"""
    advantage: str = "step"
    """step: GAE over tool steps (paper); token: token-level GAE (authors' code); step-group: critic-free,
    returns normalised over steps from the same state in a group of rollouts of one task (GiGPO-style)"""
    token_gae: str = "trl"
    """token mode: trl counts observation tokens as time steps (authors, default); skip: veRL's GAE"""
    whiten: bool = True
    """whiten advantages over the batch (contract 1)"""
    authors_reward_scaling: bool = False
    """multiply step t's reward by (T−1−t) as the released code does (final reward -> 0)"""
    kl_coef: float = 0.05
    """β of the KL to the reference policy (fixed; authors: adaptive from 0.3)"""
    kl_in_loss: bool = False
    """False: −β·k1 in the reward (paper, TRL; contract 2); True: +β·k3 as a loss term (ppo.py contract 3)"""


def one_process_sum(x):
    """Σ of x over data-parallel ranks when there is one rank: x itself."""
    return x


def masked_mean(x, mask, all_sum=one_process_sum):
    """Mean over the masked elements of the whole batch: on N ranks, of every rank's batch (all_sum over ranks)."""
    total, count = all_sum(torch.stack([torch.where(mask, x, 0.0).sum(), mask.sum().to(x.dtype)]))
    if not count > 0:  # NOTE: host sync; only used once per batch, never per micro-batch
        raise ValueError("masked_mean: the mask selects no element (no action tokens or steps in the batch?)")
    return total / count


def masked_whiten(x, mask, shift_mean=True, all_sum=one_process_sum):
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
    """V of the state before token t = value head at t−1 (contract 3; the next-token shift): (B, T) -> (B, T)."""
    return after(values)


def value_mask(batch, cfg: AdvantageConfig):
    """Where the value loss applies, in the positions of state_values (ppo.py contract 5): the state before each step
    (its first action token) in step mode, every action token in token mode, nowhere under step-group, which has no
    critic (its value loss is 0, not a loss of zeros against the returns). (B, T) bool."""
    if cfg.advantage == "step-group":
        return torch.zeros_like(batch["action_mask"])
    if cfg.advantage == "token":
        return batch["action_mask"]
    start = torch.where(batch["step_mask"], batch["step_start"], 0)  # position 0 is never a step start
    hits = torch.zeros_like(batch["action_mask"], dtype=torch.float32)
    return hits.scatter_add_(1, start, batch["step_mask"].float()) > 0  # first action token of each step


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
    kl (B, T) must be 0 outside action tokens (k1 = log π_old − log π_ref, contract 2)."""
    if step_id is not None:
        kl = torch.zeros_like(rewards).scatter_add_(1, step_id.clamp(min=0), kl)  # (B, S)
    return rewards - beta * kl


def _step_advantages(batch, values, rewards, kl, beta, cfg, all_sum):
    r = apply_kl_penalty(rewards, kl, beta, batch["step_id"])  # (B, S)
    v = values_at(state_values(values), batch["step_start"])  # V(s_t): the state before the step's first token
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
    state_id (B, S) and episode_group (B,) are integer ids (batching.collate)."""
    G = discounted_returns(rewards, step_mask, gamma)  # (B, S)
    by_state, n_same = group_normalise(G, state_id, step_mask)
    by_episode, _ = group_normalise(G[:, 0], episode_group, step_mask[:, 0])  # (B,)
    return torch.where(n_same >= 2, by_state, by_episode[:, None].expand_as(G)).where(step_mask, 0.0), G


def _step_group_advantages(batch, values, rewards, kl, beta, cfg, all_sum):
    r = apply_kl_penalty(rewards, kl, beta, batch["step_id"])  # (B, S); groups are normalised already: no whitening
    adv, ret = step_group_advantages(r, batch["step_mask"], batch["state_id"], batch["episode_group"], cfg.gamma)
    return [step_to_token(x, batch["step_id"], batch["action_mask"]) for x in (adv, ret)]


ADVANTAGES = {"step": _step_advantages, "token": _token_advantages, "step-group": _step_group_advantages}


def compute_advantages(batch, values, old_logprobs, ref_logprobs, cfg, all_sum=one_process_sum):
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
    # zero_advantage: the share of action tokens that teach nothing (step-group: a state whose rollouts all got the same
    # return; GAE: practically never)
    stats = {"kl": masked_mean(kl, am, all_sum), "reward": masked_mean(episode_return, every_episode, all_sum),
             "zero_advantage": masked_mean((adv.abs() < 1e-6).float(), am, all_sum)}
    return adv, ret, stats
