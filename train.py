"""StepTool end to end: `python train.py` warm-starts a model by SFT, trains it with step-grained PPO against the
mocked tools, and prints SFT vs StepTool on the test split.

    config -> tasks and tools -> warm start (SFT, cached) or --model -> policy + critic + reference
    -> loop { rollout (or --offline-data) -> rewards -> PPO update -> log -> validate -> checkpoint } -> test table

main() reads as that line; the functions above it are its parts, in the order it calls them. The configuration
(dataclasses, presets, flags) is config.py; `train.parse_config` and `train.Config` are re-exported from it. The CPU
speed paths (cpu_speed.py) are applied from here, behind one switch (--cpu-speed): to the model (`cpu_speed.apply`),
the rollouts (`cpu_speed.ModelPolicy`), the update (`cpu_speed.SharedPromptMicrobatches`) and the allocator.
Who calls it: people (`python train.py`, `--preset smoke`, `--reward final` for the baseline), experiment.py,
torchrun, and tests (`main(cfg)` in-process).

Deviations from the paper (numbered; the paper's own values are in ../shared/PAPER.md):
 1. Online: rollouts are sampled from the current policy every iteration (the authors trained offline on fixed,
    GPT-4-annotated trajectories; `--offline-data` does that).
 2. The default model is SmolLM2-135M-Instruct (fetched and imported on first use), so the whole run fits a CPU;
    `--model PATH` takes another Llama/Mistral/Qwen checkpoint, SFT-warm-started through LoRA (sft.py), then RL with
    fresh adapters, LoRA on by default as in the paper; `--preset tiny` trains a 2-layer model from scratch.
 3. Hyper-parameters are scaled to the model (lr, batch sizes, KL coefficient); γ, λ and the ratio clip are the
    paper's; the value loss is not clipped by default and actor and critic are clipped on separate gradient norms
    (ppo.py contract 2, README "Choices that differ").
 4. The value head has a learning rate of its own (--value-lr, 50x the policy's): it starts at zero, and at the
    policy's rate it never learned within a run (the authors' TRL setup shares one rate).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import cpu_speed
import distributed
from batching import Microbatches, collate, predictors, token_logprobs
from config import Config, parse_config, resolve_dtype, run_plan, uses_lora  # noqa: F401 (parse_config re-exported: train.parse_config)
from evaluation import (evaluate_only, evaluate_split, evaluate_warm_start, outcomes_of, paired_table,
                        rollout_policy, transcripts_of)
from gguf_import import resolve_model
from hf import load_pretrained, save_pretrained, strip_prefix
from model import PolicyWithValue, ValueHead, add_lora, lora_disabled, store_frozen_weights_in
from ppo import ppo_update
from rewards import REWARD_VERSION, REWARDS
from rollout import episode_metrics, results_table, rollout, show_episode
from sft import warm_start, warm_start_provenance
from tools import JUDGE_VERSION, FaultConfig, make_suite


# ----------------------------------------------------------------------------------------------------------------------
# Logging


class Logger:
    def __init__(self, out: str):
        self.path = os.path.join(out, "metrics.jsonl")

    def __call__(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def resident_mb() -> float | None:
    """Current resident memory (Linux /proc), for the soak check; None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# The parts of main(), in the order it calls them


def load_model(cfg: Config, suite, d, device, say):
    """-> (model, tokenizer): the SFT warm start (sft.py, cached), or --model as it is (--eval-only, --sft-tasks 0,
    --offline-data); then LoRA adapters for a pretrained model. Weights stay float32 and --dtype picks autocast, except
    a LoRA model's frozen base, stored in --dtype."""
    if not d.main:                        # rank 0 imports / trains and caches while the others wait; then they load
        distributed.barrier(d)
    model_dir = resolve_model(cfg.model, cfg.cache_dir, log=say) if cfg.model else ""
    warm_start_dir = ""
    if model_dir and (cfg.eval_only or cfg.sft_tasks == 0 or cfg.offline_data):
        model, tokenizer = load_pretrained(model_dir, device=device)
    else:
        model, tokenizer, warm_start_dir = warm_start(cfg, suite, model_dir, device, log=say)
    if d.main:
        distributed.barrier(d)
    model.checkpoint_layers = cfg.checkpoint_layers
    if uses_lora(cfg):
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=cfg.seed)
        if cfg.dtype != "float32":        # frozen base in the autocast dtype; adapters and optimizer stay float32
            store_frozen_weights_in(model, getattr(torch, cfg.dtype))
    if cfg.cpu_speed:                     # the CPU speed paths, applied to the plain model (after LoRA)
        cpu_speed.apply(model)
    return model, tokenizer, warm_start_dir


def actor_params(policy) -> dict:
    """The policy's trainable parameters by name (LoRA adapters, or the whole model), the critic excluded."""
    return {n: p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head.")}


def build_policy(cfg: Config, model, d, device, say):
    """Policy + critic (one module, one forward), the reference policy and AdamW with one group for the actor and one
    for the critic; a resumed run's weights go in before sharding. -> policy, trained (what the update steps: policy,
    DDP(policy), or policy sharded in place by FSDP), reference, optimizer, history, start iteration."""
    critic_free = cfg.advantages.advantage == "step-group"        # no value head is created, trained or evaluated
    value_head = None if critic_free else ValueHead(model.config.hidden_size).to(device)
    policy = PolicyWithValue(model, value_head, detach_critic=cfg.detach_critic)
    # LoRA: the reference is the model with its adapters off (None, no second copy in memory); else a frozen copy
    reference = None if uses_lora(cfg) else copy.deepcopy(model).eval().requires_grad_(False)
    history, start, state, resume_from = [], 0, None, cfg.resume and checkpoint.latest(cfg.out)
    if resume_from:
        state = checkpoint.load_state(resume_from, actor_params(policy), value_head)
        history, start = state["metrics"], state["iteration"] + 1
    trained = distributed.wrap(policy, d, device)
    if reference is not None:
        distributed.shard_reference(reference, d)
    critic = [p for n, p in policy.named_parameters() if p.requires_grad and n.startswith("value_head.")]
    groups = [{"params": list(actor_params(policy).values()), "lr": cfg.lr}]
    groups += [{"params": critic, "lr": cfg.value_lr}] if critic else []
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    if resume_from:
        checkpoint.load_optimizer(resume_from, optimizer, state, policy)
        say(f"resumed from {resume_from} at iteration {start}")
    return policy, trained, reference, optimizer, history, start


def reference_logprobs(model, reference, temperature, input_ids, attention_mask, targets=None):
    """log π_ref (B, T) at the sampling temperature: the policy with its adapters off (reference None, LoRA), or a
    frozen copy of the start."""
    logits_at = None if targets is None else predictors(targets)
    with lora_disabled(model) if reference is None else nullcontext():
        logits = (model if reference is None else reference)(input_ids, attention_mask, logits_to_keep=logits_at)
    return token_logprobs(logits, input_ids, targets=targets, temperature=temperature)  # (B, T)


def rollout_batch(cfg: Config, model, tokenizer, env, tasks, generator, d, it) -> list:
    """This rank's episodes of an iteration, sampled from the current policy, --rollout-batch at a time."""
    episodes = []
    with distributed.gathered(model, d):
        for i in tqdm(range(0, len(tasks), cfg.rollout_batch), desc=f"iter {it} rollout", leave=False,
                      disable=not d.main):
            policy = rollout_policy(cfg)(model, tokenizer, cfg.rollout, generator)
            episodes += rollout(policy, tasks[i:i + cfg.rollout_batch], env, tokenizer, cfg.rollout)
    return episodes


def save(cfg: Config, policy, tokenizer, optimizer, history, d, iteration=None):
    """A checkpoint of `iteration` (checkpoint.py), or with None the final model in --out/final. With FSDP every rank
    gathers the full tensors; rank 0 writes."""
    full = distributed.full_state(policy, optimizer, d) if d.fsdp and d.world > 1 else None
    if not d.main:
        return
    if iteration is None:
        save_pretrained(policy.model, tokenizer, os.path.join(cfg.out, "final"),
                        state=full and strip_prefix(full[0], "model."))
    else:
        checkpoint.save(cfg.out, iteration, policy.model, tokenizer, policy.value_head, optimizer, asdict(cfg), history,
                        actor_params(policy), cfg.keep_checkpoints, full=full)




def start_run(cfg: Config, d, say):
    """Check the run's shape, seed everything, print the resolved config and save it with the run. -> the logger."""
    if cfg.fsdp and d.world == 1:
        say("note: --fsdp shards over torchrun processes; with one process the model is not sharded")
    if cfg.episodes_per_iter % d.world:
        raise ValueError(f"--episodes-per-iter {cfg.episodes_per_iter} must divide evenly over {d.world} ranks")
    cfg.dtype = resolve_dtype(cfg.dtype, cfg.device)      # a Config() built in code, not by parse_config
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    say(run_plan(cfg))
    say(json.dumps(asdict(cfg), indent=1))
    if d.main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    return Logger(cfg.out) if d.main else (lambda record: None)


def iteration_randomness(cfg: Config, train_tasks, env, d, device, it):
    """Everything random in iteration `it` derives from (seed, it) (and the rank), so resuming at `it` replays it
    exactly. The task sample is shared (drawn in offline mode too, so the random stream is the same); each rank rolls
    out its share with its own generator and tool faults. -> (this rank's tasks, the shared rng, the generator)."""
    base = cfg.seed * 1_000_003 + it
    torch.manual_seed(base)
    rng = random.Random(base)
    gen = torch.Generator(device=device).manual_seed(base + 7_919 * d.rank)
    # A task's group of rollouts stays on one rank, in one batch: step-group compares them with each other.
    tasks = distributed.shard(rng.sample(train_tasks, cfg.episodes_per_iter // cfg.group_size), d)
    env.reset(seed=base + 7_919 * d.rank)          # fault sequence, too
    return [task for task in tasks for _ in range(cfg.group_size)], rng, gen


def iteration_record(it, episodes, stats, t_roll, d) -> dict:
    """The log line of an iteration: returns, pass rate, steps, invalid actions, the update's statistics."""
    train_m = episode_metrics(episodes)["all"]
    calls = [r for ep in episodes for step, r in zip(ep.steps, ep.rewards) if step.tool != "Finish"]
    return {"iter": it, "return": sum(sum(ep.rewards) for ep in episodes) / len(episodes),
            "mean_step_reward": sum(calls) / max(len(calls), 1),      # per tool call (PPO-calls' constant)
            "train_pass": train_m["pass_rate"], "train_steps": train_m["avg_steps"],
            "invalid": train_m["invalid_action_rate"], "retry_after_fault": train_m["retry_after_fault"], **stats,
            "rollout_s": distributed.max_over_ranks(t_roll, d), "rss_mb": resident_mb()}


def test_table(cfg: Config, test_tasks, sft_test, sft_outcomes, final_test, final_outcomes) -> str:
    """SFT and the trained policy, then the two paired task by task per group; --iters 0: the SFT row alone (no RL);
    --no-sft-test-eval: the trained policy alone (the experiment's record holds the SFT row)."""
    name = {"step": "StepTool", "final": "PPO (final reward)", "calls": "PPO-calls"}.get(cfg.reward, cfg.reward)
    if not cfg.iters:
        return results_table({"SFT": sft_test})
    if sft_test is None:
        return results_table({name: final_test})
    return results_table({"SFT": sft_test, name: final_test}) + "\n\n" + paired_table(
        name, sft_outcomes, final_outcomes, {t.id: t.group for t in test_tasks})


def write_results(cfg: Config, d, result: dict, table: str):
    if d.main:
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(cfg.out, "results.md"), "w") as f:
            f.write(table + "\n")
    return result


# ----------------------------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    # --- processes: one, or N under torchrun (distributed.py: who does what); only rank 0 prints and writes files
    d, device = distributed.init(cfg.device, cfg.fsdp)
    trim = cpu_speed.tune_allocator() if cfg.cpu_speed else (lambda: None)   # hands freed heap back after a phase
    say = print if d.main else (lambda *args, **kwargs: None)
    log = start_run(cfg, d, say)

    # --- tools and tasks: the same task suite for every seed, so methods and seeds are compared on the same split
    suite = make_suite(cfg.suite)
    env = suite.environment(FaultConfig(rate=cfg.fault_rate, seed=cfg.seed) if cfg.fault_rate > 0 else None)
    val_tasks = suite.tasks("val", cfg.n_val, seed=0)
    test_tasks = suite.tasks("test", cfg.n_test, seed=0)
    train_tasks = suite.tasks("train", cfg.train_tasks, seed=1)

    # --- warm start: the SFT model (or --model as it is), evaluated: the SFT row of the final table
    checkpoint.check_resume(cfg)
    model, tokenizer, warm_start_dir = load_model(cfg, suite, d, device, say)
    if cfg.eval_only:
        return evaluate_only(cfg, model, tokenizer, env, test_tasks, d, say)
    sft_val, _, _ = evaluate_warm_start(cfg, model, tokenizer, env, val_tasks, d, warm_start_dir)
    sft_test, sft_outcomes, sft_transcripts = evaluate_warm_start(cfg, model, tokenizer, env, test_tasks, d,
                                                                  warm_start_dir) if cfg.sft_test_eval else [None] * 3
    say(f"SFT: val pass {sft_val['all']['pass_rate']:.3f}, test pass "
        + (f"{sft_test['all']['pass_rate']:.3f}" if sft_test else "not evaluated (--no-sft-test-eval)"))

    # --- policy + critic, reference policy, optimizer (and the state of a resumed run)
    policy, trained, reference, optimizer, history, start = build_policy(cfg, model, d, device, say)
    ref_logprobs = functools.partial(reference_logprobs, model, reference, cfg.rollout.temperature)
    if cfg.offline_data:                  # the authors' fixed, annotated trajectories instead of rollouts
        from offline import load_offline
        offline = load_offline(cfg.offline_data, tokenizer, cfg.rollout.max_total_tokens)
    autocast = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
    microbatches = cpu_speed.SharedPromptMicrobatches if cfg.cpu_speed else Microbatches
    bad_iters = 0
    for it in range(start, cfg.iters):
        t0 = time.time()
        tasks, rng, gen = iteration_randomness(cfg, train_tasks, env, d, device, it)
        model.eval()

        # --- rollout -> rewards (offline: the trajectories come with their rewards)
        if cfg.offline_data:
            episodes = distributed.shard(rng.sample(offline, min(cfg.episodes_per_iter, len(offline))), d)
        else:
            episodes = rollout_batch(cfg, model, tokenizer, env, tasks, gen, d, it)
            for ep in episodes:
                ep.rewards = REWARDS[cfg.reward](ep, cfg.rewards)
        t_roll = time.time() - t0
        trim()                                           # the rollout's KV caches

        # --- PPO update: step-level advantages, then epochs of clipped updates (ppo.py)
        batch = collate(episodes, tokenizer.pad_id, device)
        model.train()
        stats = ppo_update(trained, optimizer, batch, cfg.ppo, cfg.advantages, reference_logprobs_fn=ref_logprobs,
                           autocast_dtype=autocast, device_type=device.type, generator=gen,
                           temperature=cfg.rollout.temperature, microbatches=microbatches)
        trim()                                           # the update's activations
        # Numerical guard (ppo.py skips any non-finite step); a run that only produces them stops here.
        bad_iters = bad_iters + 1 if stats["skipped_steps"] == stats["optimizer_steps"] else 0
        if bad_iters >= cfg.max_bad_iters:
            raise RuntimeError(f"iteration {it}: every update of the last {bad_iters} iterations was non-finite "
                               f"(loss or gradient); lower --lr or check the data. Last checkpoint is intact.")

        # --- log, validate, checkpoint
        episodes = distributed.gather(episodes, d)       # every rank's episodes, for the metrics
        record = iteration_record(it, episodes, stats, t_roll, d)
        if (it + 1) % cfg.eval_every == 0 or it == cfg.iters - 1:
            model.eval()
            val, _ = evaluate_split(cfg, model, tokenizer, env, val_tasks, d)
            record["val_pass"], record["val_recall"] = val["all"]["pass_rate"], val["all"]["recall"]
        record["iter_s"] = distributed.max_over_ranks(time.time() - t0, d)
        history.append(record)
        log(record)
        say(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if it % max(1, cfg.eval_every) == 0:
            say(show_episode(episodes[0]))
        save(cfg, policy, tokenizer, optimizer, history, d, iteration=it)

    # --- the test table: SFT vs the trained policy on the same test list (--iters 0: the policy is the warm start,
    # its adapters a no-op, so its greedy test episodes are the SFT row's and are not run twice)
    model.eval()
    if cfg.iters:
        final_test, final_episodes = evaluate_split(cfg, model, tokenizer, env, test_tasks, d, progress=True)
        final_outcomes, final_transcripts = outcomes_of(final_episodes), transcripts_of(final_episodes)
    else:
        final_test, final_outcomes, final_transcripts = sft_test, sft_outcomes, sft_transcripts
    save(cfg, policy, tokenizer, optimizer, history, d)
    table = test_table(cfg, test_tasks, sft_test, sft_outcomes, final_test, final_outcomes)
    say("\nTest split (pass rate = Solved fraction; recall = relevant tools called)\n" + table)
    # Per-task IsSolved on the same test list, for paired statistics across methods and seeds (experiment.py)
    return write_results(cfg, d, {
        "sft_val": sft_val, "sft_test": sft_test, "test": final_test, "history": history, "config": asdict(cfg),
        "test_task_groups": {t.id: t.group for t in test_tasks}, "sft_test_outcomes": sft_outcomes,
        "test_outcomes": final_outcomes, "sft_test_transcripts": sft_transcripts,
        "test_transcripts": final_transcripts,
        "provenance": checkpoint.provenance() | {"judge_version": JUDGE_VERSION, "reward_version": REWARD_VERSION},
        "warm_start": warm_start_provenance(warm_start_dir)}, table)


if __name__ == "__main__":
    try:
        main(parse_config())
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.shutdown()
