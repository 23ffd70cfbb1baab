"""Step-grained reward shaping (StepTool, Sec. 3.1) and the final-only baseline.

Who calls it: train.py, after each rollout, fills `episode.rewards` (one float per step) with a reward function.
Every reward function has the same signature, `fn(episode, cfg) -> list[float]`, so another one (a judge model,
say) can be swapped in through the REWARDS dict.

    intermediate step t < T:  r_t = α · SuccCalling(a_t, s_{t+1}) + Contribution(a_t, a_T)
    final step T:             r_T = IsSolved(q, a_T)          (Solved 1, Unsure 0.5, Unsolved 0)

Choices and deviations:
 1. SuccCalling ∈ {0, 1} is read from the step record: the action parsed, the tool exists, the arguments passed the
    schema, and the tool answered without error (injected faults count as failures, as a real API's would).
 2. Contribution ∈ {0, 1} by default is the "used" rule: does a value the step *learned* (a leaf of its response that
    is not already in its own arguments or the user query) appear in a later call's arguments or in the final answer?
    The paper's annotators scored 0–5 with GPT-4; `contribution="lcs"` is the authors' rule-based variant: the
    longest-common-subsequence ratio between the tool response and the final answer, ≥ 0.3 → 1 else 0. (The ratio's
    denominator is not stated; we divide by the final answer's length, the string the response should explain.)
    `contribution="reference"` plays the annotator who knows the solution: the step is the first successful call of
    one of the task's reference calls (tool and arguments). "used" and "lcs" pay a call with a wrong argument whose
    (wrong) value flows into the answer, the main failure of a small model (README, "Training under 30% tool
    faults"); this rule does not. It needs tasks with a reference chain (the mocked suites; ToolBench imports have
    none: 0 everywhere).
 3. An episode that ends without Finish (max steps, token budget) has no a_T: all its steps are intermediate and
    the episode earns no IsSolved (0). A `give_up_and_restart` Finish is judged like any answer (it has none: 0).
 4. Default α = 0.5, with `scale=0.5` the step rewards stay in [0, 1] like the released data
    (r_t = (SuccCalling + Contribution)/2 when α = 1). α in [0, 1] is sensible: above 1 a successful but useless
    call earns more than a solved task, and the policy learns to pad episodes with calls (see README).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tools import check_answer


@dataclass
class RewardConfig:
    alpha: float = 0.5
    """Weight α of SuccCalling in the intermediate reward."""
    contribution: str = "used"
    """How Contribution is decided: "used" (values flow into later calls or the answer), "lcs" (authors' rule) or
    "reference" (the step is a call of the task's reference solution)."""
    lcs_threshold: float = 0.3
    """For contribution="lcs": the LCS ratio at or above which a step counts as contributing."""
    scale: float = 0.5
    """Multiplies every intermediate reward, so that α·1 + 1 stays ≤ 1 for α ≤ 1 (the released data's [0, 1])."""


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
        return f"{float(value):.6g}"
    return re.sub(r"\s+", " ", str(value)).strip().lower()


def _leaves(obj) -> set[str]:
    """Every scalar inside a JSON value, normalised."""
    if isinstance(obj, dict):
        return set().union(*map(_leaves, obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*map(_leaves, obj)) if obj else set()
    return {_norm(obj)} if obj is not None and obj != "" else set()


def _mentions(text: str) -> set[str]:
    """The leaf-comparable pieces of free text: numbers (commas dropped) and the text itself."""
    numbers = {_norm(float(n)) for n in re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))}
    return numbers | {_norm(text)}


def learned_values(step, query: str) -> set[str]:
    """Leaves of the step's response that the agent did not already know (not in its arguments or the query)."""
    if not step.success or step.result is None:
        return set()
    known = _leaves(step.args or {}) | _mentions(query)
    return {v for v in _leaves(step.result.response) if v not in known and len(v) >= 2}


def contribution_used(steps, t: int, final_answer: str, query: str) -> float:
    """Contribution(a_t, a_T) = 1 if a value learned at step t appears in a later step's arguments or in the
    final answer, else 0."""
    learned = learned_values(steps[t], query)
    if not learned:
        return 0.0
    later = set().union(*(_leaves(s.args or {}) for s in steps[t + 1:] if s.tool != "Finish"))
    answer = final_answer.lower()
    answer_numbers = _mentions(final_answer)
    used = any(v in later or v in answer_numbers or (not _is_number(v) and v in answer) for v in learned)
    return float(used)


def _call_key(tool, args) -> tuple:
    """A call as comparable data: tool name and normalised arguments."""
    return tool, tuple(sorted((k, _norm(v) if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True))
                              for k, v in (args or {}).items()))


def contribution_reference(steps, t: int, reference_chain) -> float:
    """Contribution(a_t) = 1 if step t is the first successful call, in this episode, of a call of the task's
    reference solution; 0 for any other call, for a failed one and for a repeat (repeats would farm the reward)."""
    step = steps[t]
    key = _call_key(step.tool, step.args)
    if not step.success or key not in {_call_key(tool, args) for tool, args in reference_chain}:
        return 0.0
    return float(not any(s.success and _call_key(s.tool, s.args) == key for s in steps[:t]))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


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


# The Contribution rules by name (--contribution): fn(episode, t, cfg) -> Contribution of step t
CONTRIBUTIONS = {
    "used": lambda ep, t, cfg: contribution_used(ep.steps, t, ep.final_answer or "", ep.task.query),
    "lcs": lambda ep, t, cfg: contribution_lcs(ep.steps, t, ep.final_answer or "", ep.task.query, cfg.lcs_threshold),
    "reference": lambda ep, t, cfg: contribution_reference(ep.steps, t, ep.task.reference_chain),
}


# ----------------------------------------------------------------------------------------------------------------------
# Reward functions: fn(episode, cfg) -> one reward per step


def is_solved(episode) -> float:
    """IsSolved(q, a_T): Solved 1, Unsure 0.5, Unsolved 0 (the answer checker of tools/)."""
    return check_answer(episode.final_answer or "", episode.task)


def _has_final_step(episode) -> bool:
    return bool(episode.steps) and episode.steps[-1].tool == "Finish" and episode.steps[-1].success


def step_grained_reward(episode, cfg: RewardConfig) -> list[float]:
    """r_t = scale · (α · SuccCalling_t + Contribution_t) for t < T;   r_T = IsSolved."""
    steps, contribution = episode.steps, CONTRIBUTIONS[cfg.contribution]
    final = _has_final_step(episode)
    rewards = [cfg.scale * (cfg.alpha * succ_calling(s) + contribution(episode, t, cfg))
               for t, s in enumerate(steps[:-1] if final else steps)]
    return rewards + [is_solved(episode)] if final else rewards


def final_reward(episode, cfg: RewardConfig) -> list[float]:
    """The baseline "PPO (Final Reward)": r_T = IsSolved on the last step, 0 on every other step."""
    if not episode.steps:
        return []
    return [0.0] * (len(episode.steps) - 1) + [is_solved(episode) if _has_final_step(episode) else 0.0]


REWARDS = {"step": step_grained_reward, "final": final_reward}
