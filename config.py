"""The configuration of `python train.py`: one dataclass per concern with a docstring under each field, the named
presets, and the command line generated from them (every field is a flag: --lr, --gamma, --temperature, ...).

Who calls it: train.py (parse_config, Config), which re-exports both, so `train.parse_config` and `train.Config` work.

    Config()                      what `python train.py` runs (SmolLM2-135M-Instruct: import, SFT warm start, StepTool)
    PRESETS[name]                 values that differ from Config(), by field name: --preset tiny | smoke | smollm2
    parse_config(argv)            the preset's Config with the flags on top, validated; --help shows every field

Each concept is one field: the sampling temperature is RolloutConfig.temperature (PPO's ratio is computed at that
temperature, passed in by train.py), the chat template RolloutConfig.template, the seed Config.seed. Field names are
unique across Config and its sub-configs (RolloutConfig, RewardConfig, AdvantageConfig, PPOConfig), so a flag name is
a field name (tests/test_config.py checks it). The CPU speed paths are one switch, Config.cpu_speed.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
from dataclasses import dataclass, field

import torch

from advantages import AdvantageConfig
from ppo import PPOConfig
from rewards import CONTRIBUTIONS, REWARDS, SUCC_CALLING, RewardConfig
from rollout import RolloutConfig
from tools.tasks import SUITES


@dataclass
class Config:
    preset: str = "default"
    """Named set of defaults (PRESETS): "default" (these values: SmolLM2-135M-Instruct, the main job), "smollm2" (a
    name for the same settings), "tiny" (a 2-layer model trained from scratch in minutes: the pipeline, not the
    method's effect) or "smoke" (the tiny model in < 1 min, for CI). Flags given with it override its values."""
    out: str = "runs/default"
    """Run directory: config.json, metrics.jsonl, checkpoints, final model."""
    model: str = "smollm2"
    """Start from a pretrained model: "smollm2" (SmolLM2-135M-Instruct, fetched and imported into --cache-dir on
    first use) or a Hugging Face checkpoint directory. Empty: a tiny model trained from scratch."""
    suite: str = "large"
    """Task suite: tiny (small world, (entity, template) splits, for the from-scratch model) or large
    (entity-disjoint splits, fixed unique val/test lists, one system prompt for all tasks)."""
    seed: int = 0
    """Seed of the RL phase: task sampling, rollouts, mini-batch shuffling, tool faults."""
    device: str = "cpu"
    """cpu | cuda (under torchrun each rank takes its own GPU)."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16 (autocast; float16 on CUDA only). auto: bfloat16 on CUDA and on a CPU that
    multiplies bf16 natively (AMX or AVX512-BF16), float32 elsewhere (an AVX2 CPU emulates bf16 ~30x slower)."""
    checkpoint_layers: bool = True
    """Activation checkpointing in SFT and PPO: keep only each layer's input and recompute the layer in the backward
    pass (exact; about one more forward of compute for a fraction of the activation memory)."""
    cpu_speed: bool = True
    """The CPU speed paths of cpu_speed.py, applied to the plain model and loop: the prompt every episode shares run
    once (rollouts, SFT, PPO), decode matmuls on oneDNN-packed bf16 weights, PPO lengths rounded to 64 with bf16
    weights on a CPU, glibc's allocator tuned. The same results up to float rounding; each part a no-op where it
    does not apply (off: the plain model and loop)."""
    resume: bool = False
    """Continue from the newest checkpoint in --out."""
    eval_only: bool = False
    """Only evaluate on the test split: --model as it is (never fine-tuned), or the tiny model's SFT warm start."""
    tasks: str = ""
    """Evaluate on other tasks: "toolbench:PATH.json" (a ToolBench query file through the mocked-API import)."""
    offline_data: str = ""
    """Train on the authors' TSV format (prompt, response, reward per step) instead of online rollouts."""
    # --- the task suite
    n_val: int = 15
    """Validation tasks, evaluated every --eval-every iterations."""
    n_test: int = 180
    """Test tasks, evaluated before RL (the SFT row) and after it."""
    sft_test_eval: bool = True
    """Evaluate the warm start on the test tasks (the SFT row, cached next to it). experiment.py turns it off
    (--no-sft-test-eval) for an RL run whose warm start's row its record already holds under the same warm-start key:
    on a machine without the cache, that evaluation is the longest phase after SFT (540 tasks: ~31 min on 2 CPU
    cores). The warm start's val evaluation (--n-val) runs either way."""
    train_tasks: int = 4000
    """Size of the pool of RL training tasks the iterations sample from."""
    fault_rate: float = 0.0
    """Fraction of tool calls that fail with an injected fault (timeout, server error, malformed body, ...)."""
    # --- the warm start (sft.py): SFT on expert demonstrations, cached
    cache_dir: str = "runs/cache"
    """Where SFT warm starts and imported models (--model smollm2) are cached."""
    vocab_size: int = 2048
    """From scratch: BPE vocabulary size of the tokenizer trained on the task corpus."""
    hidden_size: int = 128
    """From scratch: model dimension C."""
    num_layers: int = 2
    """From scratch: transformer blocks."""
    num_heads: int = 4
    """From scratch: query heads H."""
    num_kv_heads: int = 2
    """From scratch: key/value heads K (grouped-query attention when K < H)."""
    intermediate_size: int = 384
    """From scratch: MLP dimension."""
    sft_seed: int = 0
    """Seed of the warm start, separate from --seed so RL seeds share one SFT model (as the paper's runs do)."""
    sft_tasks: int = 1024
    """Expert demonstrations for the warm start; 0 with --model: start RL from the checkpoint as it is. 1024 with the
    cosine schedule (128 steps): chosen on the val split over 512 with either schedule (README, "Reproducing the warm
    start"; results/warm-starts/val-probe.json)."""
    sft_epochs: int = 1
    """Passes over the demonstrations."""
    sft_batch: int = 8
    """Demonstrations per SFT optimizer step."""
    sft_lr: float = 1e-3
    """Peak SFT learning rate (after a short linear warm-up)."""
    sft_schedule: str = "cosine"
    """cosine (warm-up, then a decay to zero) | constant (after the warm-up; the recipe before 2026-12-07)."""
    sft_fault_rate: float = 0.0
    """Fault rate of the tools the expert's demonstrations are recorded against; the expert retries failed calls."""
    # --- LoRA (pretrained models)
    lora: str = "auto"
    """auto (on for --model, off from scratch) | on | off."""
    lora_r: int = 16
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA scale α (the update is (α/r)·B·A)."""
    # --- RL
    reward: str = "step"
    """step (StepTool's step-grained reward) | final (the PPO (Final Reward) baseline)."""
    iters: int = 4
    """RL iterations (rollout -> rewards -> PPO update)."""
    episodes_per_iter: int = 32
    """Episodes rolled out per iteration (the RL budget), whatever --group-size."""
    group_size: int = 1
    """Rollouts of each sampled task per iteration, for --advantage step-group (which compares them): an iteration
    samples episodes-per-iter / group-size tasks."""
    rollout_batch: int = 32
    """Episodes decoded together in one batch (rollouts and evaluation)."""
    lr: float = 5e-5
    """Learning rate of the policy (AdamW, constant)."""
    value_lr: float = 1e-3
    """Learning rate of the value head. It starts at zero; at the policy's --lr it stayed near zero for a whole run
    (explained variance ~0.01 after 48 iterations), which leaves GAE with returns-to-go and no baseline."""
    eval_every: int = 4
    """Evaluate on the validation tasks every this many iterations (and after the last)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in --out (one per iteration is written)."""
    detach_critic: bool = True
    """Train the value head on the policy's hidden states without back-propagating into them. With a tiny model
    the shared critic's gradient degraded the policy (docs/history.md §5); TRL's default shares the trunk."""
    max_bad_iters: int = 3
    """Stop after this many consecutive iterations whose every optimizer step was non-finite (and skipped)."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard) instead of DDP."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


# Values that differ from Config() by name; `--preset default` (or none) is Config() as it is: SmolLM2-135M-Instruct
# on the large suite, SFT through LoRA on a bf16 frozen base, 4 RL iterations of 32 episodes, the first 180 test tasks
# (60 per group). token_budget 2048 and activation checkpointing (exact) bound a training process's memory.
TINY = dict(out="runs/tiny", model="", suite="tiny", dtype="float32", checkpoint_layers=False, n_val=90, n_test=150,
            sft_tasks=4800, sft_epochs=2, sft_schedule="cosine", lora_alpha=16, iters=16, episodes_per_iter=64, lr=2e-5,
            kl_coef=0.1, max_total_tokens=1024, token_budget=4096)
DEFAULT_NAME = "smollm2"                        # the default's settings under the name experiment files carry
PRESETS = {
    DEFAULT_NAME: dict(out="runs/smollm2"),
    # A 2-layer model trained from scratch (~7 min on 2 CPU cores): the whole pipeline on a laptop, not the effect.
    "tiny": TINY,
    # CI: the tiny model, 2 iterations of 8 episodes, < 1 min.
    "smoke": TINY | dict(out="runs/smoke", n_val=12, n_test=18, train_tasks=400, vocab_size=512, hidden_size=64,
                         num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, sft_tasks=96, sft_epochs=1,
                         iters=2, episodes_per_iter=8, rollout_batch=8, eval_every=1, max_steps=4, max_action_tokens=48,
                         max_total_tokens=640, ppo_epochs=1, temperature=1.0, kl_coef=0.05),
}


# ----------------------------------------------------------------------------------------------------------------------
# The command line, generated from the dataclasses: one flag per field, the nested configs flattened (--gamma, --alpha,
# --temperature ...). Every field name is unique across Config and its sub-configs (a test checks it).


def flat_fields(cfg):
    """(the dataclass instance that holds it, field) for every leaf field of Config, nested configs flattened."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from flat_fields(value)
        else:
            yield cfg, f


@functools.cache
def docstrings(cls) -> dict:
    """field name -> the string literal under it in the class body (the help text of its flag)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def preset_config(name: str) -> Config:
    """Config() with a preset's values set."""
    cfg = Config(preset=name)
    values = PRESETS.get(name, {})
    for owner, f in flat_fields(cfg):
        if f.name in values:
            setattr(owner, f.name, values[f.name])
    return cfg


def parse_config(argv=None) -> Config:
    """The preset (Config() by default) with the flags given on top; --help shows the preset's values."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="default")
    preset = first.parse_known_args(argv)[0].preset
    parser = argparse.ArgumentParser(description="StepTool: SFT warm start, then step-grained PPO (python train.py).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if preset != "default" and preset not in PRESETS:
        parser.error(f"unknown --preset {preset!r}; choose from {['default', *sorted(PRESETS)]}")
    cfg = preset_config(preset)
    for owner, f in flat_fields(cfg):
        default = getattr(owner, f.name)
        text = f"{docstrings(type(owner)).get(f.name, '')} (default: {default})".strip().replace("%", "%%")
        kind = {"int": int, "float": float, "str": str, "bool": bool}[getattr(f.type, "__name__", f.type)]
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=text)
    args = vars(parser.parse_args(argv))
    for owner, f in flat_fields(cfg):
        setattr(owner, f.name, args[f.name])
    cfg.dtype = resolve_dtype(cfg.dtype, cfg.device)
    try:
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def native_bf16(device: str) -> bool:
    """Does this device multiply bfloat16 in hardware? CUDA: yes (bf16 autocast); a CPU: with AMX or AVX512-BF16."""
    if device.startswith("cuda"):
        return True
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def resolve_dtype(dtype: str, device: str) -> str:
    """--dtype auto -> bfloat16 where the device computes it natively, else float32; any other value as it is."""
    return dtype if dtype != "auto" else "bfloat16" if native_bf16(device) else "float32"


def uses_lora(cfg: Config) -> bool:
    """LoRA adapters on the pretrained model (--lora auto: with --model; on; off)."""
    return cfg.lora == "on" or (cfg.lora == "auto" and bool(cfg.model))


def validate(cfg: Config):
    """Out-of-range flags fail here with one line, before anything is built."""
    checks = [
        (cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
        (cfg.value_lr > 0, f"--value-lr must be > 0 (got {cfg.value_lr})"),
        (0 <= cfg.advantages.gamma <= 1, f"--gamma must be in [0, 1] (got {cfg.advantages.gamma})"),
        (0 <= cfg.advantages.lam <= 1, f"--lam must be in [0, 1] (got {cfg.advantages.lam})"),
        (cfg.advantages.kl_coef >= 0, f"--kl-coef must be >= 0 (got {cfg.advantages.kl_coef})"),
        (cfg.episodes_per_iter > 0, f"--episodes-per-iter must be > 0 (got {cfg.episodes_per_iter})"),
        (cfg.rollout_batch > 0, f"--rollout-batch must be > 0 (got {cfg.rollout_batch})"),
        (cfg.iters >= 0, f"--iters must be >= 0 (got {cfg.iters})"),
        (cfg.sft_test_eval or cfg.iters > 0, "--no-sft-test-eval with --iters 0 would evaluate nothing on the test "
                                             "tasks"),
        (cfg.rewards.alpha >= 0, f"--alpha must be >= 0 (got {cfg.rewards.alpha})"),
        (0 <= cfg.fault_rate <= 1, f"--fault-rate must be in [0, 1] (got {cfg.fault_rate})"),
        (0 <= cfg.sft_fault_rate <= 1, f"--sft-fault-rate must be in [0, 1] (got {cfg.sft_fault_rate})"),
        (cfg.reward in REWARDS, f"--reward must be one of {sorted(REWARDS)} (got {cfg.reward!r})"),
        (cfg.rewards.succ_calling in SUCC_CALLING,
         f"--succ-calling must be one of {sorted(SUCC_CALLING)} (got {cfg.rewards.succ_calling!r})"),
        (cfg.rewards.contribution in CONTRIBUTIONS,
         f"--contribution must be one of {sorted(CONTRIBUTIONS)} (got {cfg.rewards.contribution!r})"),
        (cfg.advantages.advantage in ("step", "token", "step-group"),
         f"--advantage must be step, token or step-group (got {cfg.advantages.advantage!r})"),
        (cfg.group_size >= 1 and cfg.episodes_per_iter % cfg.group_size == 0,
         f"--group-size must be >= 1 and divide --episodes-per-iter (got {cfg.group_size})"),
        (cfg.advantages.advantage != "step-group" or cfg.group_size >= 2,
         "--advantage step-group compares rollouts of one task: it needs --group-size >= 2 (with 1 every advantage "
         "is 0)"),
        (cfg.dtype in ("float32", "bfloat16", "float16"), f"--dtype must be auto, float32, bfloat16 or float16"),
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


# Rough seconds per unit of work for SmolLM2-135M on 2 CPU cores (README, "Where the time goes"): an SFT step of
# 8 demonstrations, one evaluated task, one RL episode (rollout + update); bfloat16 on a CPU with AMX (2026-11-27),
# float32 on an AVX2 CPU (the default run of 2026-12-07). Only for the first line a run prints.
SMOLLM2_SECONDS = {"bfloat16": dict(sft_step=16, eval_task=1.7, episode=7),
                   "float32": dict(sft_step=36, eval_task=3.5, episode=10.8)}


def run_plan(cfg: Config) -> str:
    """What this run will do, in order, with a rough duration where it is known (the default model on 2 cores)."""
    sec = SMOLLM2_SECONDS.get(resolve_dtype(cfg.dtype, cfg.device), SMOLLM2_SECONDS["float32"])
    steps = cfg.sft_epochs * cfg.sft_tasks // cfg.sft_batch
    n_sft_test = cfg.n_test if cfg.sft_test_eval else 0
    phases = [("SFT warm start", f"{steps} steps, cached for the next run", steps * sec["sft_step"]),
              ("evaluate it", f"{cfg.n_val} val + {n_sft_test} test tasks", (cfg.n_val + n_sft_test) * sec["eval_task"]),
              ("RL", f"{cfg.iters} iterations x {cfg.episodes_per_iter} episodes",
               cfg.iters * cfg.episodes_per_iter * sec["episode"]),
              ("test", f"{cfg.n_test} tasks", cfg.n_test * sec["eval_task"])]
    if cfg.eval_only:
        phases = [("evaluate", f"{cfg.n_test} test tasks", cfg.n_test * sec["eval_task"])]
    elif not cfg.iters:                          # no RL: the warm start's evaluation is the test row
        phases = phases[:2]
    timed = cfg.model == "smollm2" and cfg.device == "cpu"
    text = " -> ".join(f"{name} ({what}{f', ~{t / 60:.0f} min' if timed else ''})" for name, what, t in phases)
    return f"plan: {text}" + (f"; ~{sum(t for *_, t in phases) / 60:.0f} min on 2 CPU cores" if timed else "")
