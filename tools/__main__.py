"""Look at the environment from the command line.

    python -m tools list                                   the tools' OpenAI-style schemas (JSON array)
    python -m tools sample --split test --n 5 --seed 0 [--group 2]      tasks as JSON lines
    python -m tools call TOOL 'JSON_ARGS'                  one call and its response
    python -m tools solve --split test --n 500 [--fault-rate 0.3]       the scripted expert's solve rate per group
    --tasks toolbench:PATH.json on list/sample/call        use an imported ToolBench query file instead
"""
import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict

from . import SOLVED, Environment, FaultConfig, check_answer, expert_episode, final_answer_of, load_toolbench, make_tasks


def environment(tasks_flag: str):
    if not tasks_flag:
        return Environment(), None
    kind, _, path = tasks_flag.partition(":")
    if kind != "toolbench" or not path:
        raise ValueError(f"--tasks must be toolbench:PATH.json (got {tasks_flag!r})")
    return load_toolbench(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("list", "sample", "call", "solve"):
        p = sub.add_parser(name)
        p.add_argument("--tasks", default="")
        if name in ("sample", "solve"):
            p.add_argument("--split", default="test", choices=["train", "val", "test"])
            p.add_argument("--n", type=int, default=5 if name == "sample" else 500)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--group", type=int, choices=[1, 2, 3])
        if name == "call":
            p.add_argument("tool")
            p.add_argument("args")
        if name == "solve":
            p.add_argument("--fault-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        env, imported = environment(args.tasks)
        if args.command == "list":
            print(json.dumps(env.schemas(), indent=1))
        elif args.command == "sample":
            tasks = imported[:args.n] if imported is not None else make_tasks(args.split, args.n, args.seed, args.group)
            for task in tasks:
                print(json.dumps(asdict(task)))
        elif args.command == "call":
            try:
                call_args = json.loads(args.args)
            except json.JSONDecodeError as e:
                raise ValueError(f"JSON_ARGS is not valid JSON: {e.msg}") from None
            result = env.call(args.tool, call_args)
            print(result.text)
            return 0 if result.ok else 1
        else:
            env = Environment(faults=FaultConfig(args.fault_rate, seed=args.seed) if args.fault_rate else None)
            solved, total = defaultdict(int), defaultdict(int)
            for task in make_tasks(args.split, args.n, args.seed, args.group):
                total[task.group] += 1
                solved[task.group] += check_answer(final_answer_of(expert_episode(task, env)), task) == SOLVED
            for g in sorted(total):
                print(f"G{g}: {100 * solved[g] / total[g]:.1f}% of {total[g]}")
            print(f"all: {100 * sum(solved.values()) / sum(total.values()):.1f}% of {sum(total.values())}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
