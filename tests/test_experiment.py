"""experiment.py without training: the paired statistics against hand-computed values, and the experiment file
and tables built from fake train.py results written in a temporary directory."""
import json
import math

import pytest

import experiment
from experiment import bootstrap_ci, compare, groups_of_test_tasks, mcnemar_exact, paired_counts


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


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
    assert math.isclose(mcnemar_exact(1, 8), 0.0390625)


def test_paired_counts_call_only_a_full_solve_solved():
    a = {"t1": 1, "t2": 0, "t3": 0.5, "t4": 1, "t5": 0, "t6": 1}
    b = {"t1": 0, "t2": 1, "t3": 1, "t4": 1, "t5": 0.5, "t7": 0}
    # only A: t1; only B: t2 and t3 (0.5 = Unsure is not solved); t4 both, t5 neither; t6, t7 unpaired
    assert paired_counts(a, b) == (1, 2)
    assert paired_counts(b, a) == (2, 1)


def test_a_bootstrap_of_a_constant_difference_is_a_zero_width_interval_at_that_value():
    assert bootstrap_ci([0.25] * 40) == (0.25, 0.25)


def test_the_bootstrap_interval_brackets_the_mean_is_reproducible_and_narrows_with_more_tasks():
    few, many = [1.0, 0.0] * 10, [1.0, 0.0] * 500
    low, high = bootstrap_ci(few)
    assert low < 0.5 < high and 0.0 <= low and high <= 1.0
    assert bootstrap_ci(few) == (low, high)                         # a fixed seed: the same interval every time
    low_many, high_many = bootstrap_ci(many)
    assert high_many - low_many < (high - low) / 3                   # ~1/sqrt(50) as wide
    assert bootstrap_ci(many, level=0.5)[1] - bootstrap_ci(many, level=0.5)[0] < high_many - low_many


def test_compare_pools_discordant_pairs_over_seeds_and_averages_differences_per_task():
    runs = [{"method": "A", "seed": 0, "outcomes": {"x": 1, "y": 0}},
            {"method": "B", "seed": 0, "outcomes": {"x": 0, "y": 0}},
            {"method": "A", "seed": 1, "outcomes": {"x": 1, "y": 1}},
            {"method": "B", "seed": 1, "outcomes": {"x": 1, "y": 0}},
            {"method": "A", "seed": 2, "outcomes": {"x": 0, "y": 0}}]          # seed 2 has no B run: not paired
    row = compare(runs, "A", "B", ["x", "y"])
    assert row["seeds"] == [0, 1] and (row["b_count"], row["c_count"]) == (2, 0)
    assert row["diff"] == pytest.approx((0.5 + 0.5) / 2)                   # x: (1 + 0)/2, y: (0 + 1)/2
    assert row["p"] == pytest.approx(0.5)                                 # 2 · C(2,0) / 2^2


# ----------------------------------------------------------------------------------------------------------------------
# The experiment file, from fake train.py results


IDS = ["test-00000", "test-00001", "test-00002", "test-00003"]
SFT = dict(zip(IDS, [0, 0, 1, 0.5]))


def fake_result(outcomes, sft=SFT):
    metrics = {"all": {"pass_rate": 0.5, "recall": 0.9, "fault_rate": 0.3, "retry_after_fault": 0.25}}
    return {"test_outcomes": dict(zip(IDS, outcomes)), "sft_test_outcomes": dict(sft),
            "test_task_groups": dict(zip(IDS, [1, 2, 3, 1])), "config": {"fault_rate": 0.3},
            "sft_val": {"all": {"pass_rate": 0.1}}, "history": [{"iter": 0, "val_pass": 0.2}],
            "sft_test": metrics, "test": metrics}


def test_the_experiment_file_is_written_from_existing_runs_without_training(tmp_path, capsys):
    runs_dir, results_dir = tmp_path / "runs", tmp_path / "results"
    for tag, outcomes in [("ppo", [1, 0, 1, 0]), ("steptool", [1, 1, 1, 0.5])]:
        (runs_dir / f"{tag}-seed0").mkdir(parents=True)
        (runs_dir / f"{tag}-seed0" / "results.json").write_text(json.dumps(fake_result(outcomes)))
    experiment.main(["--seeds", "0", "--out", str(runs_dir), "--results-dir", str(results_dir), "--preset", "smoke"])

    record = json.loads((results_dir / "experiment-smoke-faults30.json").read_text())     # runs under 30% faults
    assert set(record) == {"preset", "test_task_ids", "test_task_groups", "runs"}
    assert record["preset"] == "smoke" and record["test_task_ids"] == IDS
    assert record["test_task_groups"] == dict(zip(IDS, ["G1", "G2", "G3", "G1"]))
    assert [(r["method"], r["seed"]) for r in record["runs"]] == [("SFT", 0), ("PPO-final", 0), ("StepTool", 0)]
    assert all(set(r) == {"method", "seed", "fault_rate", "outcomes"} for r in record["runs"])
    assert all(r["fault_rate"] == 0.3 for r in record["runs"])
    assert record["runs"][0]["outcomes"] == SFT                 # the two identical SFT evaluations are one run
    assert record["runs"][2]["outcomes"] == dict(zip(IDS, [1, 1, 1, 0.5]))

    md = (runs_dir / "results.md").read_text()
    assert md in capsys.readouterr().out
    assert "| SFT | 1 | 0.0 ± 0.0 | 0.0 ± 0.0 | 100.0 ± 0.0 | 25.0 ± 0.0 |" in md       # G1 holds tasks 0 and 3
    assert "| StepTool | 1 | 50.0 ± 0.0 | 100.0 ± 0.0 | 100.0 ± 0.0 | 75.0 ± 0.0 |" in md
    # StepTool vs SFT: only StepTool solves tasks 0 and 1 -> b/c = 2/0, p = 2·C(2,0)/2^2 = 0.5, +50 points
    step_vs_sft = next(line for line in md.splitlines() if line.startswith("| StepTool vs SFT |"))
    assert step_vs_sft.startswith("| StepTool vs SFT | 1 | 2 / 0 | +50.0 |") and step_vs_sft.endswith("| 0.5 |")
    assert "| StepTool vs PPO-final | 1 | 1 / 0 | +25.0 |" in md and "| PPO-final vs SFT | 1 | 1 / 0 | +25.0 |" in md
    assert "| StepTool | 1 | 30.0 | 25.0 | 50.0 |" in md                       # the fault table, from the metrics


def test_a_finished_run_is_reused_unless_another_test_length_is_asked_for(tmp_path, monkeypatch):
    calls = []

    def fake_train(cmd, check):                        # train.py --resume: writes results.json for --n-test tasks
        calls.append(cmd)
        n = int(cmd[cmd.index("--n-test") + 1]) if "--n-test" in cmd else 4
        (tmp_path / "results.json").write_text(json.dumps({"test_outcomes": {f"t{i}": 1 for i in range(n)}}))

    monkeypatch.setattr(experiment.subprocess, "run", fake_train)
    first = experiment.run(str(tmp_path), "smoke", 0, ["--reward", "step"], [])
    assert len(calls) == 1 and len(first["test_outcomes"]) == 4
    experiment.run(str(tmp_path), "smoke", 0, ["--reward", "step"], [])          # finished: reused
    experiment.run(str(tmp_path), "smoke", 0, ["--reward", "step"], [], n_test=4)  # finished on 4 tasks: reused
    assert len(calls) == 1
    longer = experiment.run(str(tmp_path), "smoke", 0, ["--reward", "step"], [], n_test=9)
    assert len(calls) == 2 and len(longer["test_outcomes"]) == 9
    assert "--resume" in calls[1] and calls[1][-2:] == ["--n-test", "9"]
    assert experiment.record_file("smoke", {"runs": [{"fault_rate": 0.0}]}, n_test=9) == "experiment-smoke-test9.json"


def test_the_fault_table_averages_each_method_over_seeds_and_takes_sft_from_each_seed():
    def result(sft, rl):
        keys = ("fault_rate", "retry_after_fault", "pass_rate")
        return {"sft_test": {"all": dict(zip(keys, sft))}, "test": {"all": dict(zip(keys, rl))}}
    table = experiment.fault_table({("StepTool", 0): result((0.3, 0.0, 0.4), (0.3, 0.5, 0.5)),
                                    ("StepTool", 1): result((0.2, 0.1, 0.2), (0.4, 0.7, 0.6)),
                                    ("PPO-final", 0): result((0.3, 0.0, 0.4), (0.1, 0.0, 0.3))})
    rows = table.splitlines()[2:]
    assert rows == ["| SFT | 2 | 25.0 | 5.0 | 30.0 |", "| StepTool | 2 | 35.0 | 60.0 | 55.0 |",
                    "| PPO-final | 1 | 10.0 | 0.0 | 30.0 |"]
    assert experiment.record_file("p", {"runs": [{"fault_rate": 0.0}]}) == "experiment-p.json"


def test_differing_sft_evaluations_are_kept_apart_and_mismatched_test_lists_are_refused():
    other_sft = dict(zip(IDS, [1, 1, 1, 1]))
    record = experiment.experiment_record("p", {("PPO-final", 0): fake_result([1, 0, 1, 0]),
                                                ("StepTool", 0): fake_result([1, 1, 1, 1], sft=other_sft)})
    assert [r["method"] for r in record["runs"]] == ["SFT", "SFT", "PPO-final", "StepTool"]
    shorter = fake_result([1, 0, 1, 0])
    shorter["test_outcomes"].pop(IDS[0])
    with pytest.raises(ValueError, match="StepTool seed 0: test_outcomes covers other test tasks"):
        experiment.experiment_record("p", {("PPO-final", 0): fake_result([1, 0, 1, 0]), ("StepTool", 0): shorter})


def test_groups_come_from_the_task_suite_when_results_json_lacks_them():
    from tools import make_tasks
    tasks = make_tasks("test", 30, seed=0)
    groups = groups_of_test_tasks({"config": {}}, [t.id for t in tasks])
    assert groups == {t.id: f"G{t.group}" for t in tasks}


def test_the_diagnostics_count_steps_stop_reasons_and_changed_actions_per_method():
    def transcripts(actions_and_stops):
        return {i: {"actions": a, "stop": s} for i, (a, s) in zip(IDS, actions_and_stops)}
    sft = transcripts([(["a", "F"], "finish"), (["b"], "finish"), (["c"] * 3, "max_steps"), (["d"], "give_up")])
    rl = transcripts([(["a", "F"], "finish"), (["b", "x"], "finish"), (["c"] * 5, "token_budget"), (["d"], "give_up")])
    result = fake_result([1, 0, 1, 0]) | {"sft_test_transcripts": sft, "test_transcripts": rl}
    result["history"] = [{"iter": 0, "return": 0.5, "explained_variance": 0.25, "invalid": 0.1}]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in
            experiment.diagnostics_table({("StepTool", 0): result}).splitlines()[2:]}
    # groups of IDS: G1, G2, G3, G1 -> SFT steps G1 (2 + 1)/2, G2 1, G3 3; StepTool G1 (2 + 1)/2, G2 2, G3 5
    assert rows["SFT"][0] == "1.50 / 1.00 / 3.00" and rows["StepTool"][0] == "1.50 / 2.00 / 5.00"
    assert rows["SFT"][1] == "50 / 25 / 25 / 0" and rows["StepTool"][1] == "50 / 25 / 0 / 25"
    assert rows["SFT"][2] == "0" and rows["StepTool"][2] == "50"               # tasks 2 and 3 changed
    assert rows["StepTool"][3].rstrip(" |") == "0.50 / 0.25 / 0.10" and rows["SFT"][3].rstrip(" |") == "-"
