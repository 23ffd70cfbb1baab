"""StepTool end to end: `python train.py` warm-starts a model by SFT, trains it with step-grained PPO against the
mocked tools, and prints SFT vs StepTool on the test split.

    config -> tasks and tools -> warm start (SFT, cached) or --model -> policy + critic + reference
    -> loop { rollout -> rewards -> step-level advantages -> PPO epochs -> log -> eval -> checkpoint } -> test table

Who calls it: people (`python train.py`, `--preset smoke`, `--reward final` for the baseline), experiment.py,
torchrun, and tests (`main(cfg)` in-process).

Deviations from the paper (numbered; the paper's own values are in ../shared/PAPER.md):
 1. Online: rollouts are sampled from the current policy every iteration (the authors trained offline on fixed,
    GPT-4-annotated trajectories; `--offline-data` does that).
 2. The default model is tiny and trained from scratch on expert trajectories, so the whole run fits a laptop CPU;
    `--model PATH` takes any Llama/Mistral/Qwen checkpoint, with LoRA on by default as in the paper.
 3. Hyper-parameters are scaled to the tiny model (lr, batch sizes, KL coefficient); γ, λ and the clip ranges are
    the paper's.
 4. The value head has a learning rate of its own (--value-lr, 50x the policy's): it starts at zero, and at the
    policy's rate it never learned within a run (the authors' TRL setup shares one rate).
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import json
import os
import random
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import distributed
from gguf_import import resolve_model
from model import (PolicyWithValue, ValueHead, add_lora, forward_with_prefix, load_pretrained, lora_disabled,
                   save_pretrained, store_frozen_weights_in, strip_prefix)
from ppo import PPOConfig, ppo_update, predictors, token_logprobs
from rewards import CONTRIBUTIONS, REWARDS, RewardConfig
from rollout import ModelPolicy, RolloutConfig, collate, episode_metrics, evaluate, rollout
from tools import FaultConfig, load_toolbench, make_suite
from tools.tasks import SUITES


@dataclass
class Config:
    preset: str = "default"
    """Named set of defaults: "default" (the tiny model, ~10 min on 2 CPU cores), "smollm2" (a pretrained model), or
    "smoke" (< 1 min, for CI)."""
    out: str = "runs/default"
    """Run directory: config.json, metrics.jsonl, checkpoints, final model."""
    model: str = ""
    """Start from a pretrained model: "smollm2" (SmolLM2-135M-Instruct, fetched and imported into --cache-dir on
    first use) or a Hugging Face checkpoint directory. Empty: a tiny model trained from scratch."""
    suite: str = "tiny"
    """Task suite: tiny (small world, (entity, template) splits, for the from-scratch model) or large
    (entity-disjoint splits, fixed unique val/test lists, one system prompt for all tasks)."""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    """float32 | bfloat16 | float16 (autocast; float16 on CUDA only)."""
    resume: bool = False
    """Continue from the newest checkpoint in --out."""
    eval_only: bool = False
    """Only evaluate on the test split: --model as it is (never fine-tuned), or the tiny model's SFT warm start."""
    tasks: str = ""
    """Evaluate on other tasks: "toolbench:PATH.json" (a ToolBench query file through the mocked-API import)."""
    offline_data: str = ""
    """Train on the authors' TSV format (prompt, response, reward per step) instead of online rollouts."""
    # --- the task suite
    n_val: int = 90
    n_test: int = 150
    train_tasks: int = 4000
    """Size of the pool of RL training tasks the iterations sample from."""
    fault_rate: float = 0.0
    """Fraction of tool calls that fail with an injected fault (timeout, server error, malformed body, ...)."""
    # --- the warm start (sft.py): SFT on expert demonstrations, cached
    cache_dir: str = "runs/cache"
    """Where SFT warm starts and imported models (--model smollm2) are cached."""
    template: str = "chatml"
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    sft_seed: int = 0
    """Seed of the warm start, separate from --seed so RL seeds share one SFT model (as the paper's runs do)."""
    sft_tasks: int = 4800
    """Expert demonstrations for the warm start; 0 with --model: start RL from the checkpoint as it is."""
    sft_epochs: int = 2
    sft_batch: int = 8
    sft_lr: float = 1e-3
    sft_schedule: str = "cosine"
    """cosine (decay to zero, from scratch) | constant (a pretrained model with LoRA)."""
    sft_fault_rate: float = 0.0
    """Fault rate of the tools the expert's demonstrations are recorded against; the expert retries failed calls."""
    # --- LoRA (pretrained models)
    lora: str = "auto"
    """auto (on for --model, off from scratch) | on | off."""
    lora_r: int = 16
    lora_alpha: int = 16
    # --- RL
    reward: str = "step"
    """step (StepTool's step-grained reward) | final (the PPO (Final Reward) baseline)."""
    iters: int = 16
    episodes_per_iter: int = 64
    """Episodes rolled out per iteration (the RL budget), whatever --group-size."""
    group_size: int = 1
    """Rollouts of each sampled task per iteration, for --advantage step-group (which compares them): an iteration
    samples episodes-per-iter / group-size tasks."""
    rollout_batch: int = 32
    lr: float = 2e-5
    value_lr: float = 1e-3
    """Learning rate of the value head. It starts at zero; at the policy's --lr it stayed near zero for a whole run
    (explained variance ~0.01 after 48 iterations), which leaves GAE with returns-to-go and no baseline."""
    eval_every: int = 4
    keep_checkpoints: int = 2
    detach_critic: bool = True
    """Train the value head on the policy's hidden states without back-propagating into them. With a tiny model
    the shared critic's gradient degraded the policy (README, "Results"); TRL's default shares the trunk."""
    max_bad_iters: int = 3
    """Stop after this many consecutive iterations whose every optimizer step was non-finite (and skipped)."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard) instead of DDP."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


PRESETS = {
    "default": dict(ppo_epochs=2, temperature=0.7, kl_coef=0.1),
    # SmolLM2-135M-Instruct on this 2-core CPU: the large suite, SFT through LoRA on 128 demonstrations (constant lr,
    # the recipe that taught it the format in a few dozen steps), a bf16 frozen base, 8 RL iterations of 32 episodes.
    "smollm2": dict(out="runs/smollm2", model="smollm2", suite="large", dtype="bfloat16", n_val=30, n_test=540,
                    sft_tasks=128, sft_epochs=1, sft_batch=8, sft_lr=1e-3, sft_schedule="constant", lora_alpha=32,
                    max_total_tokens=1536, iters=8, episodes_per_iter=32, lr=5e-5, ppo_epochs=2, temperature=0.7,
                    kl_coef=0.05, eval_every=4),
    "smoke": dict(out="runs/smoke", n_val=12, n_test=18, train_tasks=400, vocab_size=512, hidden_size=64,
                  num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, sft_tasks=96, sft_epochs=1, iters=2,
                  episodes_per_iter=8, rollout_batch=8, eval_every=1, max_steps=4, max_action_tokens=48, max_total_tokens=640,
                  ppo_epochs=1),
}


# ----------------------------------------------------------------------------------------------------------------------
# The command line, generated from the dataclasses: one flag per field, nested configs flattened (--gamma, --alpha ...)


def _fields(cls, prefix=()):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from _fields(f.default_factory, prefix + (f.name,))
        else:
            yield prefix, f


def _set(cfg, path, name, value):
    for p in path:
        cfg = getattr(cfg, p)
    setattr(cfg, name, value)


def _docstrings(cls) -> dict:
    """field name -> the string literal under it in the class body (the help text of its flag)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    seen, docs = set(), {}
    for cls in (Config, RolloutConfig, RewardConfig, PPOConfig):
        docs.update({(cls, k): v for k, v in _docstrings(cls).items()})
    for path, f in _fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if flag in seen:              # a name shared by two configs (seed) is one flag that sets both
            continue
        seen.add(flag)
        owner = {(): Config, ("rollout",): RolloutConfig, ("rewards",): RewardConfig, ("ppo",): PPOConfig}[path]
        default = PRESETS["default"].get(f.name, f.default)
        text = f"{docs.get((owner, f.name), '')} (default: {default})".strip().replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            parser.add_argument(flag, type=kind, default=None, help=text)
    args = vars(parser.parse_args(argv))
    cfg = Config()
    preset = args.get("preset") or "default"
    if preset not in PRESETS:
        parser.error(f"unknown --preset {preset!r}; choose from {sorted(PRESETS)}")
    overrides = {**PRESETS[preset], **{k: v for k, v in args.items() if v is not None}}
    for path, f in _fields(Config):
        if f.name in overrides:
            _set(cfg, path, f.name, overrides[f.name])
    try:
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def validate(cfg: Config):
    """Out-of-range flags fail here with one line, before anything is built."""
    checks = [
        (cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
        (cfg.value_lr > 0, f"--value-lr must be > 0 (got {cfg.value_lr})"),
        (0 <= cfg.ppo.gamma <= 1, f"--gamma must be in [0, 1] (got {cfg.ppo.gamma})"),
        (0 <= cfg.ppo.lam <= 1, f"--lam must be in [0, 1] (got {cfg.ppo.lam})"),
        (cfg.ppo.kl_coef >= 0, f"--kl-coef must be >= 0 (got {cfg.ppo.kl_coef})"),
        (cfg.episodes_per_iter > 0, f"--episodes-per-iter must be > 0 (got {cfg.episodes_per_iter})"),
        (cfg.rollout_batch > 0, f"--rollout-batch must be > 0 (got {cfg.rollout_batch})"),
        (cfg.iters >= 0, f"--iters must be >= 0 (got {cfg.iters})"),
        (cfg.rewards.alpha >= 0, f"--alpha must be >= 0 (got {cfg.rewards.alpha})"),
        (0 <= cfg.fault_rate <= 1, f"--fault-rate must be in [0, 1] (got {cfg.fault_rate})"),
        (0 <= cfg.sft_fault_rate <= 1, f"--sft-fault-rate must be in [0, 1] (got {cfg.sft_fault_rate})"),
        (cfg.reward in REWARDS, f"--reward must be one of {sorted(REWARDS)} (got {cfg.reward!r})"),
        (cfg.rewards.contribution in CONTRIBUTIONS,
         f"--contribution must be one of {sorted(CONTRIBUTIONS)} (got {cfg.rewards.contribution!r})"),
        (cfg.ppo.advantage in ("step", "token", "step-group"),
         f"--advantage must be step, token or step-group (got {cfg.ppo.advantage!r})"),
        (cfg.group_size >= 1 and cfg.episodes_per_iter % cfg.group_size == 0,
         f"--group-size must be >= 1 and divide --episodes-per-iter (got {cfg.group_size})"),
        (cfg.dtype in ("float32", "bfloat16", "float16"), f"--dtype must be float32, bfloat16 or float16"),
        (cfg.lora in ("auto", "on", "off"), f"--lora must be auto, on or off (got {cfg.lora!r})"),
        (not cfg.model or cfg.model == "smollm2" or os.path.isdir(cfg.model),
         f"--model {cfg.model}: no such directory (or use --model smollm2)"),
        (cfg.suite in SUITES, f"--suite must be one of {sorted(SUITES)} (got {cfg.suite!r})"),
        (cfg.sft_schedule in ("cosine", "constant"), f"--sft-schedule must be cosine or constant"),
        (cfg.sft_tasks >= 0 and (cfg.sft_tasks > 0 or cfg.model), "--sft-tasks must be > 0 without --model"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


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


def show_episode(ep) -> str:
    lines = [f"[task G{ep.task.group}] {ep.task.query}  (truth: {ep.task.answer})"]
    for t, (s, r) in enumerate(zip(ep.steps, ep.rewards or [None] * len(ep.steps))):
        lines.append(f"  step {t} r={r if r is None else round(r, 3)} ok={s.success}: "
                     f"{s.action_text.strip()[:160]!r}\n    -> {s.observation[:120]!r}")
    return "\n".join(lines)


def results_table(rows: dict) -> str:
    """rows: name -> episode_metrics dict. Markdown table of pass rate and recall per group."""
    groups = [g for g in next(iter(rows.values())) if g != "all"] + ["all"]
    head = "| method | " + " | ".join(f"{g} pass | {g} recall" for g in groups) + " |"
    sep = "|---" * (1 + 2 * len(groups)) + "|"
    body = ["| " + name + " | " + " | ".join(f"{m[g]['pass_rate']:.3f} | {m[g]['recall']:.3f}" for g in groups) + " |"
            for name, m in rows.items()]
    return "\n".join([head, sep] + body)


# ----------------------------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    # --- processes: one, or N under torchrun (distributed.py: who does what); only rank 0 prints and writes files
    d, device = distributed.init(cfg.device, cfg.fsdp)
    say = print if d.main else (lambda *args, **kwargs: None)
    if cfg.fsdp and d.world == 1:
        say("note: --fsdp shards over torchrun processes; with one process the model is not sharded")
    if cfg.episodes_per_iter % d.world:
        raise ValueError(f"--episodes-per-iter {cfg.episodes_per_iter} must divide evenly over {d.world} ranks")
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
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

    # --- model: the SFT warm start (cached), or a checkpoint as it is; weights stay float32, --dtype picks autocast
    if not d.main:                        # rank 0 imports / trains and caches while the others wait; then they load
        distributed.barrier(d)
    model_dir = resolve_model(cfg.model, cfg.cache_dir, log=say) if cfg.model else ""
    if model_dir and (cfg.eval_only or cfg.sft_tasks == 0 or cfg.offline_data):
        model, tokenizer = load_pretrained(model_dir, device=device)
    else:
        from sft import warm_start
        model, tokenizer = warm_start(cfg, suite, model_dir, device, log=say)
    if d.main:
        distributed.barrier(d)
    use_lora = cfg.lora == "on" or (cfg.lora == "auto" and bool(cfg.model))
    if use_lora:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha)
        if dtype != torch.float32:        # frozen base in the autocast dtype; adapters and optimizer stay float32
            store_frozen_weights_in(model, dtype)

    def evaluate_all(tasks, progress=False):
        """Greedy evaluation, each rank on its share of the tasks; every rank gets the metrics of all of them."""
        with distributed.gathered(model, d):
            # Every evaluation restarts one fault stream (training rollouts draw from others): SFT and the trained
            # model are compared on the same faults.
            _, episodes = evaluate(model, tokenizer, env, distributed.shard(tasks, d), cfg.rollout, cfg.rollout_batch,
                                   progress=progress and d.main, fault_seed=-1 - cfg.seed)
        episodes = distributed.gather(episodes, d)
        return episode_metrics(episodes), episodes

    if cfg.eval_only:
        if cfg.tasks:                     # another task file through the tools' import (mocked APIs)
            kind, _, path = cfg.tasks.partition(":")
            if kind != "toolbench" or not path:
                raise ValueError(f"--tasks must be toolbench:PATH.json (got {cfg.tasks!r})")
            env, test_tasks = load_toolbench(path)
        metrics, episodes = evaluate_all(test_tasks, progress=True)
        judged = [ep for ep in episodes if ep.task.facts]        # tasks whose answer can be checked
        passed = sum(ep.solved == 1.0 for ep in judged) / len(judged) if judged else None
        say(results_table({"model": metrics}))
        say(f"pass rate {passed if passed is None else round(passed, 3)} on the {len(judged)} tasks that can be "
            f"judged ({len(episodes) - len(judged)} cannot); recall of relevant APIs "
            f"{metrics['all']['recall']:.3f} on all {len(episodes)}; {metrics['all']['fault_rate']:.1%} of calls "
            f"hit a fault, {metrics['all']['retry_after_fault']:.1%} of those were retried")
        return {"test": metrics, "judged_pass_rate": passed, "judged": len(judged),
                "unjudged": len(episodes) - len(judged)}
    sft_val, _ = evaluate_all(val_tasks, progress=True)
    sft_test, sft_episodes = evaluate_all(test_tasks, progress=True)
    say(f"SFT: val pass {sft_val['all']['pass_rate']:.3f}, test pass {sft_test['all']['pass_rate']:.3f}")

    # --- policy + critic (one module, one forward) and the reference policy; resumed weights go in before sharding
    critic_free = cfg.ppo.advantage == "step-group"        # no value head is created, trained or evaluated
    value_head = None if critic_free else ValueHead(model.config.hidden_size).to(device)
    policy = PolicyWithValue(model, value_head, detach_critic=cfg.detach_critic)
    if use_lora:
        reference = None                   # the base model with LoRA switched off: no second copy in memory
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    history, start, state, resume_from = [], 0, None, cfg.resume and checkpoint.latest(cfg.out)
    if resume_from:
        state = checkpoint.load_state(resume_from, {n: p for n, p in policy.named_parameters()
                                                    if p.requires_grad and not n.startswith("value_head.")}, value_head)
        history, start = state["metrics"], state["iteration"] + 1
    trained = distributed.wrap(policy, d, device)   # policy, DDP(policy), or policy sharded in place by FSDP
    if reference is not None:
        distributed.shard_reference(reference, d)
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    actor = [p for n, p in trainable.items() if not n.startswith("value_head.")]
    critic = [p for n, p in trainable.items() if n.startswith("value_head.")]
    groups = [{"params": actor, "lr": cfg.lr}] + ([{"params": critic, "lr": cfg.value_lr}] if critic else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    if resume_from:
        checkpoint.load_optimizer(resume_from, optimizer, state, policy)
        say(f"resumed from {resume_from} at iteration {start}")

    def reference_logprobs(input_ids, attention_mask, prefix_len=0, targets=None):
        """log π_ref (B, T): the policy with its adapters off (LoRA), or a frozen copy of the start."""
        logits_at = None if targets is None else predictors(targets)
        with lora_disabled(model) if reference is None else nullcontext():
            logits, _ = forward_with_prefix(model if reference is None else reference, input_ids, attention_mask,
                                            prefix_len, logits_at)
        return token_logprobs(logits / cfg.ppo.temperature, input_ids, targets=targets)  # (B, T)

    def save(path=None, iteration=None):
        """The final model (path) or a checkpoint (iteration). With FSDP every rank gathers; rank 0 writes."""
        full = distributed.full_state(policy, optimizer, d) if d.fsdp and d.world > 1 else None
        if not d.main:
            return
        if path:
            save_pretrained(model, tokenizer, path, state=full and strip_prefix(full[0], "model."))
        else:
            checkpoint.save(cfg.out, iteration, model, tokenizer, value_head, optimizer, asdict(cfg), history,
                            {n: p for n, p in trainable.items() if not n.startswith("value_head.")},
                            cfg.keep_checkpoints, full=full)

    reward_fn = REWARDS[cfg.reward]
    offline = None
    if cfg.offline_data:                  # the authors' fixed, annotated trajectories instead of rollouts
        from offline import load_offline
        offline = load_offline(cfg.offline_data, tokenizer, cfg.rollout.max_total_tokens)
    autocast = dtype if dtype != torch.float32 else None
    bad_iters = 0
    for it in range(start, cfg.iters):
        t0 = time.time()
        # Everything random in an iteration derives from (seed, it) (and the rank): resuming at `it` replays it
        # exactly. The task sample is shared; each rank rolls out its share with its own generator and faults.
        base = cfg.seed * 1_000_003 + it
        torch.manual_seed(base)
        rng = random.Random(base)
        gen = torch.Generator(device=device).manual_seed(base + 7_919 * d.rank)
        # A task's group of rollouts stays on one rank, in one batch: step-group compares them with each other.
        tasks = distributed.shard(rng.sample(train_tasks, cfg.episodes_per_iter // cfg.group_size), d)
        tasks = [task for task in tasks for _ in range(cfg.group_size)]
        env.reset(seed=base + 7_919 * d.rank)          # fault sequence, too
        model.eval()
        episodes = []
        if offline is not None:           # rewards come with the data
            episodes = distributed.shard(rng.sample(offline, min(cfg.episodes_per_iter, len(offline))), d)
        with distributed.gathered(model, d):
            for i in tqdm(range(0, len(tasks) if offline is None else 0, cfg.rollout_batch),
                          desc=f"iter {it} rollout", leave=False, disable=not d.main):
                episodes += rollout(ModelPolicy(model, tokenizer, cfg.rollout, gen), tasks[i:i + cfg.rollout_batch],
                                    env, tokenizer, cfg.rollout)
        for ep in episodes if offline is None else []:
            ep.rewards = reward_fn(ep, cfg.rewards)
        t_roll = time.time() - t0
        # The system prompt every episode shares runs once per micro-batch (exact). Not under FSDP: there a rank
        # whose episodes share no prefix would run one forward fewer than the others, and FSDP's collectives hang.
        batch = collate(episodes, tokenizer.pad_id, device, shared_prefix=cfg.rollout.shared_prefix and not d.fsdp)
        model.train()
        stats = ppo_update(trained, optimizer, batch, cfg.ppo, reference_logprobs_fn=reference_logprobs,
                           autocast_dtype=autocast, device_type=device.type, generator=gen)
        # Numerical guard (ppo.py skips any non-finite step); a run that only produces them stops here.
        bad_iters = bad_iters + 1 if stats["skipped_steps"] == stats["optimizer_steps"] else 0
        if bad_iters >= cfg.max_bad_iters:
            raise RuntimeError(f"iteration {it}: every update of the last {bad_iters} iterations was non-finite "
                               f"(loss or gradient); lower --lr or check the data. Last checkpoint is intact.")
        episodes = distributed.gather(episodes, d)       # every rank's episodes, for the metrics
        train_m = episode_metrics(episodes)["all"]
        record = {"iter": it, "return": sum(sum(ep.rewards) for ep in episodes) / len(episodes),
                  "train_pass": train_m["pass_rate"], "train_steps": train_m["avg_steps"],
                  "invalid": train_m["invalid_action_rate"], "retry_after_fault": train_m["retry_after_fault"], **stats,
                  "rollout_s": distributed.max_over_ranks(t_roll, d), "rss_mb": resident_mb()}
        if (it + 1) % cfg.eval_every == 0 or it == cfg.iters - 1:
            model.eval()
            val, _ = evaluate_all(val_tasks)
            record["val_pass"], record["val_recall"] = val["all"]["pass_rate"], val["all"]["recall"]
        record["iter_s"] = distributed.max_over_ranks(time.time() - t0, d)
        history.append(record)
        log(record)
        say(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if it % max(1, cfg.eval_every) == 0:
            say(show_episode(episodes[0]))
        save(iteration=it)

    model.eval()
    final_test, final_episodes = evaluate_all(test_tasks, progress=True)
    save(path=os.path.join(cfg.out, "final"))
    name = "StepTool" if cfg.reward == "step" else "PPO (final reward)"
    table = results_table({"SFT": sft_test, name: final_test})
    say("\nTest split (pass rate = Solved fraction; recall = relevant tools called)\n" + table)
    # Per-task IsSolved on the same test list, for paired statistics across methods and seeds (experiment.py)
    outcomes = lambda episodes: {ep.task.id: ep.solved for ep in episodes}  # noqa: E731
    result = {"sft_val": sft_val, "sft_test": sft_test, "test": final_test, "history": history,
              "config": asdict(cfg), "test_task_groups": {t.id: t.group for t in test_tasks},
              "sft_test_outcomes": outcomes(sft_episodes), "test_outcomes": outcomes(final_episodes)}
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
