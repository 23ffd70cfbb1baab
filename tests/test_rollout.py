"""The rollout loop: exact token bookkeeping, KV-continuation log-probs, batching, and evaluation."""
import pytest
import torch

from batching import collate, token_logprobs
from model import ModelConfig, Transformer
from rollout import (TEMPLATES, ModelPolicy, RolloutConfig, ScriptedPolicy, episode_metrics, observation_ids, rollout,
                     system_prompt)
from sft import corpus, train_tokenizer
from tools import Environment, Expert, make_tasks


@pytest.fixture(scope="module")
def env():
    return Environment()


@pytest.fixture(scope="module")
def tokenizer(env):
    return train_tokenizer(corpus(env, make_tasks("train", 200, seed=3), "chatml"), 600, "chatml")


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Transformer(cfg).eval()


def test_a_scripted_episode_has_exactly_the_expected_tokens_masks_and_step_ids(env, tokenizer):
    task = make_tasks("test", 1, seed=0, group=2)[0]
    cfg = RolloutConfig()
    [ep] = rollout(ScriptedPolicy(Expert(), tokenizer, cfg), [task], env, tokenizer, cfg)
    # Rebuild the sequence by hand from its segments: prompt, then (action + <|im_end|>, observation) per step.
    t = TEMPLATES["chatml"]
    eot = [tokenizer.token_to_id("<|im_end|>")]
    prompt = tokenizer.encode(t.prompt.format(system=system_prompt(env, task, cfg.schema_format), user=task.query))
    ids, mask, step = list(prompt), [0] * len(prompt), [-1] * len(prompt)
    history = []
    for s in range(len(task.reference_chain) + 1):
        action = Expert().act(task, history)
        a = tokenizer.encode(action) + eot
        ids, mask, step = ids + a, mask + [1] * len(a), step + [s] * len(a)
        if s == len(task.reference_chain):
            break
        tool, args = task.reference_chain[s]
        result = env.call(tool, args)
        history.append((action, result))
        o = observation_ids(tokenizer, t, result.text, cfg.max_obs_tokens)
        ids, mask, step = ids + o, mask + [0] * len(o), step + [s] * len(o)
    assert ep.token_ids == ids
    assert ep.action_mask == mask
    assert ep.step_id == step
    assert ep.stop_reason == "finish" and ep.solved == 1.0
    assert [s.tool for s in ep.steps] == [tool for tool, _ in task.reference_chain] + ["Finish"]
    assert all(s.success for s in ep.steps)
    # The decoded sequence is the chat transcript, observations in function turns.
    text = tokenizer.decode(ep.token_ids)
    assert text.startswith("<|im_start|>system\n") and text.count("<|im_start|>function\n") == 2
    assert text.endswith(task.answer + '"}<|im_end|>')


def test_collate_marks_each_steps_first_and_last_action_token(env, tokenizer):
    tasks = make_tasks("val", 3, seed=1)
    cfg = RolloutConfig()
    episodes = rollout(ScriptedPolicy(Expert(), tokenizer, cfg), tasks, env, tokenizer, cfg)
    for ep in episodes:
        ep.rewards = [0.0] * len(ep.steps)
    batch = collate(episodes, tokenizer.pad_id)
    for b, ep in enumerate(episodes):
        for s in range(len(ep.steps)):
            positions = [i for i, (m, k) in enumerate(zip(ep.action_mask, ep.step_id)) if m and k == s]
            assert batch["step_start"][b, s] == positions[0]
            assert batch["step_end"][b, s] == positions[-1]
        assert batch["step_mask"][b].sum() == len(ep.steps)
        assert batch["attention_mask"][b].sum() == len(ep.token_ids)
        assert batch["action_mask"][b].sum() == sum(ep.action_mask)


def test_sampling_logprobs_of_a_multi_step_rollout_equal_one_fresh_forward(env, tokenizer, tiny_model):
    # An untrained model writes garbage, so every step fails to parse, gets an error observation and goes on:
    # several KV continuations per episode, rows of different lengths, holes in the cache.
    cfg = RolloutConfig(max_steps=3, max_action_tokens=24, max_total_tokens=1024)
    tasks = make_tasks("train", 6, seed=2)
    gen = torch.Generator().manual_seed(0)
    episodes = rollout(ModelPolicy(tiny_model, tokenizer, cfg, gen), tasks, env, tokenizer, cfg)
    assert max(len(ep.steps) for ep in episodes) == 3
    for ep in episodes:
        ep.rewards = [0.0] * len(ep.steps)
    batch = collate(episodes, tokenizer.pad_id)
    with torch.no_grad():
        logits = tiny_model(batch["input_ids"], attention_mask=batch["attention_mask"])              # (B, T, V)
        fresh = token_logprobs(logits / cfg.temperature, batch["input_ids"])  # (B, T), at the sampling temperature
    m = batch["action_mask"]
    assert m.sum() > 100
    assert torch.allclose(fresh[m], batch["old_logprobs"][m], atol=1e-4)


def test_episodes_end_at_max_steps_and_at_the_token_budget(env, tokenizer, tiny_model):
    tasks = make_tasks("train", 4, seed=5)
    few_steps = RolloutConfig(max_steps=2, max_action_tokens=16)
    episodes = rollout(ModelPolicy(tiny_model, tokenizer, few_steps, torch.Generator().manual_seed(1)), tasks, env,
                       tokenizer, few_steps)
    assert all(ep.stop_reason == "max_steps" and len(ep.steps) == 2 for ep in episodes)
    budget = RolloutConfig(max_steps=12, max_action_tokens=16, max_total_tokens=560)
    episodes = rollout(ModelPolicy(tiny_model, tokenizer, budget, torch.Generator().manual_seed(1)), tasks, env,
                       tokenizer, budget)
    assert all(ep.stop_reason == "token_budget" and len(ep.token_ids) <= 560 for ep in episodes)


def test_an_unknown_tool_and_invalid_arguments_become_failed_steps_with_error_observations(env, tokenizer):
    class Script:
        def act(self, task, history):
            return ['Action: teleport\nAction Input: {"to": "Mars"}',
                    'Action: get_weather\nAction Input: {"town": "Paris"}',
                    'Action: Finish\nAction Input: {"return_type": "give_up_and_restart"}'][len(history)]
    cfg = RolloutConfig()
    [ep] = rollout(ScriptedPolicy(Script(), tokenizer, cfg), make_tasks("test", 1), env, tokenizer, cfg)
    unknown, invalid, finish = ep.steps
    assert not unknown.success and "unknown tool 'teleport'" in unknown.observation
    assert not invalid.success and "missing required argument(s): city" in invalid.observation
    assert finish.tool == "Finish" and ep.stop_reason == "give_up" and ep.solved == 0.0
    assert episode_metrics([ep])["all"]["invalid_action_rate"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_sixty_four_episodes_of_the_tiny_model_run_end_to_end(env, tokenizer, tiny_model):
    cfg = RolloutConfig(max_steps=3, max_action_tokens=32)
    tasks = make_tasks("train", 64, seed=7)
    episodes = rollout(ModelPolicy(tiny_model, tokenizer, cfg, torch.Generator().manual_seed(2)), tasks, env,
                       tokenizer, cfg)
    assert len(episodes) == 64
    for ep in episodes:
        assert len(ep.token_ids) == len(ep.action_mask) == len(ep.step_id) == len(ep.logprobs)
        assert 1 <= len(ep.steps) <= 3 and ep.stop_reason
    metrics = episode_metrics(episodes)
    assert set(metrics) == {"G1", "G2", "G3", "all"} and metrics["all"]["n"] == 64


def test_metrics_count_calls_hit_by_a_fault_and_how_many_were_retried_with_the_same_arguments():
    from rollout import Episode, Step
    from tools.apis import ToolResult
    task = make_tasks("test", 1, seed=0)[0]
    ok, fault = ToolResult(True, "", {}, "{}"), ToolResult(False, "timeout", None, "{}", fault="timeout")
    call = lambda tool, args, result: Step("", tool, args, "", result.ok, result.error, result)  # noqa: E731
    retried, switched, clean = (Episode(task=task) for _ in range(3))
    retried.steps = [call("weather", {"city": "A"}, fault), call("weather", {"city": "A"}, ok)]
    switched.steps = [call("weather", {"city": "A"}, fault), call("weather", {"city": "B"}, ok),
                      Step("Finish", None, None, "", True)]                  # no tool ran: not a call
    clean.steps = [call("weather", {"city": "A"}, ok)]
    m = episode_metrics([retried, switched, clean])["all"]
    assert m["fault_rate"] == pytest.approx(2 / 5)           # 2 faulted of 5 calls
    assert m["retry_after_fault"] == pytest.approx(1 / 2)    # only the first episode repeated the faulted call


def test_evaluations_with_one_fault_seed_meet_the_same_faults(tokenizer, monkeypatch):
    # The expert stands in for the model (it makes valid calls, so faults can hit them).
    import rollout as rollout_module
    from tools import FaultConfig
    monkeypatch.setattr(rollout_module, "ModelPolicy", lambda model, tok, cfg: ScriptedPolicy(Expert(), tok, cfg))
    env, tasks, cfg = Environment(FaultConfig(rate=0.3, seed=0)), make_tasks("test", 40, seed=0), RolloutConfig()
    faults = lambda episodes: [[bool(s.result and s.result.fault) for s in ep.steps] for ep in episodes]  # noqa: E731
    first = faults(rollout_module.evaluate(None, tokenizer, env, tasks, cfg, fault_seed=5)[1])
    consumed = faults(rollout_module.evaluate(None, tokenizer, env, tasks, cfg)[1])  # the stream goes on: other draws
    again = faults(rollout_module.evaluate(None, tokenizer, env, tasks, cfg, fault_seed=5)[1])
    assert sum(map(sum, first)) > 5                                        # faults did hit
    assert again == first and consumed != first


def test_expert_step_logprobs_sum_each_expert_action_tokens_log_probs_as_one_unpadded_forward_reads_them(
        env, tokenizer, tiny_model):
    """The exploration diagnostic (experiment.py --expert-logprobs): per step, Σ log softmax(logits / T) of the expert
    action's tokens, and whether every one of them is the argmax (greedy decoding writes the expert's action).
    Checked against one forward per episode with no padding, no logits selection and no batching, read position by
    position; tasks of 1, 2 and 3 calls in batches of 2 (right padding in both); the plain model and the one with the
    CPU speed paths (the shared prompt run once per batch) give the same."""
    import copy
    import cpu_speed
    from experiment import expert_step_logprobs
    pool = make_tasks("test", 30, seed=0)
    tasks = [next(t for t in pool if t.group == g) for g in (1, 3, 2)]
    assert len({t.id for t in tasks}) == 3
    cfg, T = RolloutConfig(), 0.7
    with torch.no_grad():
        got = expert_step_logprobs(tiny_model, tokenizer, env, tasks, cfg, temperatures=(1.0, T), batch_size=2)
        fast = expert_step_logprobs(cpu_speed.apply(copy.deepcopy(tiny_model)), tokenizer, env, tasks, cfg,
                                    temperatures=(1.0, T), batch_size=2)
    episodes = rollout(ScriptedPolicy(Expert(), tokenizer, cfg), tasks, env, tokenizer, cfg)
    for ep in episodes:
        with torch.no_grad():
            logits = tiny_model(torch.tensor([ep.token_ids]))[0]                             # (T, V)
        logp = (logits / T).log_softmax(-1)
        want, greedy = [0.0] * len(ep.steps), [True] * len(ep.steps)
        for t in range(1, len(ep.token_ids)):
            if ep.action_mask[t]:
                want[ep.step_id[t]] += float(logp[t - 1, ep.token_ids[t]])
                greedy[ep.step_id[t]] &= int(logits[t - 1].argmax()) == ep.token_ids[t]
        assert len(got[T][ep.task.id]) == len(ep.task.reference_chain) + 1 == len(want)
        assert got[T][ep.task.id] == pytest.approx(want, abs=1e-3, rel=1e-5)
        assert fast[T][ep.task.id] == pytest.approx(want, abs=1e-3, rel=1e-5)
        assert got["greedy"][ep.task.id] == fast["greedy"][ep.task.id] == greedy
        assert all(v < 0 for v in want)          # an untrained model: every action has probability < 1          # an untrained model: every action has probability < 1


def test_expert_step_logprobs_greedy_flags_exactly_the_steps_where_one_token_is_not_the_argmax(env, tokenizer):
    """An oracle model whose logits put the next token of the sequence first, except at one position of step 1 of the
    second episode: greedy decoding writes every expert action but that step's."""
    from experiment import expert_step_logprobs
    pool = make_tasks("test", 30, seed=0)
    tasks = [next(t for t in pool if t.group == g) for g in (2, 3)]
    cfg = RolloutConfig()
    [_, second] = rollout(ScriptedPolicy(Expert(), tokenizer, cfg), tasks, env, tokenizer, cfg)
    wrong = second.step_id.index(1) + 2                  # a token of step 1's action, other than its first

    class Oracle(torch.nn.Module):
        def forward(self, ids, attention_mask=None, logits_to_keep=None):
            nxt = torch.nn.functional.pad(ids[:, 1:], (0, 1))                         # the token each position predicts
            logits = torch.nn.functional.one_hot(nxt, tokenizer.vocab_size).float() * 10
            logits[1, wrong - 1] = logits[1, wrong - 1].roll(1)                       # row 1 = the second episode
            return logits[logits_to_keep]

    oracle = Oracle()
    oracle.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))              # its device
    got = expert_step_logprobs(oracle, tokenizer, env, tasks, cfg, batch_size=2)["greedy"]
    assert got[tasks[0].id] == [True] * len(tasks[0].reference_chain) + [True]
    assert got[tasks[1].id] == [s != 1 for s in range(len(tasks[1].reference_chain) + 1)]
    assert len(tasks[1].reference_chain) >= 2
