"""The statistics of experiment.py and the tables of its record: small pure functions on per-task outcomes
({task id: 1 | 0.5 | 0}) and on the record's runs ({"method", "warm_start", "seed", "outcomes", "calls", "stops"}).

Who calls it: experiment.py (results.md, --reproduce); tests/test_stats.py checks each statistic against
hand-worked numbers or a plain-loop oracle. A module of its own because experiment.py (running train.py, resuming,
the record, re-judging, reproducing) passed 650 lines with these inside; nothing here runs or reads anything, so
the tables below are a function of the committed record alone.

The unit of each statistic is the unit of the claim it tests:
    pass rate of a run       Solved fraction (outcome 1; Unsure 0.5 counts as not solved) over the test tasks
    spread of a method       mean ± std over its runs: RL over (warm start, RL seed), SFT over warm starts
    A vs B                   runs paired by (warm start, seed); A vs SFT pairs each A run with the SFT row of its own
                             warm start (of its own fault stream under faults). d_i = pass(A_i) − pass(B_i):
      paired t               t = mean(d) / (sd(d) / √n), two-sided p from Student's t with n − 1 degrees of freedom
      sign test              exact two-sided binomial test of #(d_i > 0) against #(d_i < 0), ties dropped
      clustered 95% CI       bootstrap of the mean task difference with whole items resampled (an item: a task type
                             and its entities; its tasks share everything but the phrasing, so they are not
                             independent): per item the difference averaged over its tasks and over the pairs,
                             weighted by its number of tasks, so each resample's value is a mean over tasks like Δ
      McNemar per pair       b = tasks only A solved, c = only B solved; exact two-sided p; one per pair of runs,
                             never pooled over runs (pooled (task, run) pairs are not independent)
Student's t CDF is the regularized incomplete beta function, by its continued fraction (scipy is not a dependency).
"""
from __future__ import annotations

import math
import statistics

import numpy as np

FINISH_STOPS = ("finish", "give_up")     # episodes whose last step is a Finish action


def solved(outcome) -> int:
    return int(outcome == 1)


def pass_rate(outcomes: dict, task_ids) -> float:
    """Solved fraction of `task_ids` in one run."""
    task_ids = list(task_ids)
    return sum(solved(outcomes[t]) for t in task_ids) / len(task_ids)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); the std of one value is 0."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def steps(calls: list, stop: str) -> int:
    """Steps of one episode from its transcript: its calls plus the Finish step if it ended with one (what
    len(actions) counts, except for a malformed Finish the episode went on after: a step not in `calls`)."""
    return len(calls) + (stop in FINISH_STOPS)


# ----------------------------------------------------------------------------------------------------------------------
# Exact binomial tests


def binomial_two_sided(k1: int, k2: int) -> float:
    """Two-sided exact p that k1 and k2 are the two sides of n = k1 + k2 fair coins: 2 · Σ_{k ≤ min} C(n, k) / 2^n."""
    n = k1 + k2
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(k1, k2) + 1)) / 2 ** n)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p: under H0 each of the b + c discordant tasks is a fair coin."""
    return binomial_two_sided(b, c)


def paired_counts(a_outcomes: dict, b_outcomes: dict) -> tuple[int, int]:
    """(b, c) over the tasks both dicts hold: b = solved by A only, c = solved by B only."""
    shared = a_outcomes.keys() & b_outcomes.keys()
    b = sum(solved(a_outcomes[t]) and not solved(b_outcomes[t]) for t in shared)
    c = sum(solved(b_outcomes[t]) and not solved(a_outcomes[t]) for t in shared)
    return b, c


def sign_test(diffs) -> tuple[int, int, float]:
    """(#positive, #negative, exact two-sided p) of per-run differences; zeros carry no sign and are dropped."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return pos, neg, binomial_two_sided(pos, neg)


# ----------------------------------------------------------------------------------------------------------------------
# Student's t


def _beta_continued_fraction(a: float, b: float, x: float, max_terms: int = 500, eps: float = 1e-15) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),             # the even term d_2m
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # the odd term d_2m+1
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b    # I_x(a, b) = 1 − I_{1−x}(b, a)


def student_t_two_sided(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with df degrees of freedom: I_{df / (df + t²)}(df / 2, 1 / 2)."""
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def student_t_cdf(t: float, df: float) -> float:
    """P(T ≤ t)."""
    tail = student_t_two_sided(t, df) / 2
    return 1.0 - tail if t >= 0 else tail


def paired_t(diffs) -> tuple[float, float | None, float | None]:
    """(mean, t, two-sided p) of per-run differences; t and p are None for fewer than two differences. All
    differences equal: t = ±inf and p = 0 (0 and 1 if they are all 0)."""
    diffs = list(diffs)
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, None, None
    sd = statistics.stdev(diffs)
    if sd == 0:
        return (mean, math.copysign(math.inf, mean), 0.0) if mean else (mean, 0.0, 1.0)
    t = mean / (sd / math.sqrt(len(diffs)))
    return mean, t, student_t_two_sided(t, len(diffs) - 1)


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_mean_ci(values, weights=None, n_resamples: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile interval of a weighted mean Σ w·v / Σ w, the (value, weight) pairs resampled with replacement
    (weights None: all 1, a plain mean). Fixed seed: the same interval every time."""
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))             # (R, n)
    means = (values[idx] * weights[idx]).sum(axis=1) / weights[idx].sum(axis=1)       # (R,)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def task_differences(pairs: list, task_ids) -> dict:
    """{task: solved(A) − solved(B) averaged over the paired runs}; pairs: [(A outcomes, B outcomes)]."""
    return {t: statistics.mean(solved(a[t]) - solved(b[t]) for a, b in pairs) for t in task_ids}


def clustered_ci(differences: dict, items: dict, **bootstrap) -> tuple[float, float]:
    """95% interval of the mean task difference, items resampled: per item its tasks' mean difference, weighted by
    its number of tasks. differences: {task: d}; items: {task: item label}."""
    by_item = {}
    for t, d in differences.items():
        by_item.setdefault(items[t], []).append(d)
    values = [statistics.mean(ds) for ds in by_item.values()]
    return bootstrap_mean_ci(values, [len(ds) for ds in by_item.values()], **bootstrap)


# ----------------------------------------------------------------------------------------------------------------------
# A vs B over paired runs


def sft_key(run: dict):
    """Which SFT row an RL run is compared with: its warm start's, and under faults its fault stream's (the RL seed's:
    train.py evaluates SFT on the run's own stream)."""
    return run["warm_start"], run["seed"] if run.get("fault_rate") else None


def pair_runs(runs: list, a: str, b: str) -> list[tuple[dict, dict]]:
    """[(A run, B run)]: RL methods paired by (warm start, seed); X vs SFT pairs each X run with its SFT row."""
    if b == "SFT":
        sft = {(r["warm_start"], r["seed"]): r for r in runs if r["method"] == "SFT"}
        return [(r, sft[sft_key(r)]) for r in runs if r["method"] == a and sft_key(r) in sft]
    other = {(r["warm_start"], r["seed"]): r for r in runs if r["method"] == b}
    return [(r, other[r["warm_start"], r["seed"]]) for r in runs
            if r["method"] == a and (r["warm_start"], r["seed"]) in other]


def compare(runs: list, a: str, b: str, task_ids: list, items: dict) -> dict | None:
    """A vs B: per-pair differences, paired t, sign test, clustered CI, McNemar per pair; None if nothing pairs."""
    pairs = pair_runs(runs, a, b)
    if not pairs:
        return None
    diffs = [pass_rate(ra["outcomes"], task_ids) - pass_rate(rb["outcomes"], task_ids) for ra, rb in pairs]
    mean, t, p = paired_t(diffs)
    pos, neg, sign_p = sign_test(diffs)
    mcnemar = []
    for ra, rb in pairs:
        b_count, c_count = paired_counts(ra["outcomes"], rb["outcomes"])
        mcnemar.append({"warm_start": ra["warm_start"], "seed": ra["seed"], "b": b_count, "c": c_count,
                        "p": mcnemar_exact(b_count, c_count)})
    differences = task_differences([(ra["outcomes"], rb["outcomes"]) for ra, rb in pairs], task_ids)
    return {"a": a, "b": b, "n": len(pairs), "diffs": diffs, "diff": mean, "t": t, "t_p": p, "sign": (pos, neg),
            "sign_p": sign_p, "ci": clustered_ci(differences, items), "mcnemar": mcnemar}


# ----------------------------------------------------------------------------------------------------------------------
# The tables of results.md that the record alone gives (a committed record reproduces them)

GROUPS = ["G1", "G2", "G3", "all"]


def methods_of(record: dict) -> list:
    return list(dict.fromkeys(r["method"] for r in record["runs"]))


def cell(values, digits: int = 1) -> str:
    values = list(values)
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def ids_in(record: dict, group: str) -> list:
    return [t for t in record["test_task_ids"] if group == "all" or record["test_task_groups"][t] == group]


def pass_table(record: dict) -> str:
    """Pass rate (%) per group, mean ± std over runs (SFT: over warm starts), one row per method."""
    lines = ["| method | runs | " + " | ".join(f"{g} pass" for g in GROUPS) + " |", "|---" * (2 + len(GROUPS)) + "|"]
    for m in methods_of(record):
        runs = [r for r in record["runs"] if r["method"] == m]
        cells = [cell(100 * pass_rate(r["outcomes"], ids_in(record, g)) for r in runs if ids_in(record, g))
                 for g in GROUPS]
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def type_table(record: dict) -> str:
    """Pass rate (%) per task type (rows) and method (columns), mean ± std over runs."""
    kinds = record["test_task_kinds"]
    methods = methods_of(record)
    lines = ["| type | group | tasks | " + " | ".join(methods) + " |", "|---" * (3 + len(methods)) + "|"]
    for kind in dict.fromkeys(kinds[t] for t in record["test_task_ids"]):
        ids = [t for t in record["test_task_ids"] if kinds[t] == kind]
        cells = [cell(100 * pass_rate(r["outcomes"], ids) for r in record["runs"] if r["method"] == m) for m in methods]
        lines.append(f"| {kind} | {record['test_task_groups'][ids[0]]} | {len(ids)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steps_table(record: dict) -> str:
    """Steps per episode (calls, plus the Finish step), per group: mean ± std over runs of each run's mean."""
    lines = ["| method | " + " | ".join(GROUPS) + " |", "|---" * (1 + len(GROUPS)) + "|"]
    for m in methods_of(record):
        runs = [r for r in record["runs"] if r["method"] == m]
        cells = [cell([statistics.mean(steps(r["calls"][t], r["stops"][t]) for t in ids_in(record, g)) for r in runs
                       if ids_in(record, g)], digits=2) for g in GROUPS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(record: dict, extra_pairs=()) -> list[dict]:
    """Every method vs SFT, StepTool vs every other RL method, and extra_pairs [(A, B)], where runs pair."""
    rl = [m for m in methods_of(record) if m != "SFT"]
    pairs = [(m, "SFT") for m in rl] + [("StepTool", m) for m in rl if m != "StepTool" and "StepTool" in rl]
    pairs += [(a, b) for a, b in extra_pairs if a in rl and b in rl]
    rows = [compare(record["runs"], a, b, record["test_task_ids"], record["test_task_items"]) for a, b in pairs]
    return [r for r in rows if r]


def p_text(p) -> str:
    return "-" if p is None else f"{p:.3g}"


def comparison_table(rows: list[dict]) -> str:
    lines = ["| A vs B | pairs | Δ pass (points) | Δ per pair | paired t p | sign test +/− (p) | item-clustered "
             "95% CI | McNemar per pair: b/c (p) |", "|---" * 8 + "|"]
    for r in rows:
        mcnemar = "; ".join(f"ws{x['warm_start']}" + (f" s{x['seed']}" if x["seed"] is not None else "")
                            + f": {x['b']}/{x['c']} ({x['p']:.2g})" for x in r["mcnemar"])
        lines.append(f"| {r['a']} vs {r['b']} | {r['n']} | {100 * r['diff']:+.1f} | "
                     + " ".join(f"{100 * d:+.1f}" for d in r["diffs"]) + f" | {p_text(r['t_p'])} | "
                     f"{r['sign'][0]}/{r['sign'][1]} ({p_text(r['sign_p'])}) | "
                     f"[{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}] | {mcnemar} |")
    return "\n".join(lines)
