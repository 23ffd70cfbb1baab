"""Look at the environment from the command line.

    python -m tools list                                   the tools' OpenAI-style schemas (JSON array)
    python -m tools sample --split test --n 5 --seed 0 [--group 2]      tasks as JSON lines
    python -m tools call TOOL 'JSON_ARGS'                  one call's response text (exit 1 if it is an error)
    python -m tools solve --split test --n 500 [--fault-rate 0.3]       the scripted expert's solve rate per group
    --suite large on sample/solve                          the entity-disjoint suite (val/test: the fixed lists;
                                                           --n defaults to all of them for solve)
    --tasks toolbench:PATH.json on list/sample/call        use an imported ToolBench query file instead

Exit status: 0 on success, 1 on a failed call or bad input (one line on stderr), 2 on a usage error (argparse).
"""
import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict

from . import (SOLVED, SUITE_SPLITS, Environment, FaultConfig, check_answer, expert_episode, final_answer_of,
               load_toolbench, make_suite)


def environment(tasks_flag: str):
    """(Environment, imported tasks or None) for the --tasks flag."""
    if not tasks_flag:
        return Environment(), None
    kind, _, path = tasks_flag.partition(":")
    if kind != "toolbench" or not path:
        raise ValueError(f"--tasks must be toolbench:PATH.json (got {tasks_flag!r})")
    return load_toolbench(path)


def solve(suite: str, split: str, n, seed: int, group, fault_rate: float) -> list[str]:
    """The scripted expert on n tasks of the suite: one line per group, then the total."""
    env = make_suite(suite).environment(FaultConfig(fault_rate, seed=seed) if fault_rate else None)
    solved, total = defaultdict(int), defaultdict(int)
    for task in make_suite(suite).tasks(split, n, seed, group):
        total[task.group] += 1
        solved[task.group] += check_answer(final_answer_of(expert_episode(task, env)), task) == SOLVED
    lines = [f"G{g}: {100 * solved[g] / total[g]:.1f}% of {total[g]}" for g in sorted(total)]
    if total:
        lines.append(f"all: {100 * sum(solved.values()) / sum(total.values()):.1f}% of {sum(total.values())}")
    return lines


def parser() -> argparse.ArgumentParser:
    summary, *usage = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m tools", description=summary, epilog="\n\n".join(usage),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"list": "print the tools' schemas", "sample": "print tasks as JSON lines", "call": "call one tool",
             "solve": "run the scripted expert and print its solve rate per group"}
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text)
        if name != "solve":
            s.add_argument("--tasks", default="", metavar="toolbench:PATH.json",
                           help="use the tools (and tasks) of a ToolBench query file")
        if name in ("sample", "solve"):
            s.add_argument("--suite", default="tiny", choices=["tiny", "large"])
            s.add_argument("--split", default="test", choices=SUITE_SPLITS)
            s.add_argument("--n", type=int, help="number of tasks (default: 5 for sample; 500 for solve, or the "
                                                 "whole fixed list of the large suite's val/test)")
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--group", type=int, choices=[1, 2, 3], help="only this group (default: all, uniform)")
        if name == "call":
            s.add_argument("tool", help="tool name, see `python -m tools list`")
            s.add_argument("args", help='arguments as a JSON object, e.g. \'{"city": "Seljun"}\'')
        if name == "solve":
            s.add_argument("--fault-rate", type=float, default=0.0, help="probability of an injected fault per call")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("sample", "solve") and args.n is None:
        fixed = args.suite == "large" and args.split in ("val", "test")
        args.n = 5 if args.command == "sample" else None if fixed else 500
    try:
        if (getattr(args, "n", 0) or 0) < 0:
            raise ValueError(f"--n must be >= 0 (got {args.n})")
        if not 0.0 <= getattr(args, "fault_rate", 0.0) <= 1.0:
            raise ValueError(f"--fault-rate must be between 0 and 1 (got {args.fault_rate})")
        if args.command == "solve":
            print("\n".join(solve(args.suite, args.split, args.n, args.seed, args.group, args.fault_rate)))
            return 0
        env, imported = environment(args.tasks)
        if args.command == "list":
            print(json.dumps(env.schemas(), indent=1))
        elif args.command == "sample":
            if imported is None:
                tasks = make_suite(args.suite).tasks(args.split, args.n, args.seed, args.group)
            else:                                  # an imported file: its own order; --split/--seed do not apply
                tasks = [t for t in imported if args.group in (None, t.group)][:args.n]
            for task in tasks:
                print(json.dumps(asdict(task), ensure_ascii=False))
        else:
            try:
                call_args = json.loads(args.args)
            except json.JSONDecodeError as e:
                raise ValueError(f"JSON_ARGS is not valid JSON ({e.msg} at column {e.colno}): {args.args[:80]}") \
                    from None
            result = env.call(args.tool, call_args)
            print(result.text)
            if not result.ok:
                print(f"error: {result.error}", file=sys.stderr)
                return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
