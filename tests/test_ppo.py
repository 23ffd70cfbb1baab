"""ppo.py, advantages.py and batching's log-probs and packing against independent references: plain-Python loops,
full log-softmax, numbers worked by hand."""
import copy
import math
import random
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import advantages
import batching
import ppo
from advantages import AdvantageConfig
from ppo import MicroBatch, PPOConfig


# ---------------------------------------------------------------- helpers (independent of the code under test)

def configs(**kw):
    """(PPOConfig, AdvantageConfig) from one set of keyword settings: each field name belongs to one of them."""
    adv = {k: kw.pop(k) for k in list(kw) if k in AdvantageConfig.__dataclass_fields__}
    return PPOConfig(**kw), AdvantageConfig(**adv)


def micro_batch(old, adv, old_v, ret, mask, n, value_mask=None, n_values=None, ref=None):
    """A MicroBatch for ppo_loss (token ids unused there); the value loss on the action tokens by default."""
    n = torch.as_tensor(n)
    return MicroBatch(None, None, mask, old, adv, ret, old_v, mask if value_mask is None else value_mask, ref, n,
                      n if n_values is None else torch.as_tensor(n_values))


def make_batch(episodes, step_rewards):
    """episodes: list of [(kind, tokens)] with kind in prompt|act|obs; step_rewards: list of per-step lists."""
    rows = []
    for segs in episodes:
        ids, act, sid, starts, ends, step = [], [], [], [], [], -1
        for kind, toks in segs:
            if kind == "act":
                step += 1
                starts.append(len(ids))
                ends.append(len(ids) + len(toks) - 1)
            ids += toks
            act += [kind == "act"] * len(toks)
            sid += [-1 if kind == "prompt" else step] * len(toks)
        rows.append((ids, act, sid, starts, ends))
    B, T, S = len(rows), max(len(r[0]) for r in rows), max(len(r[3]) for r in rows)
    b = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.zeros(B, T, dtype=torch.bool),
         "action_mask": torch.zeros(B, T, dtype=torch.bool), "step_id": torch.full((B, T), -1),
         "old_logprobs": torch.zeros(B, T), "step_rewards": torch.zeros(B, S),
         "step_mask": torch.zeros(B, S, dtype=torch.bool), "step_start": torch.zeros(B, S, dtype=torch.long),
         "step_end": torch.zeros(B, S, dtype=torch.long)}
    for i, (ids, act, sid, starts, ends) in enumerate(rows):
        n, s = len(ids), len(starts)
        b["input_ids"][i, :n] = torch.tensor(ids)
        b["attention_mask"][i, :n] = True
        b["action_mask"][i, :n] = torch.tensor(act)
        b["step_id"][i, :n] = torch.tensor(sid)
        b["step_rewards"][i, :s] = torch.tensor(step_rewards[i], dtype=torch.float32)
        b["step_mask"][i, :s] = True
        b["step_start"][i, :s] = torch.tensor(starts)
        b["step_end"][i, :s] = torch.tensor(ends)
    return b


class MockPolicy(nn.Module):
    """Per-position toy LM: the logits and value at position p depend only on token p."""

    def __init__(self, vocab=12, dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head, self.value = nn.Embedding(vocab, dim), nn.Linear(dim, vocab), nn.Linear(dim, 1)
        self.poison = False

    def forward(self, input_ids, attention_mask, logits_at=None):
        h = self.emb(input_ids)
        logits = self.head(h) * (float("nan") if self.poison else 1.0)
        return logits if logits_at is None else logits[logits_at], self.value(h).squeeze(-1)


def loop_gae(rewards, values, gamma, lam):
    """Textbook GAE on one list of time steps; V after the last step = 0."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        nv = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * nv - values[t] + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


# ---------------------------------------------------------------- advantages

def test_step_gae_matches_a_plain_python_loop_on_random_episodes_with_varying_step_counts():
    rng = random.Random(0)
    for _ in range(20):
        B, S = rng.randint(1, 5), rng.randint(1, 6)
        counts = [rng.randint(1, S) for _ in range(B)]
        r, v = torch.randn(B, S), torch.randn(B, S)
        mask = torch.tensor([[s < c for s in range(S)] for c in counts])
        r[~mask], v[~mask] = float("nan"), 123.0  # garbage in padded slots must not leak
        gamma, lam = rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)
        adv, ret = advantages.step_gae(r, v, mask, gamma, lam)
        for i, c in enumerate(counts):
            ea, er = loop_gae(r[i, :c].tolist(), v[i, :c].tolist(), gamma, lam)
            torch.testing.assert_close(adv[i, :c], torch.tensor(ea))
            torch.testing.assert_close(ret[i, :c], torch.tensor(er))
            assert adv[i, c:].eq(0).all() and ret[i, c:].eq(0).all()


def test_token_gae_counts_observation_tokens_as_time_steps_like_trl():
    torch.manual_seed(1)
    B, T, gamma, lam = 3, 17, 0.99, 0.95
    r, v, mask = torch.randn(B, T), torch.randn(B, T), torch.rand(B, T) > 0.4
    adv, ret = advantages.token_gae(r, v, mask, gamma, lam)
    for i in range(B):  # TRL: r and V zeroed on masked tokens, every position is a time step
        m = mask[i].float()
        ea, er = loop_gae((r[i] * m).tolist(), (v[i] * m).tolist(), gamma, lam)
        torch.testing.assert_close(adv[i], torch.tensor(ea) * m)
        torch.testing.assert_close(ret[i], torch.tensor(er) * m)


def test_token_gae_skipping_observation_tokens_matches_gae_over_action_tokens_only():
    torch.manual_seed(2)
    B, T, gamma, lam = 3, 17, 0.9, 0.8
    r, v, mask = torch.randn(B, T), torch.randn(B, T), torch.rand(B, T) > 0.4
    adv, ret = advantages.token_gae(r, v, mask, gamma, lam, skip_masked=True)
    for i in range(B):
        pos = mask[i].nonzero().flatten().tolist()
        ea, er = loop_gae(r[i, pos].tolist(), v[i, pos].tolist(), gamma, lam)
        torch.testing.assert_close(adv[i, pos], torch.tensor(ea))
        torch.testing.assert_close(ret[i, pos], torch.tensor(er))
        assert adv[i][~mask[i]].eq(0).all()


def test_step_mode_reads_v_before_each_steps_first_action_token_and_spreads_advantages_over_its_tokens():
    b = make_batch([[("prompt", [1, 2]), ("act", [3, 4]), ("obs", [5]), ("act", [6, 7, 8])]], [[0.5, 1.0]])
    values = torch.arange(8, dtype=torch.float32).view(1, 8) / 10  # value at position p = p / 10
    cfg = AdvantageConfig(whiten=False, gamma=0.9, lam=0.8)
    adv, ret, _ = advantages.compute_advantages(b, values, torch.zeros(1, 8), None, cfg)
    v1, v2 = 0.1, 0.4  # V(s_1) at position 1 (last prompt token), V(s_2) at position 4 (the observation)
    a2 = 1.0 - v2
    a1 = (0.5 + 0.9 * v2 - v1) + 0.9 * 0.8 * a2
    expected = torch.tensor([[0, 0, a1, a1, 0, a2, a2, a2]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.tensor([[0, 0, a1 + v1, a1 + v1, 0, a2 + v2, a2 + v2, a2 + v2]]))
    assert advantages.value_mask(b, cfg).tolist() == [[False, False, True, False, False, True, False, False]]


def test_kl_penalty_in_step_mode_sums_the_kl_of_the_steps_action_tokens():
    b = make_batch([[("prompt", [1]), ("act", [3, 4]), ("obs", [5]), ("act", [6])]], [[0.0, 1.0]])
    old = torch.tensor([[0.0, -1.0, -1.0, -9.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5, -2.0, -1.0, -3.0]])
    kl = torch.where(b["action_mask"], old - ref, 0.0)  # [0, .5, 1, 0(obs), 2]
    r = advantages.apply_kl_penalty(b["step_rewards"], kl, 0.1, b["step_id"])
    torch.testing.assert_close(r, torch.tensor([[-0.15, 0.8]]))
    torch.testing.assert_close(advantages.apply_kl_penalty(torch.zeros(1, 5), kl, 0.1), -0.1 * kl)


def test_authors_reward_scaling_multiplies_by_steps_left_so_the_final_reward_vanishes():
    rewards, mask = torch.tensor([[1.0, 0.5, 1.0], [0.5, 1.0, 0.0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    end = torch.tensor([[2, 5, 8], [1, 3, 0]])
    plain = advantages.place_step_rewards_on_tokens(rewards, end, mask, 10)
    scaled = advantages.place_step_rewards_on_tokens(advantages.authors_scaling(rewards, mask), end, mask, 10)
    assert plain[0, [2, 5, 8]].tolist() == [1.0, 0.5, 1.0] and plain.sum().item() == 4.0
    assert scaled[0, [2, 5, 8]].tolist() == [2.0, 0.5, 0.0]  # (T−1−t) = 2, 1, 0 with T = 3 steps
    assert scaled[1, [1, 3]].tolist() == [0.5, 0.0] and scaled[1].sum().item() == 0.5


def test_masked_helpers_raise_a_clear_error_on_an_empty_mask_and_whiten_over_the_batch():
    with pytest.raises(ValueError, match="no element"):
        advantages.masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    x, m = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]]), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    w = advantages.masked_whiten(x, m)
    sel = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(w[m], (sel - 3) / sel.var(unbiased=False).sqrt(), atol=1e-5, rtol=1e-5)
    assert w[0, 2] == 0
    torch.testing.assert_close(advantages.masked_whiten(x, m, shift_mean=False)[m], w[m] + 3)


# ---------------------------------------------------------------- log-probs

@pytest.mark.parametrize("chunk", [1, 2, 5, 6, 7, 100, None])
def test_token_logprobs_equal_log_softmax_gather_for_every_chunk_size(chunk):
    torch.manual_seed(3)
    logits, ids = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    lp, ent = batching.token_logprobs(logits, ids, with_entropy=True, chunk=chunk)
    ref = F.log_softmax(logits, -1)
    expected = torch.cat([torch.zeros(2, 1), ref[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)], 1)
    torch.testing.assert_close(lp, expected)
    expected_ent = torch.cat([torch.zeros(2, 1), -(ref.exp() * ref).sum(-1)[:, :-1]], 1)
    torch.testing.assert_close(ent, expected_ent)
    torch.testing.assert_close(batching.token_logprobs(logits, ids, chunk=chunk), expected)


def test_token_logprobs_of_bfloat16_logits_are_float32_and_a_single_token_gives_zero():
    torch.manual_seed(4)
    logits, ids = torch.randn(1, 5, 9).bfloat16(), torch.randint(0, 9, (1, 5))
    lp = batching.token_logprobs(logits, ids, chunk=2)
    assert lp.dtype == torch.float32
    ref = F.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp[:, 1:], ref)
    assert batching.token_logprobs(torch.randn(2, 1, 9), torch.zeros(2, 1, dtype=torch.long)).eq(0).all()


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selected_logprobs_values_and_gradient_equal_autograd_through_log_softmax(chunk, temperature):
    """The memory-saving path (targets given: logits (N, V) at the selected positions only, a hand-written backward)
    against plain autograd through log_softmax(z / T).gather, on a weighted sum of the log-probs."""
    torch.manual_seed(5)
    ids, targets = torch.randint(0, 13, (2, 6)), torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 1]]).bool()
    z = torch.randn(int(batching.predictors(targets).sum()), 13, requires_grad=True)        # (N, V)
    w = torch.randn(2, 6)
    lp, ent = batching.token_logprobs(z, ids, with_entropy=True, entropy_grad=False, chunk=chunk, targets=targets,
                                      temperature=temperature)
    (lp * w).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    ref = F.log_softmax(z_ref / temperature, -1)
    scored = F.pad(targets[:, 1:], (1, 0))                                     # the token each logit row predicts
    expected = torch.zeros(2, 6).masked_scatter(scored, ref.gather(-1, ids[scored][:, None])[:, 0])
    (expected * w).sum().backward()
    torch.testing.assert_close(lp, expected.detach())
    torch.testing.assert_close(z.grad, z_ref.grad)
    expected_ent = torch.zeros(2, 6).masked_scatter(scored, -(ref.exp() * ref).sum(-1).detach())
    torch.testing.assert_close(ent, expected_ent)
    assert not ent.requires_grad and lp.requires_grad


# ---------------------------------------------------------------- loss

def test_ppo_loss_on_a_hand_computed_two_token_example():
    mask = torch.tensor([[False, True, True, False]])
    old = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    new = old + torch.tensor([[0.0, math.log(1.5), math.log(0.9), 5.0]])  # ratios 1.5 and 0.9 on the actions
    adv = torch.tensor([[0.0, 1.0, -2.0, 0.0]])
    old_v, new_v = torch.tensor([[0.0, 0.5, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.1, 0.0]])
    ret, ent = torch.tensor([[0.0, 1.0, 1.0, 0.0]]), torch.tensor([[0.0, 2.0, 1.0, 7.0]])
    cfg = PPOConfig(clip_eps=0.2, vf_clip=0.2, vf_coef=0.1, ent_coef=0.01)
    loss, st = ppo.ppo_loss(new, new_v, ent, micro_batch(old, adv, old_v, ret, mask, 2.0), cfg)
    # token 1: max(−1·1.5, −1·1.2) = −1.2 (clipped); token 2: max(2·0.9, 2·0.9) = 1.8  -> (−1.2 + 1.8) / 2
    assert st["pg_loss"].item() == pytest.approx(0.3)
    # token 1: max((1−1)², (0.7−1)²) = 0.09 (value clipped to 0.5+0.2); token 2: (0.1−1)² = 0.81 -> ½·0.9/2
    assert st["v_loss"].item() == pytest.approx(0.225)
    assert st["entropy"].item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(0.3 + 0.1 * 0.225 - 0.01 * 1.5)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    assert st["approx_kl"].item() == pytest.approx(((0.5 - math.log(1.5)) + (-0.1 - math.log(0.9))) / 2)


def test_with_ratio_one_and_no_clipping_the_gradient_is_the_policy_gradient_estimate():
    torch.manual_seed(5)
    B, T, V = 2, 6, 7
    logits, ids = torch.randn(B, T, V, requires_grad=True), torch.randint(0, V, (B, T))
    mask, adv = torch.rand(B, T) > 0.3, torch.randn(B, T)
    mask[:, 0] = False
    new = batching.token_logprobs(logits, ids, chunk=4)
    cfg = PPOConfig(clip_eps=1e9, vf_coef=0.0, ent_coef=0.0)
    zeros = torch.zeros(B, T)
    n = mask.sum()
    loss, _ = ppo.ppo_loss(new, zeros, zeros, micro_batch(new.detach(), adv, zeros, zeros, mask, n), cfg)
    (g,) = torch.autograd.grad(loss, logits)
    logp = F.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # independent reference
    reference = -(adv[:, 1:] * logp * mask[:, 1:]).sum() / n  # −Σ Â·log π / N
    (g_ref,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("kl_in_loss", [False, True])
def test_observation_prompt_and_padding_tokens_receive_exactly_zero_gradient(kl_in_loss):
    b = make_batch([[("prompt", [1, 2]), ("act", [3, 4]), ("obs", [5, 6]), ("act", [7])],
                    [("prompt", [1]), ("act", [8])]], [[0.5, 1.0], [0.0]])
    B, T, V = 2, 7, 12
    logits, values = torch.randn(B, T, V, requires_grad=True), torch.randn(B, T, requires_grad=True)
    # garbage where the masks say "ignore": must not leak into the loss or its gradient
    old = torch.where(b["action_mask"], torch.randn(B, T), 1e4)
    ref = torch.where(b["action_mask"], torch.randn(B, T), -1e4)
    cfg, adv_cfg = configs(ent_coef=0.1, kl_in_loss=kl_in_loss, kl_coef=0.5)
    adv, ret, _ = advantages.compute_advantages(b, values.detach(), old, ref, adv_cfg)
    vm = advantages.value_mask(b, adv_cfg)
    new, ent = batching.token_logprobs(logits, b["input_ids"], with_entropy=True)
    old_v = advantages.state_values(values.detach()) + 0.05
    mb = micro_batch(old, adv, old_v, ret, b["action_mask"], b["action_mask"].sum(), vm, vm.sum(), ref)
    loss, _ = ppo.ppo_loss(new, advantages.state_values(values), ent, mb, cfg, 0.5 if kl_in_loss else None)
    loss.backward()
    predicts_action = F.pad(b["action_mask"][:, 1:], (0, 1))  # logits at p predict token p+1
    assert logits.grad[~predicts_action].eq(0).all() and logits.grad[predicts_action].abs().sum() > 0
    reads_state = F.pad(vm[:, 1:], (0, 1))  # value at p is V(s) of the step whose first token is p+1
    assert values.grad[~reads_state].eq(0).all() and values.grad[reads_state].ne(0).all()


# ---------------------------------------------------------------- packing

def greedy_unsorted(lengths, budget):
    groups = []
    for i, n in enumerate(lengths):
        g = groups[-1] if groups else None
        if g and (len(g) + 1) * max(n, max(lengths[j] for j in g)) <= budget:
            g.append(i)
        else:
            groups.append([i])
    return groups


def test_packing_puts_every_episode_in_exactly_one_microbatch_within_the_token_budget():
    rng = random.Random(6)
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(50, 1200)  # from "a row alone" to "several rows per micro-batch"
        mbs = batching.pack_microbatches(lengths, budget)
        assert sorted(i for mb in mbs for i in mb) == list(range(len(lengths)))
        for mb in mbs:
            assert len(mb) * max(lengths[i] for i in mb) <= budget or len(mb) == 1
        frac = batching.padding_fraction(lengths, mbs)
        assert 0.0 <= frac < 1.0


def test_sorted_packing_pads_less_than_packing_in_arrival_order():
    rng = random.Random(7)
    for _ in range(50):  # budgets that hold >= 4 rows: where sorting matters (with 1-2 rows either can win)
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(8, 64))]
        budget = rng.randint(1200, 4000)
        frac = batching.padding_fraction(lengths, batching.pack_microbatches(lengths, budget))
        assert frac <= batching.padding_fraction(lengths, greedy_unsorted(lengths, budget))


def test_max_padding_bounds_every_microbatch_and_the_limit_one_is_packing_by_budget_alone():
    rng = random.Random(8)
    for _ in range(100):
        lengths = [rng.randint(1, 1500) for _ in range(rng.randint(1, 40))]
        budget, limit = rng.randint(1500, 6000), rng.choice([0.0, 0.05, 0.1, 0.3])
        mbs = batching.pack_microbatches(lengths, budget, max_padding=limit)
        assert sorted(i for mb in mbs for i in mb) == list(range(len(lengths)))
        for mb in mbs:
            assert len(mb) * max(lengths[i] for i in mb) <= budget or len(mb) == 1
            assert batching.padding_fraction(lengths, [mb]) <= limit + 1e-12
        assert batching.pack_microbatches(lengths, budget, 1.0) == greedy_sorted(lengths, budget)
    # [100, 95, 60]: 100 and 95 pad 5 of 200 slots (2.5%); adding 60 would pad 45 of 300 (15%)
    assert batching.pack_microbatches([60, 100, 95], 1000, max_padding=0.1) == [[1, 2], [0]]
    assert batching.pack_microbatches([60, 100, 95], 1000, max_padding=1.0) == [[1, 2, 0]]


def greedy_sorted(lengths, budget):
    """The budget-only rule, written out: longest first, a row joins the open group while rows × longest fits."""
    groups = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def test_padding_fraction_is_zero_for_equal_lengths_and_counts_padded_slots_otherwise():
    assert batching.padding_fraction([4, 4, 4], [[0, 1, 2]]) == 0.0
    assert batching.padding_fraction([4, 2], [[0, 1]]) == pytest.approx(2 / 8)


# ---------------------------------------------------------------- the update

def bandit_batch(n=8):
    """After token 3 the policy acts 5 (reward 1) or 6 (reward 0); everything else is context."""
    eps = [[("prompt", [1, 2, 3]), ("act", [5 if i % 2 == 0 else 6, 9]), ("obs", [10, 11]), ("act", [4])]
           for i in range(n)]
    return make_batch(eps, [[1.0, 0.0] if i % 2 == 0 else [0.0, 0.0] for i in range(n)])


def logprob_of(policy, tok):
    with torch.no_grad():
        return F.log_softmax(policy(torch.tensor([[3]]), None)[0][0, 0], -1)[tok].item()


def test_ppo_update_raises_the_logprob_of_positive_advantage_actions():
    policy, b = MockPolicy(), bandit_batch()
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    before = logprob_of(policy, 5) - logprob_of(policy, 6)
    cfg = PPOConfig(ppo_epochs=2, minibatches=2, token_budget=16)
    for _ in range(5):
        stats = ppo.ppo_update(policy, opt, b, cfg, AdvantageConfig(),
                               reference_logprobs_fn=lambda i, a, **kw: torch.zeros(i.shape))
    assert logprob_of(policy, 5) - logprob_of(policy, 6) > before + 1.0
    assert stats["skipped_steps"] == 0 and stats["optimizer_steps"] == 4
    for k in ("approx_kl", "clipfrac", "entropy", "v_loss", "pg_loss", "kl", "reward", "explained_variance",
              "tokens_per_s", "padding_fraction"):
        assert isinstance(stats[k], float) and math.isfinite(stats[k]), k
    assert stats["reward"] == pytest.approx(0.5)


@pytest.mark.parametrize("advantage", ["step", "token"])
def test_gradient_accumulation_over_microbatches_equals_one_big_batch(advantage):
    b = bandit_batch(6)
    results = []
    for budget in (8, 10_000):  # one row per micro-batch vs the whole mini-batch at once
        policy = MockPolicy(seed=7)
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        ppo.ppo_update(policy, opt, b, *configs(ppo_epochs=1, minibatches=1, token_budget=budget, advantage=advantage,
                                                max_grad_norm=1e9))
        results.append(torch.cat([p.flatten() for p in policy.parameters()]))
    torch.testing.assert_close(results[0], results[1])


def test_the_padding_limit_changes_the_micro_batches_not_the_update():
    """Rows of different lengths: packed by budget alone they share micro-batches with padding; with max_padding 0
    every length is a micro-batch of its own. Same mini-batches, so the same parameters (up to summation order)."""
    eps = [[("prompt", [1, 2, 3]), ("act", [5 if i % 2 == 0 else 6, 9]), ("obs", [10, 11] * (i % 3)), ("act", [4])]
           for i in range(6)]
    b = make_batch(eps, [[1.0, 0.0] if i % 2 == 0 else [0.0, 0.0] for i in range(6)])
    results, padding = [], []
    for limit in (1.0, 0.0):
        policy = MockPolicy(seed=7)
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        cfg = PPOConfig(ppo_epochs=2, minibatches=2, token_budget=10_000, max_padding=limit, max_grad_norm=1e9)
        padding.append(ppo.ppo_update(policy, opt, b, cfg, AdvantageConfig())["padding_fraction"])
        results.append(torch.cat([p.flatten() for p in policy.parameters()]))
    assert padding[0] > 0.1 and padding[1] == 0.0
    torch.testing.assert_close(results[0], results[1])


def test_a_non_finite_loss_skips_the_step_and_leaves_the_parameters_unchanged():
    policy, b = MockPolicy(), bandit_batch(4)
    policy.poison = True
    before = copy.deepcopy(policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=0.1, weight_decay=0.1)
    stats = ppo.ppo_update(policy, opt, b, PPOConfig(ppo_epochs=2, minibatches=2), AdvantageConfig())
    assert stats["skipped_steps"] == 4 == stats["optimizer_steps"]
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in policy.parameters())


class TwoIdenticalRanks(ppo.OneProcess):
    """The data-parallel hooks as each of 2 ranks holding the same episodes sees them (DDP averages two equal
    gradients: each rank's own): counts and statistics sum to twice, the loss weighs 2, and an FSDP-style lock-step
    repeat of weight 0 ends every list. Counts the micro-batches run under each gradient-sync context."""

    def __init__(self):
        self.contexts = []

    def all_sum(self, x):
        return 2 * x

    def microbatches(self, groups):
        groups = groups + [groups[-1]]  # the repeat
        return [(g, 0.0 if j == len(groups) - 1 else 2.0, self.context("sync" if j == len(groups) - 1 else "local"))
                for j, g in enumerate(groups)]

    @contextmanager
    def context(self, name):
        self.contexts.append(name)
        yield


def test_an_update_through_two_identical_ranks_hooks_equals_the_one_process_update():
    b, cfg, results = bandit_batch(8), PPOConfig(ppo_epochs=1, minibatches=2, token_budget=8), []
    for dp in (None, TwoIdenticalRanks()):
        policy = MockPolicy(seed=5)
        if dp is not None:
            policy.data_parallel = dp
        stats = ppo.ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.1), b, cfg, AdvantageConfig())
        results.append((torch.cat([p.detach().flatten() for p in policy.parameters()]), stats))
    torch.testing.assert_close(results[1][0], results[0][0])
    for k in ("loss", "pg_loss", "v_loss", "grad_norm", "kl", "reward", "explained_variance"):
        assert results[1][1][k] == pytest.approx(results[0][1][k], rel=1e-6, abs=1e-7), k
    # 8 tokens a row: one row per micro-batch, 4 per mini-batch and a repeat; the gradients cross ranks once per step
    assert dp.contexts == 2 * (4 * ["local"] + ["sync"])


def parameter_change(dtype, tiny_gradients=False, loss_scaling=True, monkeypatch=None):
    policy, b = MockPolicy(seed=1), bandit_batch(4)
    before = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
    cfg = configs(ppo_epochs=1, minibatches=1, max_grad_norm=1e9)
    if tiny_gradients:  # V = 0 and rewards 1e-6, unwhitened: d loss / d logits ~ 1e-8, below float16's range
        torch.nn.init.zeros_(policy.value.weight), torch.nn.init.zeros_(policy.value.bias)
        b["step_rewards"] *= 1e-6
        cfg = configs(ppo_epochs=1, minibatches=1, max_grad_norm=1e9, whiten=False, vf_coef=0.0)
    if not loss_scaling:
        scaler = torch.amp.GradScaler
        monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scaler(device, enabled=False))
    opt = torch.optim.SGD(policy.parameters(), lr=1e6 if tiny_gradients else 0.1)
    stats = ppo.ppo_update(policy, opt, b, *cfg, autocast_dtype=dtype)
    assert stats["skipped_steps"] == 0
    return torch.cat([p.detach().flatten() for p in policy.parameters()]) - before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_update_under_autocast_moves_the_parameters_as_the_float32_update_does(dtype):
    full = parameter_change(None)
    torch.testing.assert_close(parameter_change(dtype), full, rtol=0, atol=1e-2 * full.abs().max().item())


def test_float16_scales_the_loss_so_small_gradients_survive_the_half_precision_backward(monkeypatch):
    full = parameter_change(None, tiny_gradients=True)
    scaled = parameter_change(torch.float16, tiny_gradients=True)
    torch.testing.assert_close(scaled, full, rtol=0, atol=1e-2 * full.abs().max().item())
    unscaled = parameter_change(torch.float16, tiny_gradients=True, loss_scaling=False, monkeypatch=monkeypatch)
    assert (unscaled - full).abs().max() > 0.1 * full.abs().max()  # without the scaler, gradients flush to zero


def test_kl_in_the_loss_and_sampling_logprobs_flags_run_and_the_same_seed_gives_the_same_update():
    b = bandit_batch(6)
    cfg = configs(kl_in_loss=True, kl_coef=0.5, use_sampling_logprobs=True, ppo_epochs=2, minibatches=3)
    params = []
    for _ in range(2):
        policy = MockPolicy(seed=3)
        ref = lambda ids, att, **kw: torch.full(ids.shape, -2.0)  # noqa: E731
        stats = ppo.ppo_update(policy, torch.optim.Adam(policy.parameters(), lr=0.01), b, *cfg, ref)
        params.append(torch.cat([p.flatten() for p in policy.parameters()]))
    assert stats["kl_loss"] > 0 and stats["kl"] == pytest.approx(2.0)  # old (sampling) log-probs are 0
    assert torch.equal(params[0], params[1])


def test_with_sampling_logprobs_the_no_grad_pass_asks_the_policy_for_values_only():
    b, logits_asked = bandit_batch(6), []
    policy = MockPolicy(seed=3)

    def recording(ids, att, logits_at=None):
        if not torch.is_grad_enabled():          # pass (1): π_old, V_old
            logits_asked.append(None if logits_at is None else int(logits_at.sum()))
        return policy(ids, att, logits_at)
    for sampling in (False, True):
        logits_asked.clear()
        cfg = PPOConfig(use_sampling_logprobs=sampling, action_logits_only=True)
        ppo.ppo_update(recording, torch.optim.Adam(policy.parameters(), lr=0.01), b, cfg, AdvantageConfig())
        assert logits_asked and all((n == 0) == sampling for n in logits_asked)  # sampling: no LM head in pass (1)


# ------------------------------------------------------------------------------------ critic-free step groups
def test_step_group_advantages_on_a_hand_computed_group_with_shared_and_diverging_states():
    # Three rollouts of one task (γ = 1). All start from the prompt (state 0). Rollouts 0 and 1 made the same first
    # call and saw the same observation (state 1), rollout 2 another (state 2, alone).
    rewards = torch.tensor([[0.5, 1.0], [0.5, 0.0], [0.0, 0.0]])
    step_mask = torch.tensor([[True, True], [True, True], [True, False]])
    state_id = torch.tensor([[0, 1], [0, 1], [0, 0]])
    group = torch.tensor([0, 0, 0])
    adv, G = advantages.step_group_advantages(rewards, step_mask, state_id, group, gamma=1.0)
    # returns: [[1.5, 1.0], [0.5, 0.0], [0.0, -]]
    torch.testing.assert_close(G, torch.tensor([[1.5, 1.0], [0.5, 0.0], [0.0, 0.0]]))
    # state 0 (first steps): returns 1.5, 0.5, 0.0: mean 2/3, population std sqrt(((5/6)^2 + (1/6)^2 + (2/3)^2)/3)
    std0 = ((25 / 36 + 1 / 36 + 16 / 36) / 3) ** 0.5
    # state 1 (second steps of rollouts 0 and 1): returns 1.0, 0.0: mean 0.5, std 0.5 -> +1, -1
    expected = torch.tensor([[(1.5 - 2 / 3) / std0, 1.0], [(0.5 - 2 / 3) / std0, -1.0], [(0.0 - 2 / 3) / std0, 0.0]])
    torch.testing.assert_close(adv, expected, rtol=1e-4, atol=1e-5)


def test_a_step_whose_state_is_unique_falls_back_to_its_episodes_return_in_the_task_group():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    step_mask = torch.ones(2, 2, dtype=torch.bool)
    state_id = torch.tensor([[0, 1], [0, 2]])             # the second steps diverged: each state has one member
    adv, _ = advantages.step_group_advantages(rewards, step_mask, state_id, torch.tensor([0, 0]), gamma=0.5)
    # episode returns G_0 = 0.5, 0.0: mean 0.25, std 0.25 -> +1 / -1, used for the unique second steps too
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), rtol=1e-4, atol=1e-5)


def test_a_group_whose_returns_are_all_equal_gets_zero_advantage_not_nan():
    rewards = torch.ones(4, 3)
    adv, _ = advantages.step_group_advantages(rewards, torch.ones(4, 3, dtype=torch.bool), torch.tensor([[0, 1, 2]] * 4),
                                       torch.zeros(4, dtype=torch.long), gamma=0.9)
    assert torch.equal(adv, torch.zeros(4, 3))


def test_the_share_of_zero_advantage_tokens_counts_the_steps_whose_state_group_had_equal_returns():
    # Bandit: all first steps share the prompt (returns 1 or 0: nonzero advantages, 2 tokens each); every second step
    # (1 token) is in a group of rollouts with the same first action, all with return 0: zero advantage -> 1/3.
    b = bandit_batch(6)
    b["episode_group"] = torch.zeros(6, dtype=torch.long)
    b["state_id"] = torch.tensor([[0, 1 if i % 2 == 0 else 2] for i in range(6)])      # the second state: which action
    zeros = torch.zeros(b["input_ids"].shape)
    _, _, group_stats = advantages.compute_advantages(b, zeros, zeros, None, AdvantageConfig(advantage="step-group"))
    _, _, gae_stats = advantages.compute_advantages(b, torch.rand(zeros.shape), zeros, None, AdvantageConfig())
    assert group_stats["zero_advantage"].item() == pytest.approx(1 / 3)
    assert gae_stats["zero_advantage"].item() == 0.0


def test_without_value_clipping_the_value_loss_is_half_the_squared_error_and_with_it_the_clipped_max():
    new_v, old_v, ret = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    zero, mask = torch.zeros(1, 2), torch.tensor([[False, True]])
    mb = micro_batch(zero, zero, old_v, ret, mask, 1.0)
    plain = ppo.ppo_loss(zero, new_v, zero, mb, PPOConfig(vf_clip=0.0))[1]["v_loss"]
    clipped = ppo.ppo_loss(zero, new_v, zero, mb, PPOConfig(vf_clip=0.2))[1]["v_loss"]
    assert plain.item() == pytest.approx(0.5 * (3 - 4) ** 2)                  # ½ (V − G)²
    assert clipped.item() == pytest.approx(0.5 * (0.2 - 4) ** 2)              # ½ max((V−G)², (V_old+0.2−G)²)


class LoudCriticPolicy(MockPolicy):
    """The critic reads the trunk without back-propagating into it (train.py's --detach-critic); its values are the
    mock's, its gradient `grad_scale` times larger."""

    def __init__(self, grad_scale, **kw):
        super().__init__(**kw)
        self.grad_scale = grad_scale

    def forward(self, input_ids, attention_mask, logits_at=None):
        h = self.emb(input_ids)
        logits, v = self.head(h), self.value(h.detach()).squeeze(-1)
        v = v * self.grad_scale - v.detach() * (self.grad_scale - 1)          # same value, scaled gradient
        return logits if logits_at is None else logits[logits_at], v


def test_a_huge_critic_gradient_does_not_shrink_the_policy_step_each_group_is_clipped_alone():
    b = bandit_batch(8)
    steps = []
    for grad_scale in (1.0, 1e4):                        # the second critic's gradient is 10^4 times larger
        policy = LoudCriticPolicy(grad_scale, seed=1)
        actor = [p for n, p in policy.named_parameters() if not n.startswith("value.")]
        critic = [p for n, p in policy.named_parameters() if n.startswith("value.")]
        before = [p.detach().clone() for p in actor]
        opt = torch.optim.SGD([{"params": actor, "lr": 0.1}, {"params": critic, "lr": 0.1}])
        ppo.ppo_update(policy, opt, b, PPOConfig(ppo_epochs=1, minibatches=1, vf_coef=1.0, max_grad_norm=0.5),
                       AdvantageConfig())
        steps.append(torch.cat([(p.detach() - q).flatten() for p, q in zip(actor, before)]))
    assert steps[0].abs().max() > 0
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-3, atol=1e-6)   # one global clip would shrink it ~10^4x
