"""experiment.py without training: train.py is replaced by a fake that parses its real flags (config.parse_config)
and writes a results.json, so planning, resuming, refusing stale runs, the record, merging, re-judging, reproducing
and the tables are checked against hand-computed values. The statistics themselves: tests/test_stats.py."""
import json
import math
import os
from dataclasses import asdict

import pytest

import experiment
import tools
from config import parse_config

IDS = ["test-00000", "test-00001", "test-00002", "test-00003"]   # the large suite's first four: G1, G2, G3, G1
SFT = {0: [0, 0, 1, 0.5], 1: [1, 0, 1, 0]}                        # per warm start: pass 25% and 50%
OUTCOMES = {                                                      # run directory -> test outcomes
    "steptool-ws0-seed0": [1, 1, 1, 0.5], "steptool-ws0-seed1": [1, 0, 1, 1],           # 75%, 75%
    "steptool-ws1-seed0": [1, 1, 1, 1], "steptool-ws1-seed1": [1, 1, 0, 0],             # 100%, 50%
    "ppo-final-ws0-seed0": [1, 0, 1, 0], "ppo-final-ws0-seed1": [0, 0, 1, 0],           # 50%, 25%
    "ppo-final-ws1-seed0": [1, 0, 1, 0], "ppo-final-ws1-seed1": [1, 1, 1, 0],           # 50%, 75%
    "steptool-ref-ws0-seed0": [0, 0, 0, 0], "sft-ws0-seed0": SFT[0], "sft-ws1-seed0": SFT[1],
}


def transcripts(n_calls: int, stop: str = "finish") -> dict:
    return {t: {"actions": ["a"] * (n_calls + 1), "calls": [["get_city", {"city": "X"}]] * n_calls,
                "answer": f"answer to {t}", "stop": stop} for t in IDS}


def fake_result(cfg, outcomes, sft_outcomes, key=None) -> dict:
    """A results.json as train.py writes it (only what experiment.py reads)."""
    metrics = {"all": {"pass_rate": 0.5, "recall": 0.9, "fault_rate": 0.3, "retry_after_fault": 0.25}}
    return {"config": asdict(cfg), "test_outcomes": dict(zip(IDS, outcomes)),
            "sft_test_outcomes": dict(zip(IDS, sft_outcomes)), "test_task_groups": dict(zip(IDS, [1, 2, 3, 1])),
            "test_transcripts": transcripts(2), "sft_test_transcripts": transcripts(1),
            "sft_val": {"all": {"pass_rate": 0.1}}, "sft_test": metrics, "test": metrics,
            "history": [{"iter": 0, "val_pass": 0.2, "return": 1.5, "explained_variance": 0.25, "invalid": 0.0}]
            if cfg.iters else [],
            "provenance": {"commit": "c0ffee", "dirty": False},
            "warm_start": {"key": key or f"key-ws{cfg.sft_seed}", "commit": "5eed"}}


@pytest.fixture
def fake_train(monkeypatch):
    """experiment.subprocess.run -> parse train.py's flags, write its results.json; returns the commands run."""
    calls = []
    monkeypatch.setattr(experiment, "warm_start_key", lambda cfg: f"key-ws{cfg.sft_seed}")

    def train(cmd, check):
        assert cmd[1] == experiment.TRAIN and check
        calls.append(cmd)
        cfg = parse_config(cmd[2:])
        os.makedirs(cfg.out, exist_ok=True)
        result = fake_result(cfg, OUTCOMES.get(os.path.basename(cfg.out), SFT[cfg.sft_seed]), SFT[cfg.sft_seed])
        if not cfg.sft_test_eval:                      # as train.py: no SFT row, its val evaluation still there
            result |= {"sft_test": None, "sft_test_outcomes": None, "sft_test_transcripts": None}
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(result, f)
    monkeypatch.setattr(experiment.subprocess, "run", train)
    return calls


def main(tmp_path, *argv, record="experiment-smoke.json"):
    experiment.main(["--preset", "smoke", "--suite", "large", "--out", str(tmp_path / "runs"), "--results-dir",
                     str(tmp_path / "results"), *argv])
    return json.loads((tmp_path / "results" / record).read_text())


# ----------------------------------------------------------------------------------------------------------------------
# The experiment: runs, record, tables


def test_each_method_runs_per_warm_start_and_seed_and_the_tables_pair_runs(tmp_path, fake_train, capsys):
    record = main(tmp_path, "--sft-seeds", "0", "1", "--seeds", "0", "1")
    dirs = [os.path.basename(c[c.index("--out") + 1]) for c in fake_train]
    assert dirs == [f"{m}-ws{w}-seed{s}" for m in ("ppo-final", "steptool") for w in (0, 1) for s in (0, 1)]
    first = fake_train[0]
    assert first[first.index("--sft-seed") + 1] == "0" and first[first.index("--seed") + 1] == "0"
    assert "--resume" in first and first[first.index("--reward") + 1] == "final"

    text = (tmp_path / "results" / "experiment-smoke.json").read_text()
    assert text.startswith('{"preset":"smoke","suite":"large","train_flags":["--suite","large"],"judge":')  # compact
    assert list(record) == ["preset", "suite", "train_flags", "judge", "reward", "test_task_ids", "test_task_groups",
                            "test_task_kinds", "test_task_items", "runs"]
    assert (record["judge"], record["reward"]) == experiment.versions()
    assert record["test_task_groups"] == dict(zip(IDS, ["G1", "G2", "G3", "G1"]))
    suite = {t.id: t for t in tools.make_suite("large").tasks("test", 4)}
    assert record["test_task_kinds"] == {t: suite[t].kind for t in IDS}
    assert record["test_task_kinds"]["test-00000"] == "weather"
    assert record["test_task_items"] == {t: experiment.item_of(suite[t]) for t in IDS}
    # one SFT row per warm start (not one per RL seed), then the RL runs in method, warm start, seed order
    assert [(r["method"], r["warm_start"], r["seed"]) for r in record["runs"]] == \
        [("SFT", 0, None), ("SFT", 1, None)] + [(m, w, s) for m in ("PPO-final", "StepTool") for w in (0, 1)
                                               for s in (0, 1)]
    sft, step = record["runs"][0], record["runs"][-1]
    assert sft["outcomes"] == dict(zip(IDS, SFT[0]))
    assert step["outcomes"] == dict(zip(IDS, OUTCOMES["steptool-ws1-seed1"]))
    assert (step["commit"], step["dirty"], step["warm_start_key"], step["warm_start_commit"]) == \
        ("c0ffee", False, "key-ws1", "5eed")
    assert step["answers"]["test-00002"] == "answer to test-00002" and step["stops"]["test-00002"] == "finish"
    assert step["calls"]["test-00002"] == [["get_city", {"city": "X"}]] * 2 and len(sft["calls"]["test-00002"]) == 1

    md = (tmp_path / "runs" / "results.md").read_text()
    assert md in capsys.readouterr().out
    # all: SFT 25, 50 -> 37.5 ± 17.7 (sd √(2 · 12.5²)); StepTool 75, 75, 100, 50 -> 75 ± √(2 · 25² / 3) = 20.4;
    # G1 = tasks 0 and 3 (0.5 is not solved): SFT 0, 50; StepTool 50, 100, 100, 50; PPO-final 50, 0, 50, 50
    assert "| SFT | 2 | 25.0 ± 35.4 | 0.0 ± 0.0 | 100.0 ± 0.0 | 37.5 ± 17.7 |" in md
    assert "| StepTool | 4 | 75.0 ± 28.9 | 75.0 ± 50.0 | 75.0 ± 50.0 | 75.0 ± 20.4 |" in md
    assert "| PPO-final | 4 | 37.5 ± 25.0 | 25.0 ± 50.0 | 100.0 ± 0.0 | 50.0 ± 20.4 |" in md
    assert "| weather | G1 | 1 | 50.0 ± 70.7 | 75.0 ± 50.0 | 100.0 ± 0.0 |" in md          # task 0 by type
    # StepTool vs SFT, each run against its warm start's SFT: +50, +50, +50, 0 -> mean 37.5, sd 25, t = 3 (df 3);
    # sign test 3/0 (tie dropped): p = 2/8; McNemar per pair 2/0 (p 0.5) three times, then 1/1 (p 1)
    r3 = 3 / math.sqrt(3)
    t_p = 2 * (0.5 - (r3 / (1 + r3 * r3) + math.atan(r3)) / math.pi)
    row = next(line for line in md.splitlines() if line.startswith("| StepTool vs SFT |"))
    assert row.startswith(f"| StepTool vs SFT | 4 | +37.5 | +50.0 +50.0 +50.0 +0.0 | {t_p:.3g} | 3/0 (0.25) | [")
    assert row.endswith("| ws0 s0: 2/0 (0.5); ws0 s1: 2/0 (0.5); ws1 s0: 2/0 (0.5); ws1 s1: 1/1 (1) |")
    # StepTool vs PPO-final by (warm start, seed): +25, +50, +50, -25
    assert "| StepTool vs PPO-final | 4 | +25.0 | +25.0 +50.0 +50.0 -25.0 |" in md
    # steps: SFT episodes 1 call + Finish, RL 2 calls + Finish
    assert "| SFT | 2.00 ± 0.00 | 2.00 ± 0.00 | 2.00 ± 0.00 | 2.00 ± 0.00 |" in md
    assert "| StepTool | 3.00 ± 0.00 |" in md
    assert "| StepTool | 100 / 0 / 0 / 0 | 100 | 1.50 / 0.25 / 0.00 |" in md          # the diagnostics table

    fake_train.clear()                                            # a second invocation trains nothing
    assert main(tmp_path, "--sft-seeds", "0", "1", "--seeds", "0", "1") == record and fake_train == []


def test_under_faults_sft_has_a_row_per_fault_stream_and_the_fault_table_is_written(tmp_path, fake_train):
    record = main(tmp_path, "--fault-rate", "0.3", "--seeds", "0", "1", record="experiment-smoke-faults30.json")
    assert all(c[c.index("--fault-rate") + 1] == "0.3" for c in fake_train)
    assert [(r["method"], r["warm_start"], r["seed"]) for r in record["runs"]] == \
        [("SFT", 0, 0), ("SFT", 0, 1)] + [(m, 0, s) for m in ("PPO-final", "StepTool") for s in (0, 1)]
    md = (tmp_path / "runs" / "results.md").read_text()
    # each run against the SFT evaluation of its own fault stream: StepTool 75, 75 vs SFT 25, 25
    assert "| StepTool vs SFT | 2 | +50.0 | +50.0 +50.0 | 0 | 2/0 (0.5) |" in md
    assert "| StepTool | 2 | 30.0 | 25.0 | 50.0 |" in md and "| SFT | 2 | 30.0 | 25.0 | 50.0 |" in md


def test_stale_runs_are_refused_one_line_each_before_anything_runs_and_are_kept(tmp_path, fake_train, capsys):
    runs = tmp_path / "runs"
    good = parse_config(["--preset", "smoke", "--suite", "large", "--reward", "final", "--sft-seed", "0"])
    cases = {"ppo-final-ws0-seed0": fake_result(good, [1] * 4, SFT[0]),                          # fine
             "ppo-final-ws0-seed1": fake_result(good, [1] * 4, SFT[0]),                          # seed 0 in config
             "steptool-ws0-seed0": fake_result(good, [1] * 4, SFT[0], key="key-ws7"),          # and reward final
             "steptool-ws0-seed1": {k: v for k, v in fake_result(good, [1] * 4, SFT[0]).items() if k != "warm_start"}}
    for name, result in cases.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit) as e:
        main(tmp_path, "--seeds", "0", "1")
    assert e.value.code == 2 and fake_train == []
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == f"error: {runs / 'ppo-final-ws0-seed1'}: seed 0 vs 1 now"
    assert errors[1] == (f"error: {runs / 'steptool-ws0-seed0'}: warm start key-ws7, but the current code and flags "
                         f"give key-ws0; reward 'final' vs 'step' now")
    assert errors[2] == (f"error: {runs / 'steptool-ws0-seed1'}: made before runs recorded their warm start "
                         f"(results.json has no warm_start)")
    assert errors[3].startswith("error: (a stale run is never reused nor deleted") and len(errors) == 4
    assert all((runs / name / "results.json").exists() for name in cases)


def test_a_run_that_recorded_another_judge_or_reward_version_is_stale(monkeypatch):
    monkeypatch.setattr(tools, "JUDGE_VERSION", "j2", raising=False)
    monkeypatch.setattr(experiment.rewards, "REWARD_VERSION", "r1", raising=False)
    cfg = parse_config(["--preset", "smoke"])
    expected = experiment.flat(asdict(cfg))
    result = fake_result(cfg, [1] * 4, SFT[0])
    assert experiment.staleness(result, expected, "key-ws0", {"reward", "seed"}) is None     # nothing recorded
    result["judge_version"], result["provenance"]["reward_version"] = "j1", "r1"
    assert experiment.recorded_versions(result) == ("j1", "r1")
    assert experiment.staleness(result, expected, "key-ws0", {"reward"}) == "judge version j1, the current one is j2"
    result["judge_version"] = "j2"
    assert experiment.staleness(result, expected, "key-ws0", {"reward"}) is None


def test_a_finished_run_is_reused_unless_another_test_length_is_asked_for(tmp_path, monkeypatch):
    calls = []
    cfg = parse_config(["--preset", "smoke"])

    def fake_train(cmd, check):                        # train.py --resume: writes results.json for --n-test tasks
        calls.append(cmd)
        n = int(cmd[cmd.index("--n-test") + 1]) if "--n-test" in cmd else 4
        result = fake_result(cfg, [1] * 4, SFT[0]) | {"test_outcomes": {f"t{i}": 1 for i in range(n)}}
        (tmp_path / "results.json").write_text(json.dumps(result))

    monkeypatch.setattr(experiment.subprocess, "run", fake_train)
    r = {"dir": str(tmp_path), "args": ["--preset", "smoke"], "expected": experiment.flat(asdict(cfg)),
         "key": "key-ws0", "fields": {"reward"}}
    assert len(experiment.run(r)["test_outcomes"]) == 4 and len(calls) == 1
    experiment.run(r)                                                       # finished: reused
    experiment.run(r, n_test=4)                                             # finished on 4 tasks: reused
    assert len(calls) == 1
    assert len(experiment.run(r, n_test=9)["test_outcomes"]) == 9 and len(calls) == 2
    assert "--resume" in calls[1] and calls[1][-2:] == ["--n-test", "9"]
    assert experiment.record_file("smoke", 0.0, n_test=9) == "experiment-smoke-test9.json"
    assert experiment.record_file("p", 0.3) == "experiment-p-faults30.json"
    # --preset default is the smollm2 settings: its records carry (and merge under) that name, as issue 30 asks
    assert experiment.record_file("default", 0.0) == "experiment-smollm2.json"
    assert experiment.record_preset("default") == "smollm2" and experiment.record_preset("tiny") == "tiny"


def test_flag_fields_name_the_config_fields_a_flag_list_sets():
    assert experiment.flag_fields(["--reward", "step", "--contribution=reference", "--no-detach-critic", "0.5",
                                   "-1"]) == {"reward", "contribution", "detach_critic"}


def test_selected_runs_are_merged_into_the_record_and_a_record_of_another_warm_start_is_refused(tmp_path, fake_train,
                                                                                              capsys):
    main(tmp_path, "--methods", "PPO-final", "--seeds", "0")
    record = main(tmp_path, "--methods", "StepTool-ref", "--sft-seeds", "0", "--seeds", "0")
    assert [(r["method"], r["warm_start"], r["seed"]) for r in record["runs"]] == \
        [("SFT", 0, None), ("PPO-final", 0, 0), ("StepTool-ref", 0, 0)]
    assert "| StepTool-ref vs SFT | 1 | -25.0 |" in (tmp_path / "runs" / "results.md").read_text()   # 0% vs 25%
    path = tmp_path / "results" / "experiment-smoke.json"
    stale = json.loads(path.read_text())
    stale["runs"][1]["warm_start_key"] = "key-of-yesterday"          # as if the warm start's code had changed since
    path.write_text(json.dumps(stale))
    with pytest.raises(SystemExit):
        main(tmp_path, "--methods", "StepTool-ref", "--seeds", "0")
    assert capsys.readouterr().err.strip() == (f"error: {path}: PPO-final ws0 seed 0 stands on warm start "
                                               f"key-of-yesterday, not key-ws0; --replace-record writes this "
                                               f"invocation's runs alone")
    path.write_text(json.dumps({k: v for k, v in stale.items() if k != "judge"}))   # a record of the old format
    with pytest.raises(SystemExit):
        main(tmp_path, "--methods", "StepTool-ref", "--seeds", "0")
    assert "its judge is not this experiment's (absent)" in capsys.readouterr().err
    record = main(tmp_path, "--methods", "StepTool-ref", "--seeds", "0", "--replace-record")
    assert [r["method"] for r in record["runs"]] == ["SFT", "StepTool-ref"]
    assert len(fake_train) == 2                                       # every later invocation reused the runs


def test_sft_alone_evaluates_each_warm_start_once_with_no_rl(tmp_path, fake_train):
    record = main(tmp_path, "--methods", "SFT", "--sft-seeds", "0", "1", "--seeds", "0", "1")
    assert [c[c.index("--out") + 1].rsplit("/", 1)[1] for c in fake_train] == ["sft-ws0-seed0", "sft-ws1-seed0"]
    assert all(c[c.index("--iters") + 1] == "0" for c in fake_train)
    assert [(r["method"], r["warm_start"], r["seed"]) for r in record["runs"]] == [("SFT", 0, None), ("SFT", 1, None)]


def test_rl_runs_skip_the_warm_starts_test_evaluation_when_the_record_holds_its_sft_row(tmp_path, fake_train, capsys):
    test4 = dict(record="experiment-smoke-test4.json")                # the fake's test list: 4 tasks
    main(tmp_path, "--methods", "SFT", "--sft-seeds", "0", "--n-test", "4", **test4)   # the record: ws0's SFT row
    path = tmp_path / "results" / test4["record"]
    held = json.loads(path.read_text())
    held["runs"][0]["commit"] = "evaluated-yesterday"
    path.write_text(json.dumps(held))
    record = main(tmp_path, "--methods", "StepTool", "--sft-seeds", "0", "1", "--seeds", "0", "--n-test", "4", **test4)
    skipped = {c[c.index("--out") + 1].rsplit("/", 1)[1]: "--no-sft-test-eval" in c for c in fake_train[1:]}
    assert skipped == {"steptool-ws0-seed0": True, "steptool-ws1-seed0": False}   # ws1 has no row in the record
    assert [(r["method"], r["warm_start"], r["commit"]) for r in record["runs"]] == \
        [("SFT", 0, "evaluated-yesterday"), ("SFT", 1, "c0ffee"), ("StepTool", 0, "c0ffee"), ("StepTool", 1, "c0ffee")]
    assert "| StepTool vs SFT | 2 |" in (tmp_path / "runs" / "results.md").read_text()    # each run vs its own row
    # Written alone (--replace-record), the run that skipped its warm start's evaluation has no SFT row to pair with
    with pytest.raises(SystemExit):
        main(tmp_path, "--methods", "StepTool", "--sft-seeds", "0", "--seeds", "0", "--n-test", "4", "--replace-record",
             **test4)
    assert capsys.readouterr().err.startswith("error: no SFT row for warm start(s) [0]: their runs skipped")
    assert len(fake_train) == 3                                        # nothing was run again
    assert experiment.check_sft_rows(record) is None


def test_ppo_calls_passes_its_bonus_and_refuses_to_run_without_one(tmp_path, fake_train, capsys, monkeypatch):
    assert experiment.method_flags("PPO-calls", 0.25) == ["--reward", "calls", "--call-bonus", "0.25"]
    assert experiment.method_flags("StepTool-ref", None) == ["--reward", "step", "--contribution", "reference"]
    main(tmp_path, "--methods", "PPO-calls", "--seeds", "0")           # the measured constant by default
    cmd = fake_train[0]
    assert cmd[cmd.index("--call-bonus") + 1] == str(experiment.PPO_CALLS_BONUS) == "0.3448"
    fake_train.clear()
    monkeypatch.setattr(experiment, "PPO_CALLS_BONUS", None)             # before it was measured
    with pytest.raises(SystemExit):
        main(tmp_path / "unmeasured", "--methods", "PPO-calls", "--seeds", "0")
    assert "PPO-calls needs its bonus C" in capsys.readouterr().err and fake_train == []


def test_the_call_bonus_is_the_mean_over_logged_iterations_of_the_reward_per_call(tmp_path, capsys):
    lines = [{"iter": 0, "mean_step_reward": 0.5}, {"iter": 1, "mean_step_reward": 0.2},
             {"iter": 1, "mean_step_reward": 0.4},                     # iteration 1 again after a resume: the last
             {"iter": 2, "return": 1.0}]                               # not logged: not counted
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert experiment.measure_call_bonus(str(tmp_path)) == pytest.approx(0.45)     # (0.5 + 0.4) / 2
    experiment.main(["--measure-call-bonus", str(tmp_path), str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[-1] == "C = 0.4500 (mean over 2 run(s))"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iter": 0, "return": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no iteration logs mean_step_reward"):
        experiment.measure_call_bonus(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Re-judging a record


def test_rejudging_recomputes_outcomes_from_the_answers_and_counts_the_changes(tmp_path, capsys):
    tasks = {t.id: t for t in tools.make_suite("large").tasks("test", 3)}
    weather = tasks["test-00000"]                                     # facts: one temperature
    hedge = f"It is {weather.facts[0]} C, or maybe {weather.facts[0] + 10} C, in that city."
    record = {"preset": "smoke", "suite": "large", "judge": "old", "reward": None, "test_task_ids": list(tasks),
              "runs": [{"method": "SFT", "warm_start": 0, "seed": None,
                        "answers": {"test-00000": weather.answer, "test-00001": None, "test-00002": "no idea"},
                        "outcomes": {"test-00000": 0, "test-00001": 0, "test-00002": 0}},
                       {"method": "StepTool", "warm_start": 0, "seed": 1,
                        "answers": {"test-00000": hedge, "test-00001": "", "test-00002": tasks["test-00002"].answer},
                        "outcomes": {"test-00000": 1, "test-00001": 0, "test-00002": 1}}]}
    path = tmp_path / "experiment-smoke.json"
    path.write_text(json.dumps(record))

    # The current judge refuses a hedge; the record was judged by an older one that credited it
    assert tools.check_answer(hedge, weather) == 0.0
    experiment.main(["--rejudge", str(path)])
    out = capsys.readouterr().out.splitlines()
    # SFT: the right answer was stored as 0 (an older judge's verdict) -> 1; no answer and "no idea" stay 0
    assert out[0] == "SFT ws0: 1 of 3 outcomes changed (1 up, 0 down)"
    assert out[1] == "StepTool ws0 seed 1: 1 of 3 outcomes changed (0 up, 1 down)"
    rejudged = json.loads(path.read_text())
    assert rejudged["judge"] == tools.JUDGE_VERSION and path.read_text().startswith('{"preset":"smoke",')
    assert rejudged["runs"][0]["outcomes"] == {"test-00000": 1.0, "test-00001": 0.0, "test-00002": 0.0}
    assert rejudged["runs"][1]["outcomes"] == {"test-00000": 0.0, "test-00001": 0.0, "test-00002": 1.0}
    assert rejudged["runs"][1]["answers"] == record["runs"][1]["answers"]
    experiment.main(["--rejudge", str(path)])                         # once more: nothing changes
    assert capsys.readouterr().out.count("0 of 3 outcomes changed") == 2


# ----------------------------------------------------------------------------------------------------------------------
# Reproducing one run


def test_a_reproduction_is_compared_task_by_task_with_the_committed_run():
    committed = {"a": 1, "b": 1, "c": 0, "d": 0.5, "e": 1}
    reproduced = {"a": 1, "b": 0, "c": 0, "d": 0, "e": 1, "extra": 1}
    s = experiment.compare_reproduction(committed, reproduced)
    # same outcome on a, c, e (d: 0.5 vs 0 differs, though neither is solved); pass 3/5 vs 2/5; only b differs in
    # Solved: McNemar b = 0 (only reproduced), c = 1 (only committed), p = 1
    assert (s["tasks"], s["agreement"], s["pass_committed"], s["pass_reproduced"]) == (5, 0.6, 0.6, 0.4)
    assert (s["diff"], s["b"], s["c"], s["mcnemar_p"]) == (pytest.approx(-0.2), 0, 1, 1.0)
    assert s["ci"][0] < -0.2 < s["ci"][1] and s["ci"][1] <= 0.0        # differences 0 or -1: never above 0
    with pytest.raises(ValueError, match="no outcome for 1 committed task"):
        experiment.compare_reproduction(committed, {"a": 1, "b": 1, "c": 0, "d": 0})


def test_the_reproduce_command_retrains_one_run_from_nothing_and_writes_the_comparison(tmp_path, fake_train, capsys):
    record = main(tmp_path, "--methods", "StepTool", "--sft-seeds", "0", "1", "--seeds", "0", "1")
    path, out = str(tmp_path / "results" / "experiment-smoke.json"), tmp_path / "repro"
    fake_train.clear()
    experiment.main(["--reproduce", path, "--method", "SFT", "--warm-start", "1", "--out", str(out)])
    cmd = fake_train[0]
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert (flag("--out"), flag("--cache-dir"), flag("--iters"), flag("--sft-seed")) == \
        (str(out / "run"), str(out / "cache"), "0", "1")              # a fresh cache: no warm start reused
    assert (flag("--preset"), flag("--n-test"), "--resume" in cmd) == ("smoke", "4", True)
    s = json.loads((out / "reproduction.json").read_text())
    assert (s["method"], s["warm_start"], s["seed"], s["agreement"], s["mcnemar_p"]) == ("SFT", 1, None, 1.0, 1.0)
    code = ("commit", "dirty", "warm_start_key", "warm_start_commit")
    assert s["committed"] == {k: record["runs"][1][k] for k in code}
    assert s["reproduced"]["commit"] == "c0ffee" and s["outcomes"] == dict(zip(IDS, SFT[1]))
    assert capsys.readouterr().out.splitlines()[-2].startswith("SFT ws1: the same outcome on 100.0% of 4 tasks")

    experiment.main(["--reproduce", path, "--method", "StepTool", "--warm-start", "0", "--seed", "1",
                     "--out", str(tmp_path / "repro2")])
    assert fake_train[1][fake_train[1].index("--reward") + 1] == "step" and "--iters" not in fake_train[1]


def test_python_train_py_s_own_results_json_can_be_reproduced_and_old_records_are_refused(tmp_path, fake_train,
                                                                                          capsys):
    # The README's table comes from `python train.py`, not from experiment.py: its results.json is a record of two
    # runs, SFT (warm start --sft-seed) and the RL method (seed --seed), and --reproduce retrains either.
    cfg = parse_config(["--preset", "smoke", "--suite", "large", "--sft-seed", "1", "--seed", "3"])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_result(cfg, [1, 1, 0, 0], SFT[1])))
    record = experiment.as_record(json.loads(path.read_text()), str(path))
    assert [(r["method"], r["warm_start"], r["seed"]) for r in record["runs"]] == [("SFT", 1, None),
                                                                                  ("StepTool", 1, 3)]
    experiment.main(["--reproduce", str(path), "--method", "SFT", "--warm-start", "1", "--out", str(tmp_path / "r")])
    cmd = fake_train[0]
    assert (cmd[cmd.index("--sft-seed") + 1], cmd[cmd.index("--iters") + 1]) == ("1", "0")
    assert json.loads((tmp_path / "r" / "reproduction.json").read_text())["agreement"] == 1.0
    old = tmp_path / "old.json"                       # runs without a warm start: the record format before 0331072
    old.write_text(json.dumps({"preset": "smollm2", "test_task_ids": IDS,
                               "runs": [{"method": "SFT", "seed": 0, "outcomes": {}}]}))
    with pytest.raises(SystemExit):
        experiment.main(["--reproduce", str(old), "--method", "SFT", "--warm-start", "0"])
    assert "an old-format record" in capsys.readouterr().err
    assert experiment.method_of(asdict(parse_config(["--contribution", "reference"]))) == "StepTool-ref"
    assert experiment.method_of(asdict(parse_config(["--reward", "final"]))) == "PPO-final"


@pytest.mark.parametrize("argv, message", [
    (["--reproduce", "R.json", "--warm-start", "0"], "--reproduce needs --method and --warm-start"),
    (["--seeds", "0", "--seed", "1"], "--method, --warm-start and --seed go with --reproduce"),
    (["--expert-logprobs", "M", "--warm-start", "2"], "--method, --warm-start and --seed go with --reproduce"),
])
def test_reproduce_arguments_are_checked_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        experiment.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_expert_logprobs_of_a_warm_starts_own_demonstrations_name_it_with_warm_start():
    args, _ = experiment.parse_args(["--expert-logprobs", "M", "--split", "sft", "--warm-start", "2"])
    assert (args.split, args.warm_start) == ("sft", 2)


def test_a_run_to_reproduce_must_be_in_the_record_and_unambiguous():
    record = {"runs": [{"method": "SFT", "warm_start": 0, "seed": None}, {"method": "StepTool", "warm_start": 0,
                                                                          "seed": 0},
                       {"method": "StepTool", "warm_start": 0, "seed": 1}]}
    assert experiment.find_run(record, "SFT", 0, None)["method"] == "SFT"
    assert experiment.find_run(record, "StepTool", 0, 1)["seed"] == 1
    with pytest.raises(ValueError, match=r"2 StepTool run\(s\) of warm start 0 \(seeds: 0, 1\); give --seed"):
        experiment.find_run(record, "StepTool", 0, None)
    with pytest.raises(ValueError, match=r"0 SFT run\(s\) of warm start 2 \(seeds: none\)"):
        experiment.find_run(record, "SFT", 2, None)


# ----------------------------------------------------------------------------------------------------------------------
# Tables from results.json, the task fallback, the size of a full record


def test_the_fault_table_averages_each_method_over_runs_and_takes_sft_per_warm_start_and_seed():
    def result(sft, rl):
        keys = ("fault_rate", "retry_after_fault", "pass_rate")
        return {"sft_test": {"all": dict(zip(keys, sft))}, "test": {"all": dict(zip(keys, rl))}}
    table = experiment.fault_table({("StepTool", 0, 0): result((0.3, 0.0, 0.4), (0.3, 0.5, 0.5)),
                                    ("StepTool", 0, 1): result((0.2, 0.1, 0.2), (0.4, 0.7, 0.6)),
                                    ("PPO-final", 0, 0): result((0.3, 0.0, 0.4), (0.1, 0.0, 0.3))})
    assert table.splitlines()[2:] == ["| SFT | 2 | 25.0 | 5.0 | 30.0 |", "| StepTool | 2 | 35.0 | 60.0 | 55.0 |",
                                      "| PPO-final | 1 | 10.0 | 0.0 | 30.0 |"]


def test_the_diagnostics_count_stop_reasons_changed_actions_and_the_last_iteration_per_method():
    cfg = parse_config(["--preset", "smoke"])
    sft = {i: {"actions": a, "stop": s} for i, (a, s) in zip(IDS, [(["a", "F"], "finish"), (["b"], "finish"),
                                                                   (["c"] * 3, "max_steps"), (["d"], "give_up")])}
    rl = {i: {"actions": a, "stop": s} for i, (a, s) in zip(IDS, [(["a", "F"], "finish"), (["b", "x"], "finish"),
                                                                  (["c"] * 5, "token_budget"), (["d"], "give_up")])}
    result = fake_result(cfg, [1, 0, 1, 0], SFT[0]) | {"sft_test_transcripts": sft, "test_transcripts": rl}
    result["history"] = [{"iter": 0, "return": 0.5, "explained_variance": 0.25, "invalid": 0.1}]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in
            experiment.diagnostics_table({("StepTool", 0, 0): result}).splitlines()[2:]}
    assert rows["SFT"][0] == "50 / 25 / 25 / 0" and rows["StepTool"][0] == "50 / 25 / 0 / 25"
    assert rows["SFT"][1] == "0" and rows["StepTool"][1] == "50"               # tasks 1 and 2 changed
    assert rows["StepTool"][2].rstrip(" |") == "0.50 / 0.25 / 0.10" and rows["SFT"][2].rstrip(" |") == "-"


def test_steps_and_types_come_from_the_record_alone():
    from stats import steps_table, type_table
    calls = lambda n: [["get_city", {}]] * n  # noqa: E731
    record = {"test_task_ids": ["x", "y", "z", "w"], "test_task_groups": {"x": "G1", "y": "G1", "z": "G3", "w": "G2"},
              "test_task_kinds": {"x": "weather", "y": "capital", "z": "company_price_local", "w": "capital_weather"},
              "runs": [{"method": "M", "outcomes": {"x": 1, "y": 0, "z": 1, "w": 1},
                        "calls": {"x": calls(1), "y": calls(3), "z": calls(4), "w": calls(0)},
                        "stops": {"x": "finish", "y": "max_steps", "z": "finish", "w": "give_up"}},
                       {"method": "M", "outcomes": {"x": 0, "y": 0, "z": 1, "w": 0},
                        "calls": {"x": calls(3), "y": calls(1), "z": calls(2), "w": calls(2)},
                        "stops": {"x": "finish", "y": "give_up", "z": "token_budget", "w": "finish"}}]}
    # steps: run 1 x 2, y 3, z 5, w 1; run 2 x 4, y 2, z 2, w 3 -> G1 2.5 and 3 (sd 0.5/√2), G2 1 and 3, G3 5 and 2,
    # all 11/4 both
    assert steps_table(record).splitlines()[2] == "| M | 2.75 ± 0.35 | 2.00 ± 1.41 | 3.50 ± 2.12 | 2.75 ± 0.00 |"
    assert type_table(record).splitlines()[2:] == ["| weather | G1 | 1 | 50.0 ± 70.7 |",
                                                   "| capital | G1 | 1 | 0.0 ± 0.0 |",
                                                   "| company_price_local | G3 | 1 | 100.0 ± 0.0 |",
                                                   "| capital_weather | G2 | 1 | 50.0 ± 70.7 |"]


def test_without_the_suite_each_task_is_its_own_item_and_groups_come_from_results_json(capsys):
    info = experiment.task_info("large", ["not-a-test-task"], {"not-a-test-task": 2})
    assert info == {"test_task_groups": {"not-a-test-task": "G2"}, "test_task_kinds": {"not-a-test-task": None},
                    "test_task_items": {"not-a-test-task": "not-a-test-task"}}
    assert "every task as its own item" in capsys.readouterr().err
    tasks = tools.make_suite("tiny").tasks("test", 30, seed=0)
    info = experiment.task_info("tiny", [t.id for t in tasks], {})
    assert info["test_task_groups"] == {t.id: f"G{t.group}" for t in tasks}
    assert info["test_task_kinds"] == {t.id: t.kind for t in tasks}


def test_an_item_is_the_task_type_and_its_entities():
    task = tools.make_suite("large").tasks("test", 3)[2]                 # a G3 task about a company and a currency
    if getattr(task, "entities", None) is None:
        pytest.skip("tools.Task has no entities yet: every task is its own item")
    assert experiment.item_of(task) == "|".join([task.kind, *task.entities]) and len(task.entities) == 2


def test_a_full_record_of_six_methods_three_warm_starts_two_seeds_and_540_tasks_stays_under_10_mb():
    """Built from the expert's answers and reference calls on the whole large test list: 5 RL methods x 3 warm starts x
    2 seeds + 3 SFT rows = 33 runs; 36 rows (SFT per seed, as under faults) are an upper bound."""
    tasks = tools.make_suite("large").tasks("test")
    results = {}
    for i, (method, w, s) in enumerate([(m, w, s) for m in experiment.METHODS if m != "SFT" for w in range(3)
                                        for s in range(2)]):
        tr = {t.id: {"actions": [], "calls": [[tool, args] for tool, args in t.reference_chain],
                     "answer": t.answer, "stop": "finish"} for t in tasks}
        out, sft = {t.id: (j + i) % 2 for j, t in enumerate(tasks)}, {t.id: j % 2 for j, t in enumerate(tasks)}
        results[method, w, s] = {"config": {"fault_rate": 0.0}, "test_outcomes": out, "sft_test_outcomes": sft,
                                 "test_transcripts": tr, "sft_test_transcripts": tr,
                                 "provenance": {"commit": "f" * 40, "dirty": False},
                                 "warm_start": {"key": "a" * 12, "commit": "f" * 40}}
    record = experiment.experiment_record("default", "large", results)
    assert record["preset"] == "smollm2"                        # the default's settings carry the smollm2 name
    assert len(record["runs"]) == 33 and len(record["test_task_ids"]) == 540
    size = len(json.dumps(record, separators=(",", ":")))
    per_run = size / 33
    print(f"full record: {size / 1e6:.2f} MB for 33 runs ({per_run / 1e3:.0f} kB per run); 36 runs: "
          f"~{36 * per_run / 1e6:.2f} MB")
    assert 36 * per_run < 10e6


@pytest.mark.slow
def test_a_smoke_experiment_resumes_and_its_sft_row_reproduces_from_nothing(tmp_path, monkeypatch, capsys):
    """The real train.py (smoke preset, 1 iteration): the warm start key experiment.py expects is the one train.py
    records, a second invocation trains nothing, and the SFT row retrained with a fresh cache gives the same
    outcomes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--preset", "smoke", "--methods", "StepTool", "--seeds", "0", "--iters", "1", "--cache-dir",
            str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    experiment.main(argv)
    path = tmp_path / "results" / "experiment-smoke.json"
    record = json.loads(path.read_text())
    assert [(r["method"], r["seed"]) for r in record["runs"]] == [("SFT", None), ("StepTool", 0)]
    assert record["train_flags"] == ["--iters", "1", "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    experiment.main(argv)                                            # finished and not stale: reused
    assert "$ " not in capsys.readouterr().out and json.loads(path.read_text()) == record
    s = experiment.reproduce(str(path), "SFT", 0, None, str(tmp_path / "repro"), [], None)
    assert s["agreement"] == 1.0 and s["reproduced"]["warm_start_key"] == record["runs"][0]["warm_start_key"]
    assert os.path.exists(tmp_path / "repro" / "cache") and os.path.exists(tmp_path / "repro" / "reproduction.json")
