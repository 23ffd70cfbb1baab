"""Step-grained reward shaping (StepTool, Sec. 3.1), the final-only baseline and the "PPO-calls" control.

Who calls it: train.py, after each rollout, fills `episode.rewards` (one float per step) with a reward function.
Every reward function has the same signature, `fn(episode, cfg) -> list[float]`, so another one (a judge model,
say) can be swapped in through the REWARDS dict.

    intermediate step t < T:  r_t = scale · (α · (SuccCalling_t − 1) + Contribution_t)   (succ_calling="penalty")
                              r_t = scale · (α · SuccCalling_t + Contribution_t)         (succ_calling="bonus")
    final step T:             r_T = IsSolved(q, a_T)          (Solved 1, Unsure 0.5, Unsolved 0: tools.check_answer)

Choices and deviations:
 1. SuccCalling ∈ {0, 1} is read from the step record: the action parsed, the tool exists, the arguments passed the
    schema, and the tool answered without error (injected faults count as failures, as a real API's would).
 2. SuccCalling is a penalty by default, not the paper's bonus. The paper's α·SuccCalling pays every successful call,
    needed or not; trained offline on fixed trajectories it cannot be farmed, but online RL learns to pad episodes
    with calls (docs/history.md §5). α·(SuccCalling − 1) differs from it by the constant α per call: a failed call
    costs α, a successful one costs nothing, and only Contribution pays, so an unneeded call never raises the
    return. `succ_calling="bonus"` is the paper's formula.
 3. A repeated call (same tool, same normalised arguments as an earlier successful call of the episode) earns
    neither SuccCalling nor Contribution, whatever the Contribution rule: repeats would farm the reward. A retry
    after a failure is not a repeat.
 4. Contribution ∈ {0, 1} by default is the "used" rule, a backward flow from the final answer: step t contributes
    when a value it *learned* reaches the answer, directly (tools.mentions: strings as whole normalised words,
    numbers when a number written in the answer rounds them, "836.8" for 836.801) or through the arguments of a
    later step that itself contributes (numbers inside an expression count: "121.1 * 6.91" uses 121.1 and 6.91).
    A value is learned at step t when it is a leaf of t's successful response that the agent did not already know:
    not in its own arguments, not a word or number of the query, not a constant the task fixes (Task.constants:
    "USD" of get_exchange_rate must not credit get_stock_quote, which happens to return it) and not learned by an
    earlier step (a value credits only the first step that learned it); values shorter than 2 characters are
    ignored. The paper's annotators scored 0–5 with GPT-4. A call whose values flow only into pointless calls, or
    only into the query's own words, contributes nothing.
    `contribution="lcs"` is the authors' rule-based variant: the longest-common-subsequence ratio between the tool
    response and the final answer, ≥ 0.3 → 1 else 0. (The ratio's denominator is not stated; we divide by the final
    answer's length, the string the response should explain.)
    `contribution="reference"` plays the annotator who knows the solution: the step is the first successful call of
    one of the task's reference calls (tool and arguments). "used" and "lcs" pay a call with a wrong argument whose
    (wrong) value flows into the answer, the main failure of a small model (docs/history.md §6); this rule does not. It needs tasks with a reference chain (the mocked suites; ToolBench imports have
    none: 0 everywhere).
 5. An episode that ends without Finish (max steps, token budget) has no a_T: all its steps are intermediate and
    the episode earns no IsSolved (0). A `give_up_and_restart` Finish is judged like any answer (it has none: 0).
 6. Default α = 0.5, scale = 0.5: intermediate rewards lie in [−0.25, 0.5] (the paper's bonus form: [0, 0.75]), so
    a solved task (1) is worth more than any single call.
 7. REWARDS["calls"], the control "PPO-calls": IsSolved on the final step plus a constant `call_bonus` on every
    successful, non-repeated intermediate call. With call_bonus set to StepTool's mean intermediate reward per call
    it gives the same prior toward calling without step-grained credit, so the two separate.

REWARD_VERSION names the behaviour of this file: bump it with any change to what a reward function returns
(tests/test_rewards.py pins a hash of this file's code to it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from tools import check_answer, mentions

REWARD_VERSION = "flow-penalty-1"


@dataclass
class RewardConfig:
    alpha: float = 0.5
    """Weight α of SuccCalling in the intermediate reward."""
    contribution: str = "used"
    """How Contribution is decided: "used" (a learned value flows into the answer, directly or through the arguments
    of contributing later calls), "lcs" (authors' rule) or "reference" (the step is a call of the task's reference
    solution)."""
    lcs_threshold: float = 0.3
    """For contribution="lcs": the LCS ratio at or above which a step counts as contributing."""
    scale: float = 0.5
    """Multiplies every intermediate reward (the released data's rewards lie in [0, 1])."""
    succ_calling: str = "penalty"
    """How SuccCalling enters r_t: "penalty", α·(SuccCalling − 1): a failed or repeated call costs α, a successful
    one nothing, so an unneeded call cannot raise the return; "bonus", α·SuccCalling, the paper's formula, which pays
    every successful call and which online RL farms with unneeded calls."""
    call_bonus: float = 0.0
    """The constant of the PPO-calls control (--reward calls), paid on every successful, non-repeated intermediate
    call on top of IsSolved; the experiment sets it to StepTool's mean intermediate reward per call."""


SUCC_CALLING = {"penalty": lambda s: s - 1.0, "bonus": lambda s: s}    # how SuccCalling enters r_t, by name


# ----------------------------------------------------------------------------------------------------------------------
# The parts of the reward


def succ_calling(step) -> float:
    """SuccCalling(a_t, s_{t+1}) ∈ {0, 1}."""
    return float(step.success)


def _norm(value) -> str:
    """A leaf value as comparable text: lower case, numbers without trailing zeros."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{float(value):.12g}"
    return " ".join(str(value).split()).lower()


def _leaves(obj) -> dict:
    """Every scalar inside a JSON value: normalised text -> the value (booleans, None and "" are no information)."""
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        return {k: v for item in obj for k, v in _leaves(item).items()}
    return {} if obj is None or obj == "" or isinstance(obj, bool) else {_norm(obj): obj}


def _call_key(tool, args) -> tuple:
    """A call as comparable data: tool name and normalised arguments."""
    return tool, tuple(sorted((k, _norm(v) if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True))
                              for k, v in (args or {}).items()))


def repeated(steps, t: int) -> bool:
    """Is step t a tool call with the tool and normalised arguments of an earlier successful call of the episode?"""
    key = _call_key(steps[t].tool, steps[t].args)
    return steps[t].tool != "Finish" and any(s.success and _call_key(s.tool, s.args) == key for s in steps[:t])


def learned_values(steps, query: str, constants=()) -> list[dict]:
    """For each step, the values it learned (normalised text -> value): leaves of its successful response that are
    not in its own arguments, not a word or number of the query, not a constant the task fixes and not learned by an
    earlier step; at least 2 characters. A repeated call learns nothing."""
    seen, learned = {_norm(c) for c in constants}, []
    for t, step in enumerate(steps):
        new = {}
        if step.success and step.result is not None and step.tool != "Finish" and not repeated(steps, t):
            own = _leaves(step.args or {})
            new = {k: v for k, v in _leaves(step.result.response).items()
                   if len(k) >= 2 and k not in own and k not in seen and not mentions(query, v)}
        seen |= new.keys()
        learned.append(new)
    return learned


def _written(args) -> str:
    """A call's argument leaves as one text, for tools.mentions."""
    return " ; ".join(str(v) for v in _leaves(args or {}).values())


def contributions_used(steps, final_answer: str, query: str, constants=()) -> list[float]:
    """Contribution of every step under the "used" rule, from the last step back to the first: step t contributes
    when a value it learned is mentioned by the final answer or by the arguments of a later contributing step."""
    learned = learned_values(steps, query, constants)
    used = [0.0] * len(steps)
    for t in reversed(range(len(steps))):
        readers = [final_answer] + [_written(steps[u].args) for u in range(t + 1, len(steps)) if used[u]]
        used[t] = float(any(mentions(text, v) for v in learned[t].values() for text in readers))
    return used


def contribution_reference(steps, t: int, reference_chain) -> float:
    """Contribution(a_t) = 1 if step t is the first successful call, in this episode, of a call of the task's
    reference solution; 0 for any other call, for a failed one and for a repeat."""
    step = steps[t]
    key = _call_key(step.tool, step.args)
    if not step.success or key not in {_call_key(tool, args) for tool, args in reference_chain}:
        return 0.0
    return float(not any(s.success and _call_key(s.tool, s.args) == key for s in steps[:t]))


def lcs_length(a: str, b: str) -> int:
    """Longest common subsequence of two strings, O(len(a)·len(b)) dynamic programme over one row."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for ca in a:
        prev_diag = 0
        for j, cb in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if ca == cb else max(row[j], row[j - 1])
    return row[-1]


def contribution_lcs(steps, t: int, final_answer: str, query: str, threshold: float = 0.3) -> float:
    """Authors' rule-based Contribution: LCS(response_t, a_T) / len(a_T) ≥ threshold → 1, else 0."""
    step = steps[t]
    if not step.success or not final_answer:
        return 0.0
    response = step.result.response if step.result is not None else step.observation
    text = response if isinstance(response, str) else json.dumps(response, separators=(",", ":"))
    return float(lcs_length(text.lower(), final_answer.lower()) / len(final_answer) >= threshold)


# The Contribution rules by name (--contribution): fn(episode, cfg) -> [Contribution_t for every step t]
CONTRIBUTIONS = {
    "used": lambda ep, cfg: contributions_used(ep.steps, ep.final_answer or "", ep.task.query,
                                               getattr(ep.task, "constants", ())),
    "lcs": lambda ep, cfg: [contribution_lcs(ep.steps, t, ep.final_answer or "", ep.task.query, cfg.lcs_threshold)
                            for t in range(len(ep.steps))],
    "reference": lambda ep, cfg: [contribution_reference(ep.steps, t, getattr(ep.task, "reference_chain", []))
                                  for t in range(len(ep.steps))],
}


# ----------------------------------------------------------------------------------------------------------------------
# Reward functions: fn(episode, cfg) -> one reward per step


def is_solved(episode) -> float:
    """IsSolved(q, a_T): Solved 1, Unsure 0.5, Unsolved 0 (the judge of tools/, tools.check_answer)."""
    return check_answer(episode.final_answer or "", episode.task)


def _has_final_step(episode) -> bool:
    return bool(episode.steps) and episode.steps[-1].tool == "Finish" and episode.steps[-1].success


def _intermediate(episode) -> list:
    """The intermediate steps: all but a successful Finish at the end."""
    return episode.steps[:-1] if _has_final_step(episode) else episode.steps


def step_grained_reward(episode, cfg: RewardConfig) -> list[float]:
    """r_t = scale · (α · f(SuccCalling_t) + Contribution_t) for t < T, f from cfg.succ_calling, a repeated call
    earning neither part;   r_T = IsSolved."""
    if cfg.succ_calling not in SUCC_CALLING:
        raise ValueError(f"succ_calling must be one of {sorted(SUCC_CALLING)} (got {cfg.succ_calling!r})")
    form, contribution = SUCC_CALLING[cfg.succ_calling], CONTRIBUTIONS[cfg.contribution](episode, cfg)
    rewards = []
    for t, step in enumerate(_intermediate(episode)):
        fresh = not repeated(episode.steps, t)
        parts = (succ_calling(step), contribution[t]) if fresh else (0.0, 0.0)
        rewards.append(cfg.scale * (cfg.alpha * form(parts[0]) + parts[1]))
    return rewards + [is_solved(episode)] if _has_final_step(episode) else rewards


def final_reward(episode, cfg: RewardConfig) -> list[float]:
    """The baseline "PPO (Final Reward)": r_T = IsSolved on the last step, 0 on every other step."""
    if not episode.steps:
        return []
    return [0.0] * (len(episode.steps) - 1) + [is_solved(episode) if _has_final_step(episode) else 0.0]


def calls_reward(episode, cfg: RewardConfig) -> list[float]:
    """The control "PPO-calls": the final reward, plus cfg.call_bonus on every successful, non-repeated intermediate
    call. It gives a prior toward calling without step-grained credit."""
    rewards = final_reward(episode, cfg)
    for t, step in enumerate(_intermediate(episode)):
        rewards[t] += cfg.call_bonus * (step.success and not repeated(episode.steps, t))
    return rewards


REWARDS = {"step": step_grained_reward, "final": final_reward, "calls": calls_reward}
