"""Offline step-grained training data in the StepTool authors' format.

Who calls it: train.py with `--offline-data FILE` (then PPO trains on these fixed trajectories instead of rollouts).

The format: a tab-separated file with header `prompt	response	reward`, fields quoted CSV-style, each field a Python
literal list (parsed with ast.literal_eval, never eval):
  prompt[i]    the context before step i (prompt[0]: system + user turns; later: the tool observation and the opening
               of the next assistant turn), already in the chat template of the model it was made for;
  response[i]  the model's output at step i (`Thought: ...\nAction: ...\nAction Input: {...}`[+ end-of-turn]);
  reward[i]    one float in [0, 1] per step.

Choices:
 1. Strings are opaque: each segment is tokenised on its own and prompt[i], response[i] are interleaved (no chat
    template is applied, whatever it is: ChatML, Llama-3 headers or ToolLLaMA's plain roles).
 2. Masks follow rollout.py: response tokens are actions (mask 1) of step i; prompt[i + 1] (the observation) belongs
    to step i; prompt[0] is step -1.
 3. A row that does not parse is reported with the line it starts on and skipped; zero usable rows is an error.
 4. A sequence longer than the context is cut from the left by whole steps (their rewards go too), keeping the last
    step whole; if the last step alone is too long, the left of its prompt is cut.
 5. The data are fixed, so PPO's ratio is taken against the policy before each update (as the authors' code does):
    ppo_update recomputes the old log-probs; the stored ones are zeros.
"""
from __future__ import annotations

import ast
import csv
import sys
from dataclasses import dataclass

from rollout import Episode, Step
from tools import parse_action


@dataclass
class OfflineTask:
    """Stand-in for tools.Task: offline rows have no ground truth to check."""
    query: str = ""
    group: int = 0
    facts: tuple = ()
    relevant_tools: tuple = ()
    answer: str = ""


def _parse_row(row: list) -> tuple[list, list, list]:
    if len(row) != 3:
        raise ValueError(f"expected 3 fields, got {len(row)}")
    try:
        prompts, responses, rewards = (ast.literal_eval(field) for field in row)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise ValueError(f"a field is not a Python literal ({type(e).__name__})") from None
    if not all(isinstance(x, list) for x in (prompts, responses, rewards)):
        raise ValueError("every field must be a list")
    if not prompts or not (len(prompts) == len(responses) == len(rewards)):
        raise ValueError(f"list lengths differ or are empty ({len(prompts)}, {len(responses)}, {len(rewards)})")
    if not all(isinstance(s, str) for s in prompts + responses):
        raise ValueError("prompts and responses must be strings")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1 for r in rewards):
        raise ValueError("rewards must be numbers in [0, 1]")
    return prompts, responses, [float(r) for r in rewards]


def to_episode(prompts, responses, rewards, tokenizer, max_len: int) -> tuple[Episode, bool]:
    """Interleave the segments into one Episode; cut from the left to max_len tokens (choice 4)."""
    p_ids = [tokenizer.encode(p) for p in prompts]
    r_ids = [tokenizer.encode(r) for r in responses]
    first, truncated = 0, False
    while first < len(prompts) - 1 and sum(map(len, p_ids[first:] + r_ids[first:])) > max_len:
        first, truncated = first + 1, True                    # drop the earliest step whole
    keep = max_len - sum(map(len, p_ids[first + 1:] + r_ids[first:]))
    if len(p_ids[first]) > keep:
        p_ids[first], truncated = p_ids[first][max(0, len(p_ids[first]) - keep):], True
    ep = Episode(OfflineTask(query=prompts[0][-200:]), stop_reason="offline")
    ep.append(p_ids[first], False, -1)
    for i in range(first, len(prompts)):
        ep.append(r_ids[i], True, i - first)
        if i + 1 < len(prompts):
            ep.append(p_ids[i + 1], False, i - first)
        action = parse_action(responses[i])
        ep.steps.append(Step(responses[i], action.tool, action.args, prompts[i + 1] if i + 1 < len(prompts) else "",
                             not action.error, action.error))
    last = ep.steps[-1]
    ep.final_answer = (last.args or {}).get("final_answer") if last.tool == "Finish" else None
    ep.rewards = rewards[first:]
    return ep, truncated


def load_offline(path: str, tokenizer, max_len: int, log=print) -> list[Episode]:
    """Episodes from an authors'-format TSV; malformed rows are reported by line and skipped."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))        # fields can be tens of kB
    try:
        f = open(path, newline="")
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot open offline data ({e.strerror})") from None
    episodes, skipped, truncated = [], [], 0
    with f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header != ["prompt", "response", "reward"]:
            raise ValueError(f"{path}: the header must be prompt<TAB>response<TAB>reward (got {header})")
        line = reader.line_num + 1
        for row in reader:
            try:
                ep, cut = to_episode(*_parse_row(row), tokenizer, max_len)
                episodes.append(ep)
                truncated += cut
            except ValueError as e:
                skipped.append(line)
                log(f"{path}:{line}: skipped: {e}")
            line = reader.line_num + 1
    log(f"{path}: {len(episodes)} rows loaded, {len(skipped)} skipped"
        + (f" (lines {', '.join(map(str, skipped[:10]))}{'...' if len(skipped) > 10 else ''})" if skipped else "")
        + f", {truncated} truncated to {max_len} tokens")
    if not episodes:
        raise ValueError(f"{path}: no usable rows")
    return episodes
