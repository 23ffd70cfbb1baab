"""The ReAct action format, written and read in one place.

    Thought: I need the weather in Lorvik.
    Action: get_weather
    Action Input: {"city":"Lorvik"}

`format_action` writes it (the scripted expert's demonstrations); `parse_action` reads it (the rollout, the offline
rows, the expert reading its own history). tests/test_parse_action.py checks that the two round-trip and that
parsing never raises. A step ends with `Action: Finish` and {"return_type": "give_answer", "final_answer": "..."}
(or "give_up_and_restart"), as in ToolBench.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


def format_action(thought: str, tool: str, args: dict) -> str:
    """The ReAct action text: compact JSON, non-ASCII kept as is."""
    args_json = json.dumps(args, separators=(",", ":"), ensure_ascii=False)
    return f"Thought: {thought}\nAction: {tool}\nAction Input: {args_json}"


@dataclass
class Action:
    tool: str | None = None
    args: dict | None = None
    thought: str = ""
    error: str = ""          # non-empty: the action is invalid and this tells the model why


_ACTION = re.compile(r"^\s*Action:[ \t]*(.*?)[ \t]*$", re.M)
_INPUT = re.compile(r"^\s*Action Input:[ \t]*", re.M)
_THOUGHT = re.compile(r"Thought:[ \t]*(.*?)\s*(?=^\s*Action:|\Z)", re.M | re.S)


def parse_action(text: str, truncated: bool = False) -> Action:
    """Read `Thought: ...\\nAction: NAME\\nAction Input: {json}` (the policy's text, the expert's, offline rows).
    Every failure becomes Action.error, never an exception: the rollout turns it into an error observation."""
    if truncated:
        return Action(error="Invalid action: the action was cut off at the length limit; keep actions short.")
    if not isinstance(text, str):
        return Action(error="Invalid action: not text.")
    m = _THOUGHT.search(text)
    thought = m.group(1).strip() if m else ""
    m = _ACTION.search(text)
    if not m or not m.group(1):
        return Action(thought=thought, error="Invalid action: missing 'Action: <tool name>' line.")
    tool = m.group(1)
    m_in = _INPUT.search(text, m.end())
    if not m_in:
        return Action(tool, thought=thought, error="Invalid action: missing 'Action Input: {...}' line.")
    rest = text[m_in.end():]
    try:
        args, end = json.JSONDecoder().raw_decode(rest)
    except (json.JSONDecodeError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        return Action(tool, thought=thought, error=f"Invalid action: Action Input is not valid JSON ({msg}).")
    if not isinstance(args, dict):
        return Action(tool, thought=thought, error="Invalid action: Action Input must be a JSON object.")
    if rest[end:].strip():
        return Action(tool, args, thought, error="Invalid action: unexpected text after the Action Input JSON.")
    if tool == "Finish":
        kind = args.get("return_type")
        if kind not in ("give_answer", "give_up_and_restart"):
            return Action(tool, args, thought,
                          error='Invalid action: Finish needs "return_type": "give_answer" or "give_up_and_restart".')
        if kind == "give_answer" and not isinstance(args.get("final_answer"), str):
            return Action(tool, args, thought, error='Invalid action: Finish needs a "final_answer" string.')
    return Action(tool, args, thought)
