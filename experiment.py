"""The paper's comparison on the embedded benchmark: SFT alone vs PPO with a final reward vs StepTool, 3 seeds,
with paired per-task statistics.

    python experiment.py [--preset default] [--seeds 0 1 2] [--methods PPO-final StepTool] [--out DIR]
                         [train.py flags...]

Runs `python train.py --preset P --seed S --out DIR/<method>-seed<S> <method flags> <other flags>` once per (method,
seed); a run whose results.json exists is reused, so the experiment resumes and can be re-tabulated without training.
Every RL run starts from the same cached SFT warm start (sft.py; its seed is fixed, the RL seed varies), gets the
same budget and is evaluated greedily on the same test list; the SFT outcomes come from each run's
`sft_test_outcomes` (one SFT run per seed when the runs agree, as they should).

Writes
  results/experiment-<preset>[-faults<percent>].json  {"preset", "test_task_ids", "test_task_groups": {id: group},
                                     "runs": [{"method", "seed", "fault_rate", "outcomes": {id: 0 | 0.5 | 1}}]}
  DIR/results.md                    pass rate per group (mean ± std over seeds) and the paired comparisons
  DIR/results.json                  the per-run test metrics train.py reported (pass rate and recall per group)
  DIR/val_pass.png                  validation pass rate against iteration, when matplotlib is installed

Paired comparisons (method A vs B: every method vs SFT, StepTool vs every other RL method), Solved = outcome 1:
  McNemar exact test, pooled over seeds: b = (task, seed) pairs only A solved, c = only B solved;
      p = min(1, 2 · Σ_{k ≤ min(b,c)} C(b+c, k) / 2^(b+c))
  95% bootstrap interval of the mean paired difference in pass rate: per task, the difference averaged over seeds;
      tasks resampled with replacement 10,000 times (fixed seed), percentile interval.
Deviation: the paper reports pass rates only; the paired statistics are ours, so that a few points on ~500 tasks
can be told from noise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np

METHODS = {"PPO-final": ["--reward", "final"], "StepTool": ["--reward", "step"],
           "StepTool-group": ["--advantage", "step-group", "--group-size", "4"]}   # 32 episodes = 8 tasks x 4
DEFAULT_METHODS = ["PPO-final", "StepTool"]
RUN_DIR_TAG = {"PPO-final": "ppo"}     # run directories from before the rename ("ppo-seed0") are reused
GROUPS = ["G1", "G2", "G3", "all"]


def run(out: str, preset: str, seed: int, flags: list, extra: list, n_test: int | None = None) -> dict:
    """train.py's results.json for one (method, seed). A finished run is reused: the experiment resumes. With n_test,
    a finished run evaluated on another test list resumes from its last checkpoint, trains nothing more, and is
    evaluated on the first n_test tasks of the fixed test list (--n-test may change on --resume)."""
    path = os.path.join(out, "results.json")

    def load():
        with open(path) as f:
            return json.load(f)
    result = load() if os.path.exists(path) else None
    if result is None or (n_test is not None and len(result["test_outcomes"]) != n_test):
        cmd = [sys.executable, "train.py", "--out", out, "--preset", preset, "--seed", str(seed), "--resume",
               *flags, *extra, *(["--n-test", str(n_test)] if n_test is not None else [])]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        result = load()
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Statistics: small pure functions


def solved(outcome) -> int:
    return int(outcome == 1)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under H0 each of the b + c discordant pairs is a fair coin."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


def paired_counts(a_outcomes: dict, b_outcomes: dict) -> tuple[int, int]:
    """(b, c) over the tasks both dicts hold: b = solved by A only, c = solved by B only."""
    shared = a_outcomes.keys() & b_outcomes.keys()
    b = sum(solved(a_outcomes[t]) and not solved(b_outcomes[t]) for t in shared)
    c = sum(solved(b_outcomes[t]) and not solved(a_outcomes[t]) for t in shared)
    return b, c


def bootstrap_ci(diffs, n_resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` (one value per task), tasks resampled with replacement."""
    diffs = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(n_resamples, len(diffs)))].mean(axis=1)   # (R,)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def compare(runs: list, a: str, b: str, task_ids: list) -> dict:
    """A vs B over the seeds both were run with: McNemar counts pooled over (task, seed), per-task difference."""
    by = {}
    for r in runs:                                   # a seed's SFT run twice (runs disagreed): the first, as reported
        by.setdefault((r["method"], r["seed"]), r["outcomes"])
    seeds = sorted({s for m, s in by if m == a} & {s for m, s in by if m == b})
    if not seeds:
        return {"a": a, "b": b, "seeds": []}
    counts = [paired_counts(by[a, s], by[b, s]) for s in seeds]
    bs, cs = sum(x for x, _ in counts), sum(y for _, y in counts)
    diffs = [statistics.mean(solved(by[a, s][t]) - solved(by[b, s][t]) for s in seeds) for t in task_ids]
    return {"a": a, "b": b, "seeds": seeds, "b_count": bs, "c_count": cs, "p": mcnemar_exact(bs, cs),
            "diff": statistics.mean(diffs), "ci": bootstrap_ci(diffs)}


# ----------------------------------------------------------------------------------------------------------------------
# From train.py's results to the experiment file, and to tables


def groups_of_test_tasks(result: dict, task_ids: list) -> dict:
    """{task id: "G1" | "G2" | "G3"}: from results.json if train.py wrote it, else from the task suite."""
    if "test_task_groups" in result:
        return {t: f"G{int(str(g).lstrip('G'))}" for t, g in result["test_task_groups"].items()}
    import tools                                     # the test list is a prefix of the suite's: rebuild it
    suite = tools.make_suite(result.get("config", {}).get("suite", "tiny"))
    groups = {t.id: f"G{t.group}" for t in suite.tasks("test", len(task_ids), seed=0)}
    missing = [t for t in task_ids if t not in groups]
    if missing:
        raise ValueError(f"cannot tell the group of test task(s) {missing[:3]}: results.json has no test_task_groups")
    return {t: groups[t] for t in task_ids}


def experiment_record(preset: str, results: dict) -> dict:
    """results: {(method, seed): train.py's results.json} -> the experiment file's content (see the docstring)."""
    first = next(iter(results.values()))
    task_ids = list(first["test_outcomes"])
    runs, sft_by_seed = [], {}
    for (method, seed), result in results.items():
        for key in ("test_outcomes", "sft_test_outcomes"):
            if sorted(result[key]) != sorted(task_ids):
                raise ValueError(f"{method} seed {seed}: {key} covers other test tasks than the first run's")
        fault_rate = result.get("config", {}).get("fault_rate", 0.0)
        sft = {"method": "SFT", "seed": seed, "fault_rate": fault_rate, "outcomes": result["sft_test_outcomes"]}
        if sft not in sft_by_seed.setdefault(seed, []):          # identical SFT evaluations are one run
            sft_by_seed[seed].append(sft)
        runs.append({"method": method, "seed": seed, "fault_rate": fault_rate, "outcomes": result["test_outcomes"]})
    for seed, sft_runs in sft_by_seed.items():
        if len(sft_runs) > 1:
            print(f"warning: the SFT warm start scored differently across runs of seed {seed}; comparisons with SFT "
                  f"use the first", file=sys.stderr)
    return {"preset": preset, "test_task_ids": task_ids, "test_task_groups": groups_of_test_tasks(first, task_ids),
            "runs": [r for seed in sft_by_seed for r in sft_by_seed[seed]] + runs}


def pass_table(record: dict) -> str:
    """Pass rate per group, mean ± std over seeds, one row per method."""
    groups = record["test_task_groups"]
    methods = list(dict.fromkeys(r["method"] for r in record["runs"]))
    lines = ["| method | seeds | " + " | ".join(f"{g} pass" for g in GROUPS) + " |", "|---" * (2 + len(GROUPS)) + "|"]
    for method in methods:
        seen, per_seed = set(), []
        for r in record["runs"]:
            if r["method"] == method and r["seed"] not in seen:     # a seed's SFT run twice: the first, as compare()
                seen.add(r["seed"])
                per_seed.append(r["outcomes"])
        cells = []
        for g in GROUPS:
            ids = [t for t in record["test_task_ids"] if g == "all" or groups[t] == g]
            rates = [statistics.mean(solved(o[t]) for t in ids) for o in per_seed]
            m, s = statistics.mean(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        lines.append(f"| {method} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(record: dict) -> list[dict]:
    """Every method vs SFT, and StepTool vs every other RL method."""
    methods = [m for m in dict.fromkeys(r["method"] for r in record["runs"]) if m != "SFT"]
    pairs = [(m, "SFT") for m in methods]
    pairs += [("StepTool", m) for m in methods if m != "StepTool" and "StepTool" in methods]
    rows = [compare(record["runs"], a, b, record["test_task_ids"]) for a, b in pairs]
    return [r for r in rows if r["seeds"]]


def comparison_table(rows: list[dict]) -> str:
    lines = ["| A vs B | seeds | b (only A) / c (only B) | Δ pass (points) | 95% CI | McNemar p |", "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['a']} vs {r['b']} | {len(r['seeds'])} | {r['b_count']} / {r['c_count']} | "
                     f"{100 * r['diff']:+.1f} | [{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}] | {r['p']:.3g} |")
    return "\n".join(lines)


def diagnostics_table(results: dict) -> str:
    """What the runs did, beyond pass rates (issue: a result that disappoints is shown with its diagnostics): per
    method, averaged over seeds, from each run's test transcripts and its last PPO iteration."""
    STOPS = ["finish", "give_up", "max_steps", "token_budget"]
    lines = ["| method | steps/episode G1 / G2 / G3 | stop: " + " / ".join(STOPS) + " (%) | test tasks whose greedy "
             "actions changed vs SFT (%) | last iteration: train return / explained variance / invalid actions |",
             "|---" * 5 + "|"]
    first = next(iter(results.values()))                     # one warm start: every run's SFT transcripts are the same
    rows = {"SFT": [(first["sft_test_transcripts"], first["sft_test_transcripts"], None)]}
    for (method, _), r in results.items():
        rows.setdefault(method, []).append((r["test_transcripts"], r["sft_test_transcripts"], r["history"][-1]))
    groups = groups_of_test_tasks(first, list(first["test_outcomes"]))
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    for method, runs in rows.items():
        steps = " / ".join(f"{mean([mean([len(t[i]['actions']) for i in t if groups[i] == g]) for t, _, _ in runs]):.2f}"
                           for g in ("G1", "G2", "G3"))
        stops = " / ".join(f"{100 * mean([mean([t[i]['stop'] == s for i in t]) for t, _, _ in runs]):.0f}"
                           for s in STOPS)
        changed = mean([mean([t[i]["actions"] != sft[i]["actions"] for i in t]) for t, sft, _ in runs])
        last = [h for _, _, h in runs if h]
        train = " / ".join(f"{mean([h[k] for h in last]):.2f}" for k in ("return", "explained_variance", "invalid"))
        lines.append(f"| {method} | {steps} | {stops} | {100 * changed:.0f} | {train if last else '-'} |")
    return "\n".join(lines)


def fault_table(results: dict) -> str:
    """Under injected faults (issue: does RL teach the model to retry?): per method, mean over seeds of the test
    evaluation's share of calls that hit a fault, the share of those the model retried (the same call next step),
    and the pass rate; SFT is evaluated per seed on that seed's fault stream, as the RL run it is compared with."""
    rows = {}
    for (method, seed), r in results.items():
        rows.setdefault("SFT", {}).setdefault(seed, r["sft_test"]["all"])
        rows.setdefault(method, {})[seed] = r["test"]["all"]
    lines = ["| method | seeds | calls that hit a fault (%) | faults retried next step (%) | pass (%) |", "|---" * 5 + "|"]
    for method, by_seed in rows.items():
        cells = [f"{100 * statistics.mean(m[k] for m in by_seed.values()):.1f}"
                 for k in ("fault_rate", "retry_after_fault", "pass_rate")]
        lines.append(f"| {method} | {len(by_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def record_file(preset: str, record: dict, n_test: int | None = None) -> str:
    """experiment-<preset>.json; -faults<percent> for runs under injected faults, -test<n> for a test list of another
    length than the preset's (--n-test)."""
    rate = max(r["fault_rate"] for r in record["runs"])
    return (f"experiment-{preset}" + (f"-faults{round(100 * rate)}" if rate else "")
            + (f"-test{n_test}" if n_test is not None else "") + ".json")


def plot(histories: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in zip(histories, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")):
        for i, (start, history) in enumerate(histories[name]):
            points = [(-1, start)] + [(h["iter"], h["val_pass"]) for h in history if "val_pass" in h]
            ax.plot([p[0] + 1 for p in points], [p[1] for p in points], color=color, alpha=0.8,
                    label=name if i == 0 else None, marker="o", markersize=3)
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("validation pass rate")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", help="train.py preset, passed through")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), metavar="NAME",
                        help=f"RL methods to run (from {', '.join(METHODS)}; default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--out", help="run directory (default: runs/experiment, or runs/experiment-<preset>)")
    parser.add_argument("--results-dir", default="results", help="where experiment-<preset>.json goes")
    parser.add_argument("--n-test", type=int, help="evaluate on the first N test tasks instead of the preset's; "
                        "finished runs are re-evaluated from their last checkpoint, not retrained")
    args, extra = parser.parse_known_args(argv)
    out = args.out or ("runs/experiment" if args.preset == "default" else f"runs/experiment-{args.preset}")
    os.makedirs(out, exist_ok=True)
    results, histories = {}, {}
    for method in args.methods:
        histories[method] = []
        for seed in args.seeds:
            tag = RUN_DIR_TAG.get(method, method.lower())
            result = run(os.path.join(out, f"{tag}-seed{seed}"), args.preset, seed, METHODS[method], extra, args.n_test)
            results[method, seed] = result
            histories[method].append((result["sft_val"]["all"]["pass_rate"], result["history"]))
    record = experiment_record(args.preset, results)
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, record_file(args.preset, record, args.n_test))
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    md = (f"Test list of {len(record['test_task_ids'])} tasks, seeds {args.seeds}: pass rate (%), mean ± std over "
          f"seeds\n\n{pass_table(record)}\n\nPaired per task (Solved = outcome 1): McNemar exact p pooled over seeds, "
          f"bootstrap 95% CI over tasks\n\n{comparison_table(comparisons(record))}\n")
    if all("test_transcripts" in r for r in results.values()):
        md += f"\nDiagnostics (mean over seeds)\n\n{diagnostics_table(results)}\n"
    if any(r["fault_rate"] for r in record["runs"]):
        md += f"\nUnder injected faults (test evaluation, mean over seeds)\n\n{fault_table(results)}\n"
    print(md)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({f"{m} seed {s}": {"sft_test": r["sft_test"], "test": r["test"]} for (m, s), r in results.items()},
                  f, indent=1)
    print(f"wrote {path}")
    if plot(histories, os.path.join(out, "val_pass.png")):
        print(f"wrote {os.path.join(out, 'val_pass.png')}")


if __name__ == "__main__":
    main()
