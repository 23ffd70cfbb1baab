"""stats.py against hand-worked numbers, closed forms and plain-loop oracles: the exact binomial tests, Student's t
(regularized incomplete beta by continued fraction), the paired t, the bootstrap (plain and clustered by item), and
which runs pair with which."""
import math

import numpy as np
import pytest

from stats import (binomial_two_sided, bootstrap_mean_ci, clustered_ci, compare, incomplete_beta, mcnemar_exact,
                   paired_counts, paired_t, pair_runs, sign_test, steps, student_t_cdf, student_t_two_sided,
                   task_differences)


# ----------------------------------------------------------------------------------------------------------------------
# Exact binomial tests


@pytest.mark.parametrize("b, c, p", [
    (1, 8, 2 * (1 + 9) / 2 ** 9),                  # 2·(C(9,0) + C(9,1)) / 2^9 = 0.0390625
    (8, 1, 0.0390625),                             # two-sided: symmetric in b and c
    (0, 6, 2 * 1 / 2 ** 6),                        # 0.03125
    (2, 10, 2 * (1 + 12 + 66) / 2 ** 12),          # 0.03857421875
    (5, 5, 1.0),                                   # b = c: no evidence either way (the raw sum exceeds 1)
    (0, 0, 1.0),                                   # no discordant pair at all
    (0, 1, 1.0),
])
def test_the_exact_mcnemar_p_value_matches_the_hand_computed_binomial_tail(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-12)
    assert binomial_two_sided(b, c) == mcnemar_exact(b, c)


def test_paired_counts_call_only_a_full_solve_solved():
    a = {"t1": 1, "t2": 0, "t3": 0.5, "t4": 1, "t5": 0, "t6": 1}
    b = {"t1": 0, "t2": 1, "t3": 1, "t4": 1, "t5": 0.5, "t7": 0}
    # only A: t1; only B: t2 and t3 (0.5 = Unsure is not solved); t4 both, t5 neither; t6, t7 unpaired
    assert paired_counts(a, b) == (1, 2)
    assert paired_counts(b, a) == (2, 1)


def test_the_sign_test_drops_ties_and_is_the_binomial_tail_of_the_signs():
    assert sign_test([0.1, 0.2, 0.05, 0.0, 0.3]) == (4, 0, 2 * 1 / 2 ** 4)          # 0.125
    assert sign_test([0.1, -0.2, 0.05, 0.3, 0.2, 0.1]) == (5, 1, 2 * (1 + 6) / 2 ** 6)   # 0.21875
    assert sign_test([0.0, 0.0]) == (0, 0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Student's t


def beta_by_midpoint_rule(a, b, x, n=20_000):
    """Plain-loop oracle: ∫_0^x u^(a−1)(1−u)^(b−1) du / ∫_0^1 (same), midpoint rule (a, b ≥ 1: no singularity)."""
    def integral(upper):
        h = upper / n
        return sum(((i + 0.5) * h) ** (a - 1) * (1 - (i + 0.5) * h) ** (b - 1) for i in range(n)) * h
    return integral(x) / integral(1.0)


@pytest.mark.parametrize("a, b, x", [(2.5, 3.5, 0.3), (4.0, 3.0, 0.8), (7.0, 2.0, 0.95), (1.5, 6.0, 0.05)])
def test_the_incomplete_beta_matches_a_plain_numerical_integral_on_both_branches_of_the_fraction(a, b, x):
    assert incomplete_beta(a, b, x) == pytest.approx(beta_by_midpoint_rule(a, b, x), abs=1e-7)


def test_the_incomplete_beta_matches_its_closed_forms():
    # I_x(a, 1) = x^a;  I_x(1, b) = 1 − (1 − x)^b;  I_x(2, 3) = Σ_{j=2..4} C(4, j) x^j (1 − x)^(4−j) = 0.5248 at 0.4
    assert incomplete_beta(3.0, 1.0, 0.7) == pytest.approx(0.7 ** 3, abs=1e-13)
    assert incomplete_beta(1.0, 2.5, 0.3) == pytest.approx(1 - 0.7 ** 2.5, abs=1e-13)
    assert incomplete_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-13)
    assert incomplete_beta(0.5, 0.5, 0.9) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.9)), abs=1e-13)
    assert (incomplete_beta(2.0, 3.0, 0.0), incomplete_beta(2.0, 3.0, 1.0)) == (0.0, 1.0)


@pytest.mark.parametrize("t", [-4.0, -1.3, -0.2, 0.0, 0.5, 1.0, 2.7, 9.0])
def test_the_student_t_cdf_matches_the_closed_forms_for_one_two_and_three_degrees_of_freedom(t):
    r3 = t / math.sqrt(3)
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)              # Cauchy
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert student_t_cdf(t, 3) == pytest.approx(0.5 + (r3 / (1 + r3 * r3) + math.atan(r3)) / math.pi, abs=1e-12)


@pytest.mark.parametrize("t, df, p", [
    (12.706, 1, 0.05), (4.303, 2, 0.05), (2.571, 5, 0.05), (2.228, 10, 0.05), (2.042, 30, 0.05),   # t tables
    (4.032, 5, 0.01), (2.845, 20, 0.01), (1.960, 100_000, 0.05),                                    # ~ the normal
])
def test_two_sided_p_values_at_tabulated_critical_values(t, df, p):
    assert student_t_two_sided(t, df) == pytest.approx(p, abs=2e-4)
    assert student_t_two_sided(-t, df) == student_t_two_sided(t, df)


def test_the_paired_t_of_a_hand_worked_set_of_differences():
    # d = 0.5, 0.5, 0.5, 0: mean 0.375, sd = √((3·0.125² + 0.375²) / 3) = 0.25, t = 0.375 / (0.25 / 2) = 3, df 3
    mean, t, p = paired_t([0.5, 0.5, 0.5, 0.0])
    assert (mean, t) == (pytest.approx(0.375), pytest.approx(3.0))
    r3 = 3 / math.sqrt(3)
    assert p == pytest.approx(2 * (0.5 - (r3 / (1 + r3 * r3) + math.atan(r3)) / math.pi), abs=1e-12)   # 0.0577
    assert paired_t([0.2]) == (0.2, None, None)                       # one pair: no spread, no test
    assert paired_t([0.1, 0.1, 0.1]) == (pytest.approx(0.1), math.inf, 0.0)
    assert paired_t([0.0, 0.0]) == (0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap


def percentile_by_hand(xs, q):
    """numpy's default ("linear") percentile, as a loop would do it."""
    xs = sorted(xs)
    position = q / 100 * (len(xs) - 1)
    low = int(position)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (position - low) * (xs[high] - xs[low])


def test_the_weighted_bootstrap_equals_a_plain_loop_over_the_same_draws():
    values, weights = [1.0, 0.0, 0.5, -1.0, 1.0], [3, 1, 2, 1, 1]
    rng = np.random.default_rng(7)
    draws = rng.integers(0, len(values), size=(500, len(values)))
    means = []
    for row in draws:
        num = den = 0.0
        for i in row:
            num += values[i] * weights[i]
            den += weights[i]
        means.append(num / den)
    expected = (percentile_by_hand(means, 2.5), percentile_by_hand(means, 97.5))
    assert bootstrap_mean_ci(values, weights, n_resamples=500, seed=7) == pytest.approx(expected, abs=1e-12)


def test_a_bootstrap_of_a_constant_difference_is_a_zero_width_interval_at_that_value():
    assert bootstrap_mean_ci([0.25] * 40) == (0.25, 0.25)


def test_the_bootstrap_interval_brackets_the_mean_is_reproducible_and_narrows_with_more_tasks():
    few, many = [1.0, 0.0] * 10, [1.0, 0.0] * 500
    low, high = bootstrap_mean_ci(few)
    assert low < 0.5 < high and 0.0 <= low and high <= 1.0
    assert bootstrap_mean_ci(few) == (low, high)                     # a fixed seed: the same interval every time
    low_many, high_many = bootstrap_mean_ci(many)
    assert high_many - low_many < (high - low) / 3                   # ~1/sqrt(50) as wide
    assert bootstrap_mean_ci(many, level=0.5)[1] - bootstrap_mean_ci(many, level=0.5)[0] < high_many - low_many


def test_the_clustered_interval_resamples_whole_items_weighted_by_their_tasks():
    # Item x holds three tasks (difference 1 each), item y one task (0). Resamples of 2 items: xx -> 1, xy and yx ->
    # (3 + 0) / 4 = 0.75 (a mean over tasks, not 0.5 over items), yy -> 0; each end has probability 1/4.
    differences = {"t1": 1.0, "t2": 1.0, "t3": 1.0, "t4": 0.0}
    items = {"t1": "x", "t2": "x", "t3": "x", "t4": "y"}
    assert clustered_ci(differences, items) == (0.0, 1.0)
    assert clustered_ci(differences, items, level=0.4) == (0.75, 0.75)   # the middle half of the resamples
    # tasks alone (each its own item): 4 tasks, the lowest resample mean is 0 only if all four draws are t4
    assert clustered_ci(differences, {t: t for t in differences})[0] > 0.0


def test_task_differences_average_solved_differences_over_the_pairs():
    pairs = [({"x": 1, "y": 0}, {"x": 0, "y": 0}), ({"x": 1, "y": 0.5}, {"x": 1, "y": 1})]
    assert task_differences(pairs, ["x", "y"]) == {"x": 0.5, "y": -0.5}   # x: (1 + 0)/2; y: (0 − 1)/2


def test_steps_count_the_calls_and_a_finish_step():
    assert steps([["get_city", {}], ["calculator", {}]], "finish") == 3
    assert steps([["get_city", {}]], "give_up") == 2                  # give_up is a Finish action too
    assert steps([["get_city", {}]] * 4, "max_steps") == 4
    assert steps([], "token_budget") == 0


# ----------------------------------------------------------------------------------------------------------------------
# Which runs pair


def row(method, warm_start, seed, outcomes, fault_rate=0.0):
    return {"method": method, "warm_start": warm_start, "seed": seed, "fault_rate": fault_rate, "outcomes": outcomes}


def test_rl_runs_pair_by_warm_start_and_seed_and_each_pairs_with_its_own_warm_starts_sft_row():
    runs = [row("SFT", 0, None, {}), row("SFT", 1, None, {}),
            row("A", 0, 0, {}), row("A", 0, 1, {}), row("A", 1, 0, {}), row("A", 2, 0, {}),
            row("B", 0, 1, {}), row("B", 1, 0, {}), row("B", 1, 1, {})]
    pairs = [((a["warm_start"], a["seed"]), (b["method"], b["warm_start"], b["seed"]))
             for a, b in pair_runs(runs, "A", "SFT")]
    assert pairs == [((0, 0), ("SFT", 0, None)), ((0, 1), ("SFT", 0, None)), ((1, 0), ("SFT", 1, None))]  # ws 2: no SFT
    pairs = [((a["warm_start"], a["seed"]), (b["warm_start"], b["seed"])) for a, b in pair_runs(runs, "A", "B")]
    assert pairs == [((0, 1), (0, 1)), ((1, 0), (1, 0))]


def test_under_faults_an_rl_run_pairs_with_the_sft_row_of_its_own_fault_stream():
    runs = [row("SFT", 0, 0, {}, 0.3), row("SFT", 0, 1, {}, 0.3), row("A", 0, 1, {}, 0.3), row("A", 0, 0, {}, 0.3)]
    assert [(a["seed"], b["seed"]) for a, b in pair_runs(runs, "A", "SFT")] == [(1, 1), (0, 0)]


def test_compare_reports_per_pair_differences_their_tests_and_mcnemar_per_pair():
    ids, items = ["x", "y"], {"x": "kx", "y": "ky"}
    runs = [row("SFT", 0, None, {"x": 0, "y": 0}), row("SFT", 1, None, {"x": 1, "y": 0}),
            row("A", 0, 0, {"x": 1, "y": 1}), row("A", 0, 1, {"x": 1, "y": 0}), row("A", 1, 0, {"x": 0, "y": 1})]
    r = compare(runs, "A", "SFT", ids, items)
    assert r["diffs"] == [1.0, 0.5, 0.0] and r["diff"] == pytest.approx(0.5) and r["n"] == 3
    # sd = 0.5, t = 0.5 / (0.5 / √3) = √3, df 2: P(|T| ≥ √3) = 1 − √3 / √(2 + 3)
    assert r["t"] == pytest.approx(math.sqrt(3)) and r["t_p"] == pytest.approx(1 - math.sqrt(3 / 5), abs=1e-12)
    assert r["sign"] == (2, 0) and r["sign_p"] == 0.5
    assert [(m["warm_start"], m["seed"], m["b"], m["c"]) for m in r["mcnemar"]] == [(0, 0, 2, 0), (0, 1, 1, 0),
                                                                                   (1, 0, 1, 1)]
    assert r["mcnemar"][0]["p"] == 0.5 and r["mcnemar"][2]["p"] == 1.0
    assert compare(runs, "B", "SFT", ids, items) is None
