"""Greedy evaluation of a model on a task list: the SFT row (cached next to the warm start), validation, the test
table, --eval-only.

Who calls it: train.py (before, during and after RL), experiment.py through train.py's results.json.
Why a module of its own: how a model is evaluated (sharded over ranks, the same fault stream for every model, the
per-task outcomes paired statistics compare) is not the RL loop; train.py reads as that loop without it.

Choices:
 1. Greedy decoding, one fault stream restarted for every evaluation (fault_seed): SFT and the trained model are
    compared on the same tasks and the same faults.
 2. Every rank evaluates its share of the tasks and gets the metrics of all of them (distributed.gather).
 3. Pass rate counts Solved only (IsSolved == 1); per-task outcomes and transcripts go into results.json.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import checkpoint
import cpu_speed
import distributed
from config import Config, uses_lora
from rollout import ModelPolicy, episode_metrics, evaluate, results_table
from stats import mcnemar_exact, paired_counts
from tools import load_toolbench


def rollout_policy(cfg: Config):
    """The rollouts' policy class: rollout.ModelPolicy, or cpu_speed's (the shared prompt once, packed weights)."""
    return cpu_speed.ModelPolicy if cfg.cpu_speed else ModelPolicy


def evaluate_split(cfg: Config, model, tokenizer, env, tasks, d, progress=False):
    """Greedy evaluation, each rank on its share of the tasks; every rank gets the metrics of all of them.
    -> (episode_metrics, episodes)"""
    with distributed.gathered(model, d):
        # Every evaluation restarts one fault stream (training rollouts draw from others): SFT and the trained
        # model are compared on the same faults.
        _, episodes = evaluate(model, tokenizer, env, distributed.shard(tasks, d), cfg.rollout, cfg.rollout_batch,
                               progress=progress and d.main, fault_seed=-1 - cfg.seed, policy_class=rollout_policy(cfg))
    episodes = distributed.gather(episodes, d)
    return episode_metrics(episodes), episodes


def evaluate_warm_start(cfg: Config, model, tokenizer, env, tasks, d, warm_start_dir: str):
    """The SFT row: (metrics, {task id: IsSolved}, transcripts) of the warm start on `tasks`. Every method and seed
    of an experiment starts from the same cached warm start, so its evaluation is cached next to it (greedy decoding:
    the result depends only on the model, the tasks and the rollout settings, and the fault stream if faults are on)."""
    # The warm start's directory is keyed by the code that trains it (sft.WARM_START_CODE: the model, rollouts, tools
    # and the judge), so a change there gives a new directory; what evaluates it (this file) is keyed here.
    key = json.dumps({"tasks": [t.id for t in tasks], "rollout": asdict(cfg.rollout), "batch": cfg.rollout_batch,
                      "code": checkpoint.source_hash(["evaluation.py", "rollout.py", "tools"]),
                      "cpu_speed": cfg.cpu_speed,
                      "world": d.world, "fault_rate": cfg.fault_rate, "fault_seed": cfg.seed if cfg.fault_rate else 0,
                      "lora": [uses_lora(cfg), cfg.lora_r, cfg.lora_alpha, cfg.dtype]}, sort_keys=True)
    path = warm_start_dir and os.path.join(warm_start_dir, f"eval-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json")
    if path and os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        return cached["metrics"], cached["outcomes"], cached["transcripts"]
    metrics, episodes = evaluate_split(cfg, model, tokenizer, env, tasks, d, progress=True)
    outcomes, transcripts = outcomes_of(episodes), transcripts_of(episodes)
    if path and d.main:
        with open(path + ".tmp", "w") as f:
            json.dump({"metrics": metrics, "outcomes": outcomes, "transcripts": transcripts}, f)
        os.replace(path + ".tmp", path)
    return metrics, outcomes, transcripts


def outcomes_of(episodes) -> dict:
    """{task id: IsSolved} (1, 0.5 or 0): what experiment.py's paired statistics compare."""
    return {ep.task.id: ep.solved for ep in episodes}


def transcripts_of(episodes) -> dict:
    """{task id: {"actions": [the text of each action], "calls": [[tool, args], ...] (Finish excluded), "answer": the
    final answer or None, "stop": stop reason}}: enough to re-judge every answer with another judge, and to tell
    whether training changed what the greedy policy does and how its episodes end."""
    return {ep.task.id: {"actions": [s.action_text for s in ep.steps],
                         "calls": [[s.tool, s.args] for s in ep.steps if s.tool != "Finish"],
                         "answer": ep.final_answer, "stop": ep.stop_reason} for ep in episodes}


def evaluate_only(cfg: Config, model, tokenizer, env, test_tasks, d, say) -> dict:
    """--eval-only: the test table of the model as it is, on the test split or on --tasks toolbench:PATH.json
    (a ToolBench query file through the mocked-API import; only tasks with known facts can be judged)."""
    if cfg.tasks:
        kind, _, path = cfg.tasks.partition(":")
        if kind != "toolbench" or not path:
            raise ValueError(f"--tasks must be toolbench:PATH.json (got {cfg.tasks!r})")
        env, test_tasks = load_toolbench(path)
    metrics, episodes = evaluate_split(cfg, model, tokenizer, env, test_tasks, d, progress=True)
    judged = [ep for ep in episodes if ep.task.facts]        # tasks whose answer can be checked
    passed = sum(ep.solved == 1.0 for ep in judged) / len(judged) if judged else None
    say(results_table({"model": metrics}))
    say(f"pass rate {passed if passed is None else round(passed, 3)} on the {len(judged)} tasks that can be "
        f"judged ({len(episodes) - len(judged)} cannot); recall of relevant APIs "
        f"{metrics['all']['recall']:.3f} on all {len(episodes)}; {metrics['all']['fault_rate']:.1%} of calls "
        f"hit a fault, {metrics['all']['retry_after_fault']:.1%} of those were retried")
    return {"test": metrics, "judged_pass_rate": passed, "judged": len(judged),
            "unjudged": len(episodes) - len(judged)}


def paired_table(name: str, sft_outcomes: dict, outcomes: dict, groups: dict) -> str:
    """SFT vs the trained policy on the same test tasks, per group and overall: pass rates (Solved fraction), the
    tasks the policy gained and lost against SFT (solved by one only), and the exact two-sided McNemar p of those
    counts (under "no difference" each discordant task is a fair coin)."""
    names = sorted(set(groups.values())) + ["all"]
    cols = {g: [t for t in outcomes if g == "all" or groups[t] == g] for g in names}
    rate = lambda o, ids: sum(o[t] == 1 for t in ids) / max(len(ids), 1)  # noqa: E731
    counts = {g: paired_counts({t: outcomes[t] for t in ids}, {t: sft_outcomes[t] for t in ids})
              for g, ids in cols.items()}
    rows = [("tasks", [str(len(cols[g])) for g in names]),
            ("SFT pass", [f"{rate(sft_outcomes, cols[g]):.3f}" for g in names]),
            (f"{name} pass", [f"{rate(outcomes, cols[g]):.3f}" for g in names]),
            (f"gained / lost by {name}", [f"{counts[g][0]} / {counts[g][1]}" for g in names]),
            ("McNemar p (exact)", [f"{mcnemar_exact(*counts[g]):.3g}" for g in names])]
    head = "| | " + " | ".join(f"G{g}" if g != "all" else g for g in names) + " |"
    return "\n".join([head, "|---" * (len(names) + 1) + "|"] + [f"| {r} | " + " | ".join(c) + " |" for r, c in rows])
