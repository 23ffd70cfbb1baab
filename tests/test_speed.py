"""The speed paths are exact: each optimisation against the straightforward computation it replaces.

- a prompt prefix shared by every row, computed once (rollouts: KVCache.share_prefix; training: forward_with_prefix);
- the LM head only at positions that predict an action token (token_logprobs(targets=...));
- frozen base weights stored in bfloat16 under LoRA (store_frozen_weights_in);
- decode matmuls on oneDNN-prepacked bf16 weights during a rollout (packed_weights).
"""
from contextlib import nullcontext

import pytest
import torch

import model as M
from batching import collate, predictors, shared_prefix_len, token_logprobs
from ppo import PPOConfig, ppo_update
from rollout import TEMPLATES, ModelPolicy, RolloutConfig, rollout, system_prompt
from sft import corpus, train_tokenizer
from tools import make_suite


def tiny_lora_model(seed=0, vocab=600):
    torch.manual_seed(seed)
    model = M.Transformer(M.ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096))
    M.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)      # adapters that change the outputs, so their gradients mean something
    return model


def batch_with_shared_prefix(P=9, T=17):
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (3, T))
    ids[:, :P] = ids[0, :P]                                  # every row starts with the same P tokens
    att = torch.ones(3, T, dtype=torch.bool)
    att[1, 14:], att[2, 11:] = False, False                  # right padding
    am = torch.zeros(3, T, dtype=torch.bool)
    am[:, P + 2:P + 6] = True
    return ids, att & True, am & att


def test_a_shared_prefix_computed_once_gives_the_logits_and_gradients_of_the_full_forward():
    model = tiny_lora_model()
    ids, att, am = batch_with_shared_prefix(P=9)
    trainable = [p for p in model.parameters() if p.requires_grad]
    full = model(ids, attention_mask=att)                                         # (B, T, V)
    g_full = torch.autograd.grad((full[:, 9:].pow(2) * att[:, 9:, None]).sum(), trainable)
    logits, hidden = M.forward_with_prefix(model, ids, att, prefix_len=9)
    g_prefix = torch.autograd.grad((logits[:, 9:].pow(2) * att[:, 9:, None]).sum(), trainable)
    torch.testing.assert_close(logits[:, 9:][att[:, 9:]], full[:, 9:][att[:, 9:]], rtol=1e-5, atol=1e-5)
    assert hidden.shape == (3, 17, 32) and torch.all(hidden[:, :9] == 0)         # never read over the prefix
    for a, b in zip(g_prefix, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_single_row_takes_the_plain_forward_and_gets_the_same_action_logits():
    """prefix_len is ignored for one row (nothing to share): the same logits at the action positions as the plain
    forward, and the hidden states over the prefix are the real ones, not the zeros of the shared-prefix path."""
    model = tiny_lora_model()
    ids, att, am = batch_with_shared_prefix(P=9)
    logits, hidden = M.forward_with_prefix(model, ids[:1], att[:1], prefix_len=9, logits_at=predictors(am[:1]))
    full, full_hidden = model(ids[:1], attention_mask=att[:1], return_hidden=True)
    torch.testing.assert_close(logits, full[predictors(am[:1])], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, full_hidden, rtol=0, atol=0)
    assert hidden[:, :9].abs().sum() > 0


@pytest.mark.parametrize("prefix_len, kept", [(0, 0.5), (9, 0.75)])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_and_keeps_fewer_activations(prefix_len, kept):
    """checkpoint_layers recomputes each layer in backward: same loss, same LoRA gradients (with and without the
    shared prefix, whose K/V the recomputed layers read), and fewer tensors saved for backward (measured 29% and 61%
    of the elements: the one-row prefix forward writes a cache and is not checkpointed, and here it is 9 of 26
    tokens; in a SmolLM2 micro-batch it is ~400 of ~2,000)."""
    model = tiny_lora_model()
    ids, att, am = batch_with_shared_prefix(P=9)
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = []
    for on in (False, True):
        model.checkpoint_layers = on
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logits, _ = M.forward_with_prefix(model, ids, att, prefix_len, logits_at=predictors(am))
            loss = token_logprobs(logits, ids, targets=am).sum()
        results.append((loss.detach(), torch.autograd.grad(loss, trainable), sum(saved)))
    (loss_off, g_off, saved_off), (loss_on, g_on, saved_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert saved_on < kept * saved_off


def test_logits_only_at_action_tokens_give_the_same_logprobs_and_entropy_as_the_dense_path():
    model = tiny_lora_model()
    ids, att, am = batch_with_shared_prefix()
    dense_lp, dense_ent = token_logprobs(model(ids, attention_mask=att), ids, with_entropy=True)
    logits, _ = M.forward_with_prefix(model, ids, att, prefix_len=9, logits_at=predictors(am))
    assert logits.shape == (int(am.sum()), 600)                                  # (N, V): N action tokens
    lp, ent = token_logprobs(logits, ids, with_entropy=True, targets=am)
    torch.testing.assert_close(lp[am], dense_lp[am], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[am], dense_ent[am], rtol=1e-5, atol=1e-5)
    assert torch.all(lp[~am] == 0) and torch.all(ent[~am] == 0)


def test_predictors_are_the_positions_just_before_each_target():
    targets = torch.tensor([[False, True, True, False, True]])
    assert predictors(targets).tolist() == [[True, True, False, True, False]]


def test_the_shared_prefix_length_stops_at_the_first_difference_and_leaves_every_row_a_token():
    assert shared_prefix_len([[1] * 20 + [2, 3], [1] * 20 + [4]]) == 20
    assert shared_prefix_len([[1] * 20, [1] * 20]) == 19                        # one token of its own per row
    assert shared_prefix_len([[1] * 20 + [2], [1] * 3 + [5] * 20]) == 0          # under 16 tokens: not worth it


def test_rollouts_with_the_shared_prefix_sample_the_same_tokens_and_logprobs():
    suite = make_suite("large")                           # one system prompt for every task
    env, tasks = suite.environment(), suite.tasks("val", 5)
    tokenizer = train_tokenizer(corpus(env, suite.tasks("sft", 100), "chatml"), 600, "chatml")
    model = tiny_lora_model(vocab=tokenizer.vocab_size).eval()
    runs = []
    for shared in (False, True):
        cfg = RolloutConfig(temperature=1.0, max_steps=2, max_action_tokens=12, shared_prefix=shared)
        gen = torch.Generator().manual_seed(0)
        runs.append(rollout(ModelPolicy(model, tokenizer, cfg, gen), tasks, env, tokenizer, cfg))
    assert collate(runs[1], tokenizer.pad_id, shared_prefix=True)["prefix_len"] > 100   # the whole system prompt
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_one_ppo_update_with_every_speedup_equals_the_straightforward_update():
    params = []
    for fast in (False, True):
        model = tiny_lora_model()
        policy = M.PolicyWithValue(model, M.ValueHead(32))
        torch.nn.init.normal_(policy.value_head.proj.weight, std=0.1)
        ids, att, am = batch_with_shared_prefix()
        S = 2
        batch = {"input_ids": ids, "attention_mask": att, "action_mask": am,
                 "step_id": torch.where(am, torch.where(torch.arange(17) < 13, 0, 1), -1),
                 "old_logprobs": torch.zeros(3, 17), "step_rewards": torch.tensor([[0.5, 1.0]] * 3),
                 "step_mask": torch.ones(3, S, dtype=torch.bool),
                 "step_start": torch.tensor([[11, 13]] * 3), "step_end": torch.tensor([[12, 14]] * 3),
                 "prefix_len": 9 if fast else 0}
        cfg = PPOConfig(ppo_epochs=2, minibatches=1, token_budget=20, action_logits_only=fast)
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
        ppo_update(policy, optimizer, batch, cfg, generator=torch.Generator().manual_seed(0))
        params.append(torch.cat([p.detach().flatten() for p in policy.parameters() if p.requires_grad]))
    start = torch.cat([p.detach().flatten() for p in M.PolicyWithValue(tiny_lora_model(), M.ValueHead(32)).parameters()
                       if p.requires_grad])
    assert (params[0] - start[:len(params[0])]).abs().max() > 1e-3               # the update moved the weights
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-5)


def test_frozen_weights_in_bfloat16_keep_adapters_float32_and_outputs_close_to_float32_autocast():
    model = tiny_lora_model()
    ids, att, _ = batch_with_shared_prefix()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids, attention_mask=att).float()
    M.store_frozen_weights_in(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(ids, attention_mask=att).float()
    assert ((after - before).norm() / before.norm()).item() < 2e-2   # autocast rounds the same weights to bf16


PACKING = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_packed_weights_serve_decode_sized_no_grad_matmuls_and_are_dropped_on_exit():
    layer = M.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        few, many = torch.randn(32, 64).bfloat16(), torch.randn(M.PACKED_MAX_ROWS + 1, 64).bfloat16()
        plain = layer(few)
        with M.packed_weights(layer):
            assert (layer.packed is not None) == PACKING     # a no-op where oneDNN has no bf16
            packed = layer(few)
            layer.weight.zero_()                             # the packed copy is what few-row matmuls read...
            stale = layer(few)
            assert torch.equal(layer(many), layer.bias.expand(len(many), -1))    # ...not big ones (F.linear)
        assert layer.packed is None
        assert torch.equal(layer(few), layer.bias.expand(32, -1))          # outside: the live weight again
    torch.testing.assert_close(packed.float(), plain.float(), rtol=1e-2, atol=1e-2)   # bf16 rounding at most
    assert torch.equal(stale, packed) == PACKING
    with torch.enable_grad():                                # training never reads a packed copy
        with M.packed_weights(layer):
            assert torch.equal(layer(few), layer.bias.expand(32, -1))


def test_rollouts_with_packed_weights_sample_the_same_tokens_with_close_logprobs():
    suite = make_suite("large")
    env, tasks = suite.environment(), suite.tasks("val", 5)
    tokenizer = train_tokenizer(corpus(env, suite.tasks("sft", 100), "chatml"), 600, "chatml")
    model = M.store_frozen_weights_in(tiny_lora_model(vocab=tokenizer.vocab_size).eval(), torch.bfloat16)
    runs = []
    for packed in (False, True):
        cfg = RolloutConfig(temperature=1.0, max_steps=2, max_action_tokens=12, packed_weights=packed)
        runs.append(rollout(ModelPolicy(model, tokenizer, cfg, torch.Generator().manual_seed(0)), tasks, env,
                            tokenizer, cfg))
    assert all(m.packed is None for m in model.modules() if isinstance(m, (M.Linear, M.LoRALinear)))
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 2e-2


@pytest.mark.parametrize("T", [1, 5])
def test_attention_over_a_shared_prefix_equals_softmax_over_the_concatenated_keys(T):
    torch.manual_seed(0)
    B, H, K, D, P, S = 3, 6, 2, 8, 7, 9
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    pk, pv = torch.randn(1, K, P, D), torch.randn(1, K, P, D)
    mask = torch.rand(B, 1, T, S) < 0.6
    mask[..., -1] = True                                     # every query sees at least one own key (deviation 3)
    # reference: one softmax over [prefix ; own] keys, each kv head repeated for its H/K query heads
    keys = torch.cat((pk.expand(B, -1, -1, -1), k), 2).repeat_interleave(H // K, 1)     # (B, H, P + S, D)
    vals = torch.cat((pv.expand(B, -1, -1, -1), v), 2).repeat_interleave(H // K, 1)
    scores = q @ keys.transpose(-1, -2) / D ** 0.5
    scores = scores.masked_fill(~torch.cat((torch.ones(B, 1, T, P, dtype=torch.bool), mask), -1), -torch.inf)
    expected = scores.softmax(-1) @ vals
    with torch.no_grad():                                    # decode: two flash passes joined by log-sum-exp
        split = M.attend_with_prefix(q, k, v, mask, pk, pv)
        long = M.attend_with_prefix(q.repeat(1, 1, 7, 1), k, v, mask.repeat(1, 1, 7, 1), pk, pv)   # > 32 queries
    torch.testing.assert_close(long, expected.repeat(1, 1, 7, 1), rtol=1e-5, atol=1e-5)
    with torch.enable_grad():                                # training: one SDPA over the broadcast prefix
        joined = M.attend_with_prefix(q, k, v, mask, pk, pv)
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joined, expected, rtol=1e-5, atol=1e-5)


def test_a_rollout_cache_keeps_the_shared_prompt_once_and_only_its_own_tokens_per_row():
    suite = make_suite("large")
    env, tasks = suite.environment(), suite.tasks("val", 4)
    tokenizer = train_tokenizer(corpus(env, suite.tasks("sft", 100), "chatml"), 600, "chatml")
    model = tiny_lora_model(vocab=tokenizer.vocab_size).eval()
    policy = ModelPolicy(model, tokenizer, RolloutConfig(), torch.Generator().manual_seed(0))
    prompts = [tokenizer.encode(TEMPLATES["chatml"].prompt.format(system=system_prompt(env, t), user=t.query))
               for t in tasks]
    P = shared_prefix_len(prompts)
    with torch.no_grad():
        policy.start(prompts)
    assert P > 100 and policy.cache.prefix.length == P and policy.cache.prefix.batch_size == 1
    assert policy.cache.length == max(map(len, prompts)) - P                   # the rows hold their own tokens only
    assert policy.cache.next_pos.tolist() == [len(p) for p in prompts]        # RoPE positions continue after it


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_prefix_shared_by_several_forwards_gets_the_summed_gradient_in_one_backward(checkpointing):
    ids, att, am = batch_with_shared_prefix(P=9)
    grads = []
    for shared in (False, True):
        policy = M.PolicyWithValue(tiny_lora_model(), M.ValueHead(32))
        policy.model.checkpoint_layers = checkpointing      # then the prefix too is recomputed in its backward
        adapters = [p for n, p in policy.named_parameters() if "lora" in n]
        with policy.share_prefix(ids[:1, :9]) if shared else nullcontext():
            for rows in ([0], [1, 2]):                       # a one-row and a two-row micro-batch, one backward each
                logits, v = policy(ids[rows], att[rows], prefix_len=9, logits_at=predictors(am[rows]))
                (token_logprobs(logits, ids[rows], targets=am[rows]).sum() + v[att[rows]].sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapters]))
        assert policy.prefix is None                         # left: later forwards compute their own prefix
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_a_shared_prefix_is_released_on_an_error_and_must_match_prefix_len():
    ids, _, _ = batch_with_shared_prefix(P=9)
    policy = M.PolicyWithValue(tiny_lora_model(), M.ValueHead(32))
    with pytest.raises(RuntimeError, match="boom"):
        with policy.share_prefix(ids[:1, :9]):
            policy(ids, prefix_len=9)[0].sum().backward()
            raise RuntimeError("boom")
    assert policy.prefix is None
    with pytest.raises(ValueError, match="shared prefix of 9 tokens for prefix_len 8"):
        with policy.share_prefix(ids[:1, :9]):
            policy(ids, prefix_len=8)
