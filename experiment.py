"""The paper's comparison on the embedded benchmark: SFT alone vs PPO with a final reward vs StepTool and its
controls, over warm starts and RL seeds, with statistics whose unit is the run (stats.py).

    python experiment.py [--preset default] [--methods PPO-final StepTool] [--sft-seeds 0] [--seeds 0 1 2]
                         [--out DIR] [--n-test N] [--call-bonus C] [--replace-record] [train.py flags...]
    python experiment.py --rejudge results/experiment-smollm2-ws0-controls.json
    python experiment.py --reproduce RECORD|RESULTS.json --method SFT --warm-start 0 [--seed S] [--out DIR]
    python experiment.py --measure-call-bonus RUN_DIR [RUN_DIR ...]
    python experiment.py --expert-logprobs MODEL_DIR [MODEL_DIR ...] [--split test|val|sft] [--warm-start W]
                         [--n-test N] [--out FILE.json]

Methods (METHODS): SFT (the warm start's own evaluation: every RL run records it, so one SFT row per warm start,
or per warm start and fault stream under faults), PPO-final (--reward final), PPO-calls (--reward calls: the final
reward plus PPO_CALLS_BONUS for every successful non-repeated call, the control for "StepTool only teaches more
calls"), StepTool (--reward step), StepTool-ref (--contribution reference), StepTool-group (critic-free groups).

Runs `python train.py --preset P --sft-seed W --seed S --out DIR/<method>-ws<W>-seed<S> --resume <method flags>
<other flags>` per (method, warm start W, RL seed S). A finished run (results.json) is reused only if it is the run
these flags would make now: the same warm start key (sft.sft_hash: the SFT settings and code), the same judge and
reward versions when the run recorded them, the same method flags; otherwise every such run is named on one line
with the difference and nothing runs (stale runs are never reused nor deleted). With --n-test a finished run on
another test list is resumed from its last checkpoint and re-evaluated only. When the methods include SFT alone, a
warm start is evaluated by `train.py --iters 0` in DIR/sft-ws<W>-seed<S>. An RL run whose warm start's SFT row the
record already holds (same warm start key, judge, reward, flags and test list) gets --no-sft-test-eval: the record
keeps that row, and a machine without the cached evaluation does not spend ~30 min re-making it per warm start.

Writes
  results/experiment-<preset>[-faults<percent>][-test<n>].json (--preset default is named smollm2, its settings'
    name), compact JSON, merged with the runs of the existing file that this invocation does not replace (refused
    if that file is of another preset, flags, test list, judge, reward or warm start; --replace-record writes this
    invocation's runs alone):
      {"preset", "suite", "train_flags" (the other train.py flags given), "judge", "reward", "test_task_ids",
       "test_task_groups": {id: "G1"}, "test_task_kinds": {id: kind}, "test_task_items": {id: "kind|entity|..."},
       "runs": [{"method", "warm_start", "seed" (null for SFT without faults), "fault_rate", "commit", "dirty",
       "warm_start_key", "warm_start_commit", "judge", "reward" (the versions the run recorded, or null),
       "outcomes": {id: 0|0.5|1}, "answers": {id: str|null}, "calls": {id: [[tool, args], ...]}, "stops": {id: str}}]}
  DIR/results.md   pass per group and per task type (mean ± std over runs), the paired comparisons, steps per episode,
                   and from the runs' results.json the diagnostics (and fault) tables
  DIR/results.json the per-run test metrics train.py reported;  DIR/val_pass.png when matplotlib is installed
--rejudge recomputes every run's outcomes from its answers with the current judge (tools.check_answer) and writes
the file back with the judge's version; --reproduce retrains one run of a record from nothing (a fresh --cache-dir)
and compares its outcomes with the committed ones (DIR/reproduction.json); --expert-logprobs says, per task type and
step, how likely each model is to sample the scripted expert's action (expert_step_logprobs): whether RL
can explore the steps a warm start gets wrong.

Deviation: the paper reports pass rates only; the paired statistics, the controls PPO-calls and StepTool-ref and the
warm-start replication are ours.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import asdict

import torch

import cpu_speed
import rewards
import tools
from batching import collate, predictors, token_logprobs
from rollout import RolloutConfig, ScriptedPolicy, rollout
from stats import (bootstrap_mean_ci, comparison_table, comparisons, mcnemar_exact, paired_counts, pass_rate,
                   pass_table, solved, steps_table, type_table)
from tools import Expert, check_answer

# C of PPO-calls: StepTool's mean intermediate reward per call (Σ intermediate rewards / intermediate calls, averaged
# over iterations) on its rollouts from the first warm start: `python experiment.py --measure-call-bonus runs/default`
# on the default run at 38f7881 (StepTool, warm start b8235dd8e5b6 = the cosine-1024-128 recipe's --sft-seed 0,
# --seed 0, reward flow-penalty-1, float32) gave 0.3448 (the 4 iterations: 0.325, 0.436, 0.214, 0.404;
# results/default-run-smollm2-cosine-1024-128.json). One RL seed. The old warm start's default run (76cb62b) gave
# 0.3847. Re-measure on runs/experiment-smollm2/steptool-ws0-seed* when they exist.
PPO_CALLS_BONUS: float | None = 0.3448

METHODS = {"SFT": ["--iters", "0"],           # no RL: only run when no RL run of the warm start records its evaluation
           "PPO-final": ["--reward", "final"],
           "PPO-calls": ["--reward", "calls"],  # + --call-bonus C (method_flags)
           "StepTool": ["--reward", "step"],
           "StepTool-ref": ["--reward", "step", "--contribution", "reference"],
           "StepTool-group": ["--advantage", "step-group", "--group-size", "4"]}   # 32 episodes = 8 tasks x 4
DEFAULT_METHODS = ["PPO-final", "StepTool"]
# Compared beyond "every method vs SFT" and "StepTool vs every other": does a bonus per call explain the gain?
EXTRA_COMPARISONS = [("PPO-calls", "PPO-final"), ("StepTool-ref", "PPO-calls")]
# Config fields a finished run must share with the run these flags would make (plus every field a flag names)
METHOD_FIELDS = {"preset", "sft_seed", "seed", "reward", "contribution", "call_bonus", "advantage", "group_size"}
NOT_COMPARED = {"out", "resume", "n_test"}      # where the run lives; --n-test re-evaluates a finished run
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


class StaleRun(ValueError):
    """A finished run (or a record) made by other code, flags, warm start or judge: never silently reused."""


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------------
# Runs of train.py, and whether a finished one is the run these flags would make now


def method_flags(method: str, call_bonus: float | None) -> list:
    """train.py flags of a method; PPO-calls's carry its bonus C."""
    if method != "PPO-calls":
        return METHODS[method]
    if call_bonus is None:
        raise ValueError("PPO-calls needs its bonus C: measure it (--measure-call-bonus on StepTool runs of warm "
                         "start 0) and set experiment.PPO_CALLS_BONUS, or pass --call-bonus C")
    return METHODS[method] + ["--call-bonus", str(call_bonus)]


def train_args(preset: str, warm_start: int, seed: int, flags: list, extra: list) -> list:
    return ["--preset", preset, "--sft-seed", str(warm_start), "--seed", str(seed), *flags, *extra]


def flat(config: dict) -> dict:
    """train.py's nested config (asdict) as {field: value}: field names are unique across its sub-configs."""
    return {k: v for key, value in config.items()
            for k, v in (value.items() if isinstance(value, dict) else [(key, value)])}


def flag_fields(flags: list) -> set:
    """The config fields a list of train.py flags sets: --fault-rate 0.3 -> fault_rate, --no-detach-critic ->
    detach_critic."""
    names = {f.split("=")[0][2:].replace("-", "_") for f in flags if f.startswith("--")}
    return {n.removeprefix("no_") for n in names}


def warm_start_key(cfg) -> str | None:
    """The key of the warm start a run of cfg stands on (sft.py's cache key); None when it has none."""
    if cfg.model and (cfg.sft_tasks == 0 or cfg.offline_data):
        return None
    from sft import sft_hash                      # imports torch: only when runs are planned
    return sft_hash(cfg, tools.make_suite(cfg.suite))


def expected_run(args: list) -> tuple[dict, str | None]:
    """What a run of these train.py flags would be at the current code: (its flat config, its warm start's key)."""
    from config import parse_config
    cfg = parse_config(args)
    return flat(asdict(cfg)), warm_start_key(cfg)


def versions() -> tuple:
    """(judge, reward) versions of the current code; None where the module does not declare one."""
    return getattr(tools, "JUDGE_VERSION", None), getattr(rewards, "REWARD_VERSION", None)


def recorded_versions(result: dict) -> tuple:
    """(judge, reward) versions a run recorded (in results.json or its provenance); None where it recorded none."""
    where = [result, result.get("provenance") or {}]
    return tuple(next((w[k] for w in where if k in w), None) for k in ("judge_version", "reward_version"))


def staleness(result: dict, expected: dict, key: str | None, fields: set) -> str | None:
    """Why a finished run is not the run these flags would make now; None if it is."""
    if "warm_start" not in result:
        return "made before runs recorded their warm start (results.json has no warm_start)"
    problems = []
    recorded = (result["warm_start"] or {}).get("key")
    if recorded != key:
        problems.append(f"warm start {recorded}, but the current code and flags give {key}")
    for name, now, then in zip(("judge", "reward"), versions(), recorded_versions(result)):
        if then is not None and then != now:
            problems.append(f"{name} version {then}, the current one is {now}")
    config = flat(result.get("config", {}))
    problems += [f"{f} {config.get(f, 'not recorded')!r} vs {expected[f]!r} now" for f in sorted(fields)
                 if f in expected and config.get(f, KeyError) != expected[f]]
    return "; ".join(problems) or None


def plan(args, extra: list, sft_held: set = frozenset()) -> list[dict]:
    """The runs to make or reuse: {"method", "warm_start", "seed", "dir", "args", "expected", "key", "fields"}; RL
    runs of a warm start in sft_held (its SFT row is in the record) skip the warm start's test evaluation."""
    rl = [m for m in args.methods if m != "SFT"]
    cells = [(m, w, s) for m in rl for w in args.sft_seeds for s in args.seeds]
    if not rl:                                    # SFT alone: one evaluation per warm start (per seed under faults)
        faults = expected_run(train_args(args.preset, 0, args.seeds[0], METHODS["SFT"], extra))[0]["fault_rate"]
        cells = [("SFT", w, s) for w in args.sft_seeds for s in (args.seeds if faults else args.seeds[:1])]
    runs = []
    for method, w, s in cells:
        flags = method_flags(method, args.call_bonus)
        targs = train_args(args.preset, w, s, flags, extra) + (["--no-sft-test-eval"] if method != "SFT" and
                                                               w in sft_held else [])
        expected, key = expected_run(targs)
        fields = (METHOD_FIELDS | flag_fields(flags) | flag_fields(extra)) - NOT_COMPARED
        runs.append({"method": method, "warm_start": w, "seed": s, "args": targs, "expected": expected, "key": key,
                     "fields": fields, "dir": os.path.join(args.out, f"{method.lower()}-ws{w}-seed{s}")})
    return runs


def check_finished(runs: list[dict]):
    """Refuse, before anything is trained, every finished run that is stale: one line each."""
    lines = []
    for r in runs:
        path = os.path.join(r["dir"], "results.json")
        problem = os.path.exists(path) and staleness(load_json(path), r["expected"], r["key"], r["fields"])
        if problem:
            lines.append(f"{r['dir']}: {problem}")
    if lines:
        raise StaleRun("\n".join(lines) + "\n(a stale run is never reused nor deleted: move it away or use another "
                       "--out)")


def run(r: dict, n_test: int | None = None) -> dict:
    """train.py's results.json for one planned run: a finished run is reused (the experiment resumes); with n_test, a
    finished run evaluated on another test list resumes from its last checkpoint, trains nothing more and is evaluated
    on the first n_test tasks of the fixed test list."""
    path = os.path.join(r["dir"], "results.json")
    result = load_json(path) if os.path.exists(path) else None
    if result is None or (n_test is not None and len(result["test_outcomes"]) != n_test):
        cmd = [sys.executable, TRAIN, "--out", r["dir"], "--resume", *r["args"],
               *(["--n-test", str(n_test)] if n_test is not None else [])]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        result = load_json(path)
    problem = staleness(result, r["expected"], r["key"], r["fields"])
    if problem:
        raise StaleRun(f"{r['dir']}: {problem}")
    return result


def measure_call_bonus(run_dir: str) -> float:
    """C for PPO-calls from a finished StepTool run: the mean over its logged iterations of "mean_step_reward" (the
    iteration's Σ intermediate rewards / number of intermediate calls) in metrics.jsonl; an iteration logged twice
    (a resumed run) counts once, as last logged."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        by_iter = {r["iter"]: r["mean_step_reward"] for r in map(json.loads, f) if "mean_step_reward" in r}
    if not by_iter:
        raise ValueError(f"{run_dir}/metrics.jsonl: no iteration logs mean_step_reward")
    return statistics.mean(by_iter.values())


# ----------------------------------------------------------------------------------------------------------------------
# The record: from train.py's results, merged with an earlier file, re-judged


def item_of(task) -> str:
    """The cluster of a task: its type and entities ("kind|entity|..."); its own id if the task has no entities."""
    entities = getattr(task, "entities", ())
    return "|".join([task.kind, *map(str, entities)]) if entities else task.id


def test_tasks(suite: str, task_ids: list) -> dict:
    """{id: Task} of a test list: the first len(task_ids) tasks of the suite's, as train.py builds it."""
    tasks = {t.id: t for t in tools.make_suite(suite).tasks("test", len(task_ids), seed=0)}
    missing = [t for t in task_ids if t not in tasks]
    if missing:
        raise ValueError(f"the {suite} suite's test list has no task(s) {missing[:3]}")
    return tasks


def task_info(suite: str, task_ids: list, groups: dict) -> dict:
    """Group, type and item of every test task, from the suite; if it cannot rebuild them, groups from results.json
    (groups: {id: 1|2|3}), no type, and each task its own item."""
    try:
        tasks = test_tasks(suite, task_ids)
    except ValueError as e:
        print(f"warning: {e}; the bootstrap treats every task as its own item", file=sys.stderr)
        return {"test_task_groups": {t: f"G{groups[t]}" for t in task_ids}, "test_task_kinds": dict.fromkeys(task_ids),
                "test_task_items": {t: t for t in task_ids}}
    return {"test_task_groups": {t: f"G{tasks[t].group}" for t in task_ids},
            "test_task_kinds": {t: tasks[t].kind for t in task_ids},
            "test_task_items": {t: item_of(tasks[t]) for t in task_ids}}


def run_row(method: str, warm_start: int, seed, result: dict, sft: bool) -> dict:
    """One run of the record: the test evaluation of an RL run, or (sft) the warm start's, as the run recorded it."""
    prefix = "sft_" if sft else ""
    transcripts = result[prefix + "test_transcripts"]
    provenance, warm = result.get("provenance") or {}, result.get("warm_start") or {}
    judge, reward = recorded_versions(result)
    return {"method": method, "warm_start": warm_start, "seed": seed,
            "fault_rate": result.get("config", {}).get("fault_rate", 0.0), "commit": provenance.get("commit"),
            "dirty": provenance.get("dirty"), "warm_start_key": warm.get("key"),
            "warm_start_commit": warm.get("commit"),
            "judge": judge, "reward": reward, "outcomes": result[prefix + "test_outcomes"],
            "answers": {t: x["answer"] for t, x in transcripts.items()},
            "calls": {t: x["calls"] for t, x in transcripts.items()},
            "stops": {t: x["stop"] for t, x in transcripts.items()}}


def run_order(row: dict) -> tuple:
    return list(METHODS).index(row["method"]), row["warm_start"], -1 if row["seed"] is None else row["seed"]


def record_preset(preset: str) -> str:
    """The name a record carries: `--preset default` is config.DEFAULT_NAME's settings (smollm2), and its records are
    named, merged and compared under that name."""
    from config import DEFAULT_NAME
    return DEFAULT_NAME if preset == "default" else preset


def experiment_record(preset: str, suite: str, results: dict, train_flags: list = ()) -> dict:
    """results: {(method, warm start, seed): train.py's results.json} -> the record (module docstring). One SFT row
    per warm start, from the first of its runs (per warm start and seed under faults: each seed's fault stream)."""
    first = next(iter(results.values()))
    task_ids = list(first["test_outcomes"])
    sft_rows, rl_rows = {}, []
    for (method, w, seed), result in results.items():
        for key in ("test_outcomes", "sft_test_outcomes"):
            if result[key] is not None and sorted(result[key]) != sorted(task_ids):
                raise ValueError(f"{method} ws{w} seed {seed}: {key} covers other test tasks than the first run's")
        if method != "SFT":
            rl_rows.append(run_row(method, w, seed, result, sft=False))
        if result["sft_test_outcomes"] is None:          # --no-sft-test-eval: the merged record holds that row
            continue
        row = run_row("SFT", w, seed if result.get("config", {}).get("fault_rate") else None, result, sft=True)
        first_row = sft_rows.setdefault((w, row["seed"]), row)
        if first_row["outcomes"] != row["outcomes"]:
            print(f"warning: warm start {w}'s SFT evaluation differs between its runs; the record keeps the first",
                  file=sys.stderr)
    judge, reward = versions()
    return {"preset": record_preset(preset), "suite": suite, "train_flags": list(train_flags), "judge": judge,
            "reward": reward, "test_task_ids": task_ids,
            **task_info(suite, task_ids, first.get("test_task_groups", {})),
            "runs": sorted([*sft_rows.values(), *rl_rows], key=run_order)}


def merge_records(old: dict, new: dict, key_of, path: str) -> dict:
    """new plus the runs of the earlier file `old` that new does not replace. Refused (one line) if old is of
    another preset, train.py flags, test list, judge or reward, or holds a run whose warm start is not key_of(its
    warm start)."""
    for field in ("preset", "train_flags", "test_task_ids", "judge", "reward"):
        if old.get(field, KeyError) != new[field]:
            raise StaleRun(f"{path}: its {field} is not this experiment's ({'absent' if field not in old else 'other'})"
                           f"; --replace-record writes this invocation's runs alone")
    replaced = {(r["method"], r["warm_start"], r["seed"]) for r in new["runs"]}
    kept = [r for r in old["runs"] if (r["method"], r.get("warm_start"), r["seed"]) not in replaced]
    for r in kept:
        if r.get("warm_start_key") != key_of(r["warm_start"]):
            raise StaleRun(f"{path}: {r['method']} ws{r['warm_start']} seed {r['seed']} stands on warm start "
                           f"{r.get('warm_start_key')}, not {key_of(r['warm_start'])}; --replace-record writes this "
                           f"invocation's runs alone")
    return {**new, "runs": sorted(new["runs"] + kept, key=run_order)}


def sft_rows_held(path: str, preset: str, n_test: int, extra: list, key_of) -> set:
    """The warm starts whose SFT row the record at `path` holds as this experiment would make it now (the same preset,
    train.py flags, judge, reward and test-list length, and the warm start's current key; no faults): their RL runs
    need not evaluate the warm start again. Empty when there is no such record."""
    if not os.path.exists(path):
        return set()
    old = load_json(path)
    if ([old.get(f) for f in ("preset", "train_flags", "judge", "reward")] != [record_preset(preset), list(extra),
                                                                              *versions()]
            or len(old.get("test_task_ids", ())) != n_test):
        return set()
    return {r["warm_start"] for r in old["runs"] if r["method"] == "SFT" and r["seed"] is None
            and r.get("warm_start_key") == key_of(r["warm_start"])}


def check_sft_rows(record: dict):
    """Every warm start an RL row stands on has its SFT row (each comparison "X vs SFT" pairs a run with it)."""
    missing = sorted({r["warm_start"] for r in record["runs"] if r["method"] != "SFT"}
                     - {r["warm_start"] for r in record["runs"] if r["method"] == "SFT"})
    if missing:
        raise ValueError(f"no SFT row for warm start(s) {missing}: their runs skipped its test evaluation "
                         f"(--no-sft-test-eval) and the record holds none; run --methods SFT --sft-seeds "
                         f"{' '.join(map(str, missing))} first")


def run_label(row: dict) -> str:
    return f"{row['method']} ws{row['warm_start']}" + (f" seed {row['seed']}" if row["seed"] is not None else "")


def rejudge(record: dict, tasks: dict) -> tuple[dict, dict]:
    """Every run's outcomes recomputed from its answers by the current judge (a missing answer is judged as "", as
    train.py does) -> (the new record with the current judge version, {run label: (changed, up, down)})."""
    runs, changes = [], {}
    for row in record["runs"]:
        outcomes = {t: check_answer(row["answers"][t] or "", tasks[t]) for t in record["test_task_ids"]}
        up = sum(outcomes[t] > row["outcomes"][t] for t in outcomes)
        down = sum(outcomes[t] < row["outcomes"][t] for t in outcomes)
        changes[run_label(row)] = (up + down, up, down)
        runs.append({**row, "outcomes": outcomes})
    return {**record, "judge": versions()[0], "runs": runs}, changes


def rejudge_file(path: str):
    """--rejudge: re-judge the record at `path` in place and say how many outcomes changed per run."""
    record = load_json(path)
    if "answers" not in record["runs"][0]:
        raise ValueError(f"{path}: its runs keep no answers (a record made before they were kept): nothing to re-judge")
    from config import preset_config
    suite = record.get("suite") or preset_config(record["preset"]).suite
    record, changes = rejudge(record, test_tasks(suite, record["test_task_ids"]))
    write_record(path, record)
    for label, (changed, up, down) in changes.items():
        print(f"{label}: {changed} of {len(record['test_task_ids'])} outcomes changed ({up} up, {down} down)")
    print(f"wrote {path} (judge {record['judge']})")


def record_file(preset: str, fault_rate: float, n_test: int | None = None) -> str:
    """experiment-<preset>.json (default: smollm2); -faults<percent> for runs under injected faults, -test<n> for a
    test list of another length than the preset's (--n-test)."""
    return (f"experiment-{record_preset(preset)}" + (f"-faults{round(100 * fault_rate)}" if fault_rate else "")
            + (f"-test{n_test}" if n_test is not None else "") + ".json")


def write_record(path: str, record: dict):
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, separators=(",", ":"))
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------------------------
# Tables


def diagnostics_table(results: dict) -> str:
    """What the runs did, beyond pass rates, from their results.json: per method, averaged over runs, how test
    episodes stopped, the share of test tasks whose greedy actions changed vs the run's own SFT model, and the last
    PPO iteration. SFT: one row per warm start, from its first run."""
    STOPS = ["finish", "give_up", "max_steps", "token_budget"]
    lines = ["| method | stop: " + " / ".join(STOPS) + " (%) | test tasks whose greedy actions changed vs SFT (%) | "
             "last iteration: train return / explained variance / invalid actions |", "|---" * 4 + "|"]
    rows, sft_seen = {}, set()
    for (method, w, _), r in results.items():
        sft = r["sft_test_transcripts"]                  # None: the run did not evaluate its warm start on test
        if sft and w not in sft_seen:
            sft_seen.add(w)
            rows.setdefault("SFT", []).append((sft, sft, None))
        if method != "SFT":
            rows.setdefault(method, []).append((r["test_transcripts"], sft, r["history"][-1] if r["history"] else None))
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    for method, runs in rows.items():
        stops = " / ".join(f"{100 * mean([mean([t[i]['stop'] == s for i in t]) for t, _, _ in runs]):.0f}"
                           for s in STOPS)
        changed = [mean([t[i]["actions"] != sft[i]["actions"] for i in t]) for t, sft, _ in runs if sft]
        last = [h for _, _, h in runs if h]
        train = " / ".join(f"{mean([h[k] for h in last]):.2f}" for k in ("return", "explained_variance", "invalid"))
        lines.append(f"| {method} | {stops} | {f'{100 * mean(changed):.0f}' if changed else '-'} | "
                     f"{train if last else '-'} |")
    return "\n".join(lines)


def fault_table(results: dict) -> str:
    """Under injected faults (does RL teach the model to retry?): per method, mean over runs of the test evaluation's
    share of calls that hit a fault, the share of those retried next step, and the pass rate; SFT once per (warm
    start, seed): evaluated on that seed's fault stream, as the RL run it is compared with."""
    rows = {}
    for (method, w, seed), r in results.items():
        rows.setdefault("SFT", {}).setdefault((w, seed), r["sft_test"]["all"])
        if method != "SFT":
            rows.setdefault(method, {})[w, seed] = r["test"]["all"]
    lines = ["| method | runs | calls that hit a fault (%) | faults retried next step (%) | pass (%) |",
             "|---" * 5 + "|"]
    for method, by_run in rows.items():
        cells = [f"{100 * statistics.mean(m[k] for m in by_run.values()):.1f}"
                 for k in ("fault_rate", "retry_after_fault", "pass_rate")]
        lines.append(f"| {method} | {len(by_run)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(record: dict, results: dict) -> str:
    """DIR/results.md: the record's tables, then those that need the runs' results.json."""
    md = (f"Test list of {len(record['test_task_ids'])} tasks. Pass rate (%), mean ± std over runs (RL: warm start x "
          f"seed; SFT: warm starts)\n\n{pass_table(record)}\n\n"
          + (f"Per task type\n\n{type_table(record)}\n\n" if all(record["test_task_kinds"].values()) else "") +
          f"A vs B over runs paired by (warm start, seed); X vs SFT: each run with its own warm start's SFT row\n\n"
          f"{comparison_table(comparisons(record, EXTRA_COMPARISONS))}\n\nSteps per episode (mean ± std over runs)\n\n"
          f"{steps_table(record)}\n")
    if results and all("test_transcripts" in r and "history" in r for r in results.values()):
        md += f"\nDiagnostics (mean over runs)\n\n{diagnostics_table(results)}\n"
    if any(r["fault_rate"] for r in record["runs"]) and results:
        md += f"\nUnder injected faults (test evaluation, mean over runs)\n\n{fault_table(results)}\n"
    return md


def plot(histories: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")
    for name, color in zip(histories, colors):
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


# ----------------------------------------------------------------------------------------------------------------------
# Reproducing one run of a record from nothing


def compare_reproduction(committed: dict, reproduced: dict, **bootstrap) -> dict:
    """A reproduced run's outcomes against the committed ones, on the committed tasks: agreement (same outcome, 0.5
    included), pass rates, the difference (reproduced − committed) with a paired bootstrap 95% CI over tasks, and
    McNemar b = solved only when reproduced, c = only as committed."""
    missing = [t for t in committed if t not in reproduced]
    if missing:
        raise ValueError(f"the reproduced run has no outcome for {len(missing)} committed task(s), e.g. {missing[0]}")
    ids = list(committed)
    b, c = paired_counts(reproduced, committed)
    diffs = [solved(reproduced[t]) - solved(committed[t]) for t in ids]
    return {"tasks": len(ids), "agreement": sum(committed[t] == reproduced[t] for t in ids) / len(ids),
            "pass_committed": pass_rate(committed, ids), "pass_reproduced": pass_rate(reproduced, ids),
            "diff": statistics.mean(diffs), "ci": bootstrap_mean_ci(diffs, **bootstrap), "b": b, "c": c,
            "mcnemar_p": mcnemar_exact(b, c)}


def method_of(config: dict) -> str:
    """The METHODS name of a train.py run, from its resolved config."""
    if config["reward"] == "step":
        return "StepTool-ref" if config["rewards"]["contribution"] == "reference" else \
            "StepTool-group" if config["advantages"]["advantage"] == "step-group" else "StepTool"
    return {"final": "PPO-final", "calls": "PPO-calls"}[config["reward"]]


def as_record(data: dict, path: str) -> dict:
    """A record (this module's format), or train.py's results.json as the record of its two runs (SFT and the RL
    method): `python train.py`'s own run can be reproduced too. Records of the old format (before runs carried their
    warm start and answers) are refused in one line."""
    if "runs" in data:
        if any("warm_start" not in r for r in data["runs"]):
            raise ValueError(f"{path}: an old-format record (its runs name no warm start, commit or answers); "
                             f"reproduce a record written by this experiment.py, or a train.py results.json")
        return data
    if "sft_test_outcomes" not in data or "config" not in data:
        raise ValueError(f"{path}: neither an experiment record nor a train.py results.json")
    config = data["config"]
    results = {(method_of(config), config["sft_seed"], config["seed"]): data}
    return experiment_record(config["preset"], config["suite"], results)


def find_run(record: dict, method: str, warm_start: int, seed) -> dict:
    """The record's run of (method, warm start[, seed]); the seed may be left out when only one run matches."""
    rows = [r for r in record["runs"] if r["method"] == method and r["warm_start"] == warm_start
            and (seed is None or r["seed"] == seed)]
    if len(rows) != 1:
        found = sorted({str(r["seed"]) for r in record["runs"]
                        if r["method"] == method and r["warm_start"] == warm_start})
        raise ValueError(f"the record has {len(rows)} {method} run(s) of warm start {warm_start}"
                         + (f" and seed {seed}" if seed is not None else "") + f" (seeds: {', '.join(found) or 'none'})"
                         + ("; give --seed" if len(rows) > 1 else ""))
    return rows[0]


def reproduce(record_path: str, method: str, warm_start: int, seed, out: str | None, extra: list,
              call_bonus: float | None) -> dict:
    """Retrain one run of a record at the current code (the record's preset and train.py flags, the method's flags
    now) with a fresh --cache-dir (no cached warm start or model), compare its outcomes with the committed ones, write
    OUT/reproduction.json. SFT: `train.py --iters 0`, whose warm-start evaluation is the row. A finished
    reproduction in OUT is reused (a killed one resumes)."""
    record = as_record(load_json(record_path), record_path)
    committed = find_run(record, method, warm_start, seed)
    out = out or f"runs/reproduce-{method.lower()}-ws{warm_start}" + (f"-seed{seed}" if seed is not None else "")
    extra = [*record.get("train_flags", []), *extra, "--cache-dir", os.path.join(out, "cache"),
             "--n-test", str(len(record["test_task_ids"]))]
    cmd = [sys.executable, TRAIN, "--out", os.path.join(out, "run"), "--resume",
           *train_args(record["preset"], warm_start, committed["seed"] or 0, method_flags(method, call_bonus), extra)]
    path = os.path.join(out, "run", "results.json")
    if not os.path.exists(path):
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    result = load_json(path)
    reproduced = result["sft_test_outcomes" if method == "SFT" else "test_outcomes"]
    mine = run_row(method, warm_start, committed["seed"], result, sft=method == "SFT")
    code = lambda row: {k: row[k] for k in ("commit", "dirty", "warm_start_key", "warm_start_commit")}  # noqa: E731
    s = {"record": record_path, "method": method, "warm_start": warm_start, "seed": committed["seed"], "command": cmd,
         **compare_reproduction(committed["outcomes"], reproduced), "committed": code(committed),
         "reproduced": code(mine), "outcomes": {t: reproduced[t] for t in committed["outcomes"]}}
    with open(os.path.join(out, "reproduction.json"), "w") as f:
        json.dump(s, f, indent=1)
    print(f"{run_label(committed)}: the same outcome on {100 * s['agreement']:.1f}% of {s['tasks']} tasks; pass "
          f"{100 * s['pass_committed']:.1f}% committed (commit {committed['commit']}) vs "
          f"{100 * s['pass_reproduced']:.1f}% reproduced (commit {mine['commit']}{', dirty' if mine['dirty'] else ''});"
          f" Δ {100 * s['diff']:+.1f} points, 95% CI [{100 * s['ci'][0]:+.1f}, {100 * s['ci'][1]:+.1f}] (tasks "
          f"resampled); McNemar b/c {s['b']}/{s['c']}, p = {s['mcnemar_p']:.3g}\n"
          f"wrote {os.path.join(out, 'reproduction.json')}")
    return s


# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def expert_step_logprobs(model, tokenizer, env, tasks, cfg: RolloutConfig, temperatures=(1.0,),
                         batch_size: int = 8) -> dict:
    """{temperature: {task id: [log π(a*_t | h*_t) for each step t]}, "greedy": {task id: [bool per step]}}: the
    log-probability that the policy, sampling at that temperature, writes the scripted expert's action a*_t (its exact
    tokens) after the expert's own history h*_t (prompt, earlier actions and their observations), and whether greedy
    decoding writes it (every token of a*_t is the argmax). A diagnostic of exploration: PPO can only reinforce
    actions it samples, so a step the warm start gets wrong whose expert action has probability 1e-5 is not met in a
    few hundred rollouts. A lower bound on taking the right action (a paraphrased Thought or answer is another action).
    Batches of `batch_size` expert episodes, right-padded; logits only where an action token is predicted; with the
    CPU speed paths installed (cpu_speed.apply) the prompt the episodes share runs once per batch."""
    episodes = rollout(ScriptedPolicy(Expert(), tokenizer, cfg), tasks, env, tokenizer, cfg)
    dev, out = next(model.parameters()).device, {T: {} for T in (*temperatures, "greedy")}
    shared = cpu_speed.shared_prefix_len([ep.token_ids[:ep.step_id.count(-1)] for ep in episodes])  # -1: the prompt
    for i in range(0, len(episodes), batch_size):
        part = episodes[i:i + batch_size]
        batch = {k: v.to(dev) for k, v in collate(part, pad_id=0).items()}
        ids, actions = batch["input_ids"], batch["action_mask"]
        with cpu_speed.shared_prompt(shared):           # a no-op for a plain Transformer
            logits = model(ids, attention_mask=batch["attention_mask"], logits_to_keep=predictors(actions))  # (N, V)
        S = batch["step_mask"].shape[1]
        step = torch.where(actions, batch["step_id"], S)                           # (B, T); S: not an action token
        missed = torch.zeros_like(actions)
        missed[actions] = logits.argmax(-1) != ids[actions]                        # (B, T): greedy writes another
        per_step = {"greedy": missed.new_zeros(len(part), S + 1, dtype=torch.long).scatter_add_(
            1, step, missed.long())[:, :S] == 0}                                   # (B, S): no token missed
        for T in temperatures:
            lp = token_logprobs(logits, ids, targets=actions, temperature=T)                             # (B, T)
            per_step[T] = lp.new_zeros(len(part), S + 1).scatter_add_(1, step, lp)[:, :S]   # (B, S): Σ over the step
        for T, rows in per_step.items():
            for ep, row in zip(part, rows.tolist()):                                    # one transfer per batch
                out[T][ep.task.id] = row[:len(ep.steps)]
    return out


def expert_logprobs(model_dirs: list, n: int | None, out: str | None, split: str = "test", sft_seed: int = 0):
    """--expert-logprobs: per model, task type and step, the mean over the first n tasks of `split` of π(expert action)
    at the rollouts' temperature and at 1, and the fraction of tasks whose every expert action greedy decoding writes;
    the per-task values go to `out` with the commit that computed them. split "sft": the demonstrations of warm start
    `sft_seed` (the first n of the --sft-tasks it was trained on): whether SFT fitted the steps it gets wrong."""
    from checkpoint import provenance
    from config import Config
    from hf import load_pretrained
    cfg = Config()
    suite = tools.make_suite(cfg.suite)
    tasks = suite.tasks(split, n or {"sft": cfg.sft_tasks, "test": cfg.n_test}.get(split), seed=sft_seed)  # val: all
    temperatures = sorted({cfg.rollout.temperature, 1.0})
    record = {"provenance": provenance(), "suite": cfg.suite, "split": split, "sft_seed": sft_seed,
              "temperatures": temperatures, "task_kinds": {t.id: t.kind for t in tasks}, "models": {}}
    for path in model_dirs:
        model, tokenizer = load_pretrained(path)
        with torch.no_grad():
            logps = expert_step_logprobs(cpu_speed.apply(model.eval()), tokenizer, suite.environment(None), tasks,
                                         cfg.rollout, temperatures, batch_size=16)
        record["models"][path] = {str(T): lp for T, lp in logps.items()}
        print(f"{path} on {split}: per step, mean π(expert action) at T = {' / '.join(map(str, temperatures))}; "
              f"greedy: tasks whose every expert action is greedy's")
        for kind in sorted({t.kind for t in tasks}):
            ids = [t.id for t in tasks if t.kind == kind]
            steps = min(len(logps[1.0][i]) for i in ids)
            cols = [" / ".join(f"{statistics.mean(math.exp(logps[T][i][s]) for i in ids):.2g}" for T in temperatures)
                    for s in range(steps)]
            greedy = statistics.mean(all(logps["greedy"][i]) for i in ids)
            print(f"  {kind:26s} ({len(ids):2d}) greedy {greedy:4.2f}  " + " | ".join(cols))
    out = out or "runs/expert-logprobs.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f)
    print(f"wrote {out}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)  # --sft-seed goes to train.py
    p.add_argument("--preset", default="default", help="train.py preset, passed through")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), metavar="NAME",
                   help=f"from {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)}); SFT rows come with any")
    p.add_argument("--sft-seeds", type=int, nargs="+", default=[0], help="warm starts (train.py --sft-seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds per warm start")
    p.add_argument("--out", help="run directory (default: runs/experiment[-<preset>]; with --reproduce: "
                   "runs/reproduce-<method>-ws<W>[-seed<S>])")
    p.add_argument("--results-dir", default="results", help="where experiment-<preset>.json goes")
    p.add_argument("--n-test", type=int, help="evaluate on the first N test tasks instead of the preset's; "
                   "finished runs are re-evaluated from their last checkpoint, not retrained")
    p.add_argument("--call-bonus", type=float, default=PPO_CALLS_BONUS, help="C of PPO-calls (default PPO_CALLS_BONUS)")
    p.add_argument("--replace-record", action="store_true", help="write this invocation's runs alone, not merged")
    p.add_argument("--rejudge", metavar="RECORD", help="re-judge a record's answers with the current judge")
    p.add_argument("--measure-call-bonus", nargs="+", metavar="RUN_DIR", help="C from finished StepTool runs")
    p.add_argument("--reproduce", metavar="RECORD", help="retrain one run of RECORD (or of a train.py results.json) from nothing and compare")
    p.add_argument("--expert-logprobs", nargs="+", metavar="MODEL_DIR",
                   help="how likely each model is to sample the expert's action, per task type and step")
    p.add_argument("--split", default="test", choices=["test", "val", "sft"],
                   help="with --expert-logprobs: the tasks (sft: the demonstrations of warm start --warm-start); "
                   "--n-test N takes the first N")
    p.add_argument("--method", choices=list(METHODS), help="with --reproduce")
    p.add_argument("--warm-start", type=int, help="with --reproduce: the run's warm start (--sft-seed); with "
                   "--expert-logprobs --split sft: whose demonstrations")
    p.add_argument("--seed", type=int, help="with --reproduce: the run's RL seed")
    args, extra = p.parse_known_args(argv)
    if args.reproduce and (args.method is None or args.warm_start is None):
        p.error("--reproduce needs --method and --warm-start")
    if not args.reproduce and (args.method or args.seed is not None or
                               args.warm_start is not None and not (args.expert_logprobs and args.split == "sft")):
        p.error("--method, --warm-start and --seed go with --reproduce (an experiment takes --methods, --sft-seeds "
                "and --seeds)")
    return args, extra


def experiment(args, extra: list):
    args.out = args.out or ("runs/experiment" if args.preset == "default" else f"runs/experiment-{args.preset}")
    key_of = lambda w: expected_run(train_args(args.preset, w, args.seeds[0], [], extra))[1]  # noqa: E731
    base = expected_run(train_args(args.preset, 0, args.seeds[0], [], extra))[0]
    path = os.path.join(args.results_dir, record_file(args.preset, base["fault_rate"], args.n_test))
    held = set() if args.replace_record else sft_rows_held(path, args.preset, args.n_test or base["n_test"], extra,
                                                           key_of)
    runs = plan(args, extra, held)
    check_finished(runs)
    os.makedirs(args.out, exist_ok=True)
    results, histories = {}, {}
    for r in runs:
        result = results[r["method"], r["warm_start"], r["seed"]] = run(r, args.n_test)
        if r["method"] != "SFT":
            histories.setdefault(r["method"], []).append((result["sft_val"]["all"]["pass_rate"], result["history"]))
    record = experiment_record(args.preset, runs[0]["expected"]["suite"], results, extra)
    os.makedirs(args.results_dir, exist_ok=True)
    if os.path.exists(path) and not args.replace_record:
        record = merge_records(load_json(path), record, key_of, path)
    check_sft_rows(record)
    write_record(path, record)
    md = report(record, results)
    print(md)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({f"{m} ws{w} seed {s}": {"sft_test": r["sft_test"], "test": r["test"]}
                   for (m, w, s), r in results.items()}, f, indent=1)
    print(f"wrote {path}")
    if plot(histories, os.path.join(args.out, "val_pass.png")):
        print(f"wrote {os.path.join(args.out, 'val_pass.png')}")


def main(argv=None):
    args, extra = parse_args(argv)
    try:
        if args.rejudge:
            rejudge_file(args.rejudge)
        elif args.measure_call_bonus:
            values = [measure_call_bonus(d) for d in args.measure_call_bonus]
            for d, v in zip(args.measure_call_bonus, values):
                print(f"{d}: {v:.4f}")
            print(f"C = {statistics.mean(values):.4f} (mean over {len(values)} run(s))")
        elif args.expert_logprobs:
            expert_logprobs(args.expert_logprobs, args.n_test, args.out, args.split, args.warm_start or 0)
        elif args.reproduce:
            reproduce(args.reproduce, args.method, args.warm_start, args.seed, args.out, extra, args.call_bonus)
        else:
            experiment(args, extra)
    except (ValueError, OSError, subprocess.CalledProcessError) as e:     # StaleRun is a ValueError
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
