"""StepTool end to end: `python train.py` warm-starts a model by SFT, trains it with step-grained PPO against the
mocked tools, and prints SFT vs StepTool on the test split.

    config -> tasks and tools -> warm start (SFT, cached) or --model -> policy + critic + reference
    -> loop { rollout (or --offline-data) -> rewards -> PPO update -> log -> validate -> checkpoint } -> test table

main() reads as that line; the functions above it are its parts, in the order it calls them. The configuration
(dataclasses, presets, flags) is config.py; `train.parse_config` and `train.Config` are re-exported from it.
Who calls it: people (`python train.py`, `--preset smoke`, `--reward final` for the baseline), experiment.py,
torchrun, and tests (`main(cfg)` in-process).

Deviations from the paper (numbered; the paper's own values are in ../shared/PAPER.md):
 1. Online: rollouts are sampled from the current policy every iteration (the authors trained offline on fixed,
    GPT-4-annotated trajectories; `--offline-data` does that).
 2. The default model is tiny and trained from scratch on expert trajectories, so the whole run fits a laptop CPU;
    `--model PATH|smollm2` takes a Llama/Mistral/Qwen checkpoint (SmolLM2-135M is fetched and imported), SFT-warm-
    started through LoRA (sft.py), then RL with fresh adapters, LoRA on by default as in the paper.
 3. Hyper-parameters are scaled to the model (lr, batch sizes, KL coefficient); γ, λ and the ratio clip are the
    paper's; the value loss is not clipped by default and actor and critic are clipped on separate gradient norms
    (ppo.py contract 2, README "Choices that differ").
 4. The value head has a learning rate of its own (--value-lr, 50x the policy's): it starts at zero, and at the
    policy's rate it never learned within a run (the authors' TRL setup shares one rate).
"""
from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
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
import distributed
from batching import collate, predictors, token_logprobs
from config import Config, parse_config  # noqa: F401 (parse_config re-exported: train.parse_config)
from gguf_import import resolve_model
from model import (PolicyWithValue, ValueHead, add_lora, forward_with_prefix, load_pretrained, lora_disabled,
                   save_pretrained, store_frozen_weights_in, strip_prefix)
from ppo import ppo_update
from rewards import REWARDS
from rollout import ModelPolicy, episode_metrics, evaluate, results_table, rollout, show_episode
from tools import FaultConfig, load_toolbench, make_suite


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


def release_freed_memory():
    """Hand the heap memory freed by the last phase back to the OS. glibc keeps freed blocks for reuse, and with
    tensors of new sizes every micro-batch it reuses few: a SmolLM2 run's resident set grew 300-400 MB per iteration,
    and one malloc_trim took a run from 3.97 to 1.64 GB. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def map_large_allocations(threshold_mb: int) -> bool:
    """glibc's M_MMAP_THRESHOLD (--mmap-threshold-mb): every allocation of at least threshold_mb gets pages of its own,
    unmapped when freed, so the activations of one micro-batch never stay resident in a fragmented heap. glibc's
    default adapts: after the first large tensor is freed the threshold rises (up to 32 MB) and later tensors come
    from the heap. -> whether it was set (False without glibc, or for 0)."""
    try:
        return threshold_mb > 0 and ctypes.CDLL("libc.so.6").mallopt(-3, threshold_mb << 20) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------------------------------
# The parts of main(), in the order it calls them


def uses_lora(cfg: Config) -> bool:
    return cfg.lora == "on" or (cfg.lora == "auto" and bool(cfg.model))


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
        from sft import warm_start
        model, tokenizer, warm_start_dir = warm_start(cfg, suite, model_dir, device, log=say)
    if d.main:
        distributed.barrier(d)
    model.checkpoint_layers = cfg.checkpoint_layers
    if uses_lora(cfg):
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=cfg.seed)
        if cfg.dtype != "float32":        # frozen base in the autocast dtype; adapters and optimizer stay float32
            store_frozen_weights_in(model, getattr(torch, cfg.dtype))
    return model, tokenizer, warm_start_dir


def evaluate_split(cfg: Config, model, tokenizer, env, tasks, d, progress=False):
    """Greedy evaluation, each rank on its share of the tasks; every rank gets the metrics of all of them.
    -> (episode_metrics, episodes)"""
    with distributed.gathered(model, d):
        # Every evaluation restarts one fault stream (training rollouts draw from others): SFT and the trained
        # model are compared on the same faults.
        _, episodes = evaluate(model, tokenizer, env, distributed.shard(tasks, d), cfg.rollout, cfg.rollout_batch,
                               progress=progress and d.main, fault_seed=-1 - cfg.seed)
    episodes = distributed.gather(episodes, d)
    return episode_metrics(episodes), episodes


def evaluate_warm_start(cfg: Config, model, tokenizer, env, tasks, d, warm_start_dir: str):
    """The SFT row: (metrics, {task id: IsSolved}, transcripts) of the warm start on `tasks`. Every method and seed
    of an experiment starts from the same cached warm start, so its evaluation is cached next to it (greedy decoding:
    the result depends only on the model, the tasks and the rollout settings, plus the fault stream if faults are on)."""
    # The warm start's directory is keyed by the code that trains it (sft.WARM_START_CODE: the model, rollouts, tools
    # and the judge), so a change there gives a new directory; what evaluates it in this file is keyed here.
    key = json.dumps({"tasks": [t.id for t in tasks], "rollout": asdict(cfg.rollout), "batch": cfg.rollout_batch,
                      "code": checkpoint.source_hash(["train.py", "rollout.py", "tools"]),
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


def warm_start_provenance(warm_start_dir: str) -> dict | None:
    """The warm start a run stands on: its cache key and what trained it (sft.py's provenance.json: commit, dirty
    tree, torch, threads, date, losses); None for --model as it is."""
    if not warm_start_dir:
        return None
    path = os.path.join(warm_start_dir, "provenance.json")
    if not os.path.exists(path):                     # a warm start cached before provenance was recorded
        return {"key": os.path.basename(warm_start_dir).removeprefix("sft-"), "commit": None}
    with open(path) as f:
        return json.load(f)


def actor_params(policy) -> dict:
    """The policy's trainable parameters by name (LoRA adapters, or the whole model), the critic excluded."""
    return {n: p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head.")}


def build_policy(cfg: Config, model, d, device, say):
    """Policy + critic (one module, one forward), the reference policy and AdamW with one group for the actor and one
    for the critic; a resumed run's weights go in before sharding. -> policy, trained (what the update steps: policy,
    DDP(policy), or policy sharded in place by FSDP), reference, optimizer, history, start iteration."""
    critic_free = cfg.ppo.advantage == "step-group"        # no value head is created, trained or evaluated
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


def reference_logprobs(model, reference, temperature, input_ids, attention_mask, prefix_len=0, targets=None):
    """log π_ref (B, T) at the sampling temperature: the policy with its adapters off (reference None, LoRA), or a
    frozen copy of the start."""
    logits_at = None if targets is None else predictors(targets)
    with lora_disabled(model) if reference is None else nullcontext():
        logits, _ = forward_with_prefix(model if reference is None else reference, input_ids, attention_mask,
                                        prefix_len, logits_at)
    return token_logprobs(logits, input_ids, targets=targets, temperature=temperature)  # (B, T)


def rollout_batch(cfg: Config, model, tokenizer, env, tasks, generator, d, it) -> list:
    """This rank's episodes of an iteration, sampled from the current policy, --rollout-batch at a time."""
    episodes = []
    with distributed.gathered(model, d):
        for i in tqdm(range(0, len(tasks), cfg.rollout_batch), desc=f"iter {it} rollout", leave=False,
                      disable=not d.main):
            episodes += rollout(ModelPolicy(model, tokenizer, cfg.rollout, generator), tasks[i:i + cfg.rollout_batch],
                                env, tokenizer, cfg.rollout)
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


# ----------------------------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    # --- processes: one, or N under torchrun (distributed.py: who does what); only rank 0 prints and writes files
    d, device = distributed.init(cfg.device, cfg.fsdp)
    map_large_allocations(cfg.mmap_threshold_mb)
    say = print if d.main else (lambda *args, **kwargs: None)
    if cfg.fsdp and d.world == 1:
        say("note: --fsdp shards over torchrun processes; with one process the model is not sharded")
    if cfg.episodes_per_iter % d.world:
        raise ValueError(f"--episodes-per-iter {cfg.episodes_per_iter} must divide evenly over {d.world} ranks")
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    say(json.dumps(asdict(cfg), indent=1))
    if d.main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    log = Logger(cfg.out) if d.main else (lambda record: None)

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
                                                                  warm_start_dir)
    say(f"SFT: val pass {sft_val['all']['pass_rate']:.3f}, test pass {sft_test['all']['pass_rate']:.3f}")

    # --- policy + critic, reference policy, optimizer (and the state of a resumed run)
    policy, trained, reference, optimizer, history, start = build_policy(cfg, model, d, device, say)
    ref_logprobs = functools.partial(reference_logprobs, model, reference, cfg.rollout.temperature)
    if cfg.offline_data:                  # the authors' fixed, annotated trajectories instead of rollouts
        from offline import load_offline
        offline = load_offline(cfg.offline_data, tokenizer, cfg.rollout.max_total_tokens)
    autocast = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
    bad_iters = 0
    for it in range(start, cfg.iters):
        t0 = time.time()
        # Everything random in an iteration derives from (seed, it) (and the rank): resuming at `it` replays it
        # exactly. The task sample is shared (drawn in offline mode too, so the random stream is the same); each rank
        # rolls out its share with its own generator and faults.
        base = cfg.seed * 1_000_003 + it
        torch.manual_seed(base)
        rng = random.Random(base)
        gen = torch.Generator(device=device).manual_seed(base + 7_919 * d.rank)
        # A task's group of rollouts stays on one rank, in one batch: step-group compares them with each other.
        tasks = distributed.shard(rng.sample(train_tasks, cfg.episodes_per_iter // cfg.group_size), d)
        tasks = [task for task in tasks for _ in range(cfg.group_size)]
        env.reset(seed=base + 7_919 * d.rank)          # fault sequence, too
        model.eval()

        # --- rollout -> rewards (offline: the trajectories come with their rewards)
        if cfg.offline_data:
            episodes = distributed.shard(rng.sample(offline, min(cfg.episodes_per_iter, len(offline))), d)
        else:
            episodes = rollout_batch(cfg, model, tokenizer, env, tasks, gen, d, it)
            for ep in episodes:
                ep.rewards = REWARDS[cfg.reward](ep, cfg.rewards)
        t_roll = time.time() - t0
        release_freed_memory()                           # the rollout's KV caches

        # --- PPO update: step-level advantages, then epochs of clipped updates (ppo.py)
        # The system prompt every episode shares runs once per micro-batch (exact). Not under FSDP: there a rank
        # whose episodes share no prefix would run one forward fewer than the others, and FSDP's collectives hang.
        batch = collate(episodes, tokenizer.pad_id, device, shared_prefix=cfg.rollout.shared_prefix and not d.fsdp)
        model.train()
        stats = ppo_update(trained, optimizer, batch, cfg.ppo, reference_logprobs_fn=ref_logprobs,
                           autocast_dtype=autocast, device_type=device.type, generator=gen,
                           temperature=cfg.rollout.temperature)
        release_freed_memory()                           # the update's activations
        # Numerical guard (ppo.py skips any non-finite step); a run that only produces them stops here.
        bad_iters = bad_iters + 1 if stats["skipped_steps"] == stats["optimizer_steps"] else 0
        if bad_iters >= cfg.max_bad_iters:
            raise RuntimeError(f"iteration {it}: every update of the last {bad_iters} iterations was non-finite "
                               f"(loss or gradient); lower --lr or check the data. Last checkpoint is intact.")

        # --- log, validate, checkpoint
        episodes = distributed.gather(episodes, d)       # every rank's episodes, for the metrics
        train_m = episode_metrics(episodes)["all"]
        record = {"iter": it, "return": sum(sum(ep.rewards) for ep in episodes) / len(episodes),
                  "train_pass": train_m["pass_rate"], "train_steps": train_m["avg_steps"],
                  "invalid": train_m["invalid_action_rate"], "retry_after_fault": train_m["retry_after_fault"], **stats,
                  "rollout_s": distributed.max_over_ranks(t_roll, d), "rss_mb": resident_mb()}
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

    # --- the test table: SFT vs the trained policy on the same test list
    model.eval()
    final_test, final_episodes = evaluate_split(cfg, model, tokenizer, env, test_tasks, d, progress=True)
    save(cfg, policy, tokenizer, optimizer, history, d)
    name = "StepTool" if cfg.reward == "step" else "PPO (final reward)"
    table = results_table({"SFT": sft_test, name: final_test})
    say("\nTest split (pass rate = Solved fraction; recall = relevant tools called)\n" + table)
    # Per-task IsSolved on the same test list, for paired statistics across methods and seeds (experiment.py)
    result = {"sft_val": sft_val, "sft_test": sft_test, "test": final_test, "history": history,
              "config": asdict(cfg), "test_task_groups": {t.id: t.group for t in test_tasks},
              "sft_test_outcomes": sft_outcomes, "test_outcomes": outcomes_of(final_episodes),
              "sft_test_transcripts": sft_transcripts, "test_transcripts": transcripts_of(final_episodes),
              "provenance": checkpoint.provenance(), "warm_start": warm_start_provenance(warm_start_dir)}
    if d.main:
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(cfg.out, "results.md"), "w") as f:
            f.write(table + "\n")
    return result


if __name__ == "__main__":
    try:
        main(parse_config())
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.shutdown()
