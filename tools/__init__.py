"""Mocked tool APIs, multi-step task suites with ground truth ("tiny" and "large", tools.make_suite), a scripted
expert, the judge (tools/judge.py: check_answer; JUDGE_VERSION names its behaviour), the ReAct action format (format_action /
parse_action), ToolBench import.

Pure Python, deterministic, offline. See README ("The task suite") and `python -m tools --help`.
"""
from .actions import Action, format_action, parse_action
from .apis import SCHEMAS, Environment, FaultConfig, ToolResult, FAULT_KINDS, calculate
from .judge import JUDGE_VERSION, check_answer, mentions, written_numbers
from .tasks import (SOLVED, SUITE_SPLITS, UNSOLVED, UNSURE, TASK_TYPES, Expert, Task, expert_episode, final_answer_of,
                    make_suite, make_tasks, relevant_tool_recall, suite_fingerprint)
from .toolbench import load_toolbench
