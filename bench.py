"""Speed and memory, measured against transformers and against the machine's own matmul peak, in one process.

    python bench.py [--device cpu|cuda] [--json out.json] [--quick]
    python bench.py --model PATH|smollm2 [--dtype auto|float32|bfloat16] [--cache-dir DIR] [--json FILE] [--quick]
    python bench.py --default-run DIR [--json FILE] [train.py flags]   (issue 30: `python train.py`, cold then warm)

Every figure is the median of repeated runs after a warm-up; comparisons are ratios measured in the same process
(machines here are shared and noisy). transformers is only needed for the comparison columns.
JSON keys (numbers, null where not measured): matmul_gflops_fp32, matmul_gflops_bf16, forward_ratio_vs_transformers,
forward_ratio_vs_transformers_100m, train_step_ratio_vs_transformers, train_step_mfu_fp32, generate_ratio_vs_transformers,
kv_continuation_work_ratio, kv_continuation_time_ratio, ppo_tokens_per_s, padding_fraction, ppo_iter_peak_rss_mb.
With --model, only the real-model keys (see `bench_real`): real_forward_ratio_vs_transformers, real_ppo_step_ratio_vs_peft,
real_generate_ratio_vs_transformers, real_iteration_s, real_iteration_phase_s, real_iteration_speedup,
real_iteration_peak_rss_mb, padding_fraction (+ _off), the use_sampling_logprobs figures, real_compile_forward_speedup.
real_iteration_speedup (all speed paths on vs all off) is kept but retired as a goal: the figure that counts is the
main job's wall time. With --default-run: default_run_cold_s, default_run_cold_peak_rss_mb (an empty cache: fetch,
import, SFT, evaluation, RL, test), default_run_warm_s, default_run_warm_peak_rss_mb (the warm start cached).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from model import KVCache, ModelConfig, PolicyWithValue, Transformer, ValueHead, decode, extend


def timeit(fn, repeat: int, warmup: int = 1, device="cpu") -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(dtype, device, n=1536, repeat=5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, repeat, 2, device) / 1e9


def hf_twin(cfg: ModelConfig, ours: Transformer):
    """transformers' LlamaForCausalLM with our weights, or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf()))
    hf.load_state_dict(ours.state_dict(), strict=False)
    return hf.to(next(ours.parameters()).device).train(False)


def n_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def bench_forward_and_train(cfg, B, T, device, repeat):
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device).eval()
    hf = hf_twin(cfg, ours)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    out = {}
    with torch.no_grad():
        t_ours = timeit(lambda: ours(ids), repeat, 1, device)
        t_hf = timeit(lambda: hf(ids).logits, repeat, 1, device) if hf is not None else None
    out["forward_tokens_per_s"] = B * T / t_ours
    out["forward_ratio"] = t_hf / t_ours if t_hf else None

    def step(model, logits_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            loss = torch.nn.functional.cross_entropy(logits_of(model, ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run
    ours.train()
    t_ours = timeit(step(ours, lambda m, x: m(x)), repeat, 1, device)
    t_hf = timeit(step(hf.train(), lambda m, x: m(x).logits), repeat, 1, device) if hf is not None else None
    flops = 6 * n_params(ours) * B * T + 12 * cfg.num_hidden_layers * cfg.hidden_size * B * T * T / 2
    out["train_tokens_per_s"] = B * T / t_ours
    out["train_ratio"] = t_hf / t_ours if t_hf else None
    out["train_gflops"] = flops / t_ours / 1e9
    return out


def bench_generate(cfg, device, B=32, P=128, N=64, repeat=3):
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device).eval()
    hf = hf_twin(cfg, ours)
    prompts = torch.randint(0, cfg.vocab_size, (B, P), device=device)

    def run_ours():
        cache = KVCache(cfg, B, P + N, device, torch.float32)
        last = extend(ours, cache, prompts.tolist())
        decode(ours, cache, last, N, [-5], temperature=1.0, generator=torch.Generator(device).manual_seed(0))
    t_ours = timeit(run_ours, repeat, 1, device)
    t_hf = None
    if hf is not None:
        mask = torch.ones_like(prompts)
        with torch.no_grad():
            t_hf = timeit(lambda: hf.generate(prompts, attention_mask=mask, do_sample=True, max_new_tokens=N,
                                              min_new_tokens=N, pad_token_id=0), repeat, 1, device)
    return B * N / t_ours, (t_hf / t_ours if t_hf else None)


def bench_kv_continuation(cfg, device, B=16, P=200, steps=4, action=32, obs=48, repeat=3):
    """A 4-step episode batch: KV continuation vs re-prefilling the whole history before every step."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=g).tolist()
    # observations of different lengths per row, as in real episodes: continuation pads them into one block
    observations = [[torch.randint(0, cfg.vocab_size, (int(n),), generator=g).tolist()
                     for n in torch.randint(obs // 3, obs + 1, (B,), generator=g)] for _ in range(steps)]
    fed = {"kv": 0, "full": 0}

    def with_cache():
        cache = KVCache(cfg, B, P + steps * (action + obs) + 8, device, torch.float32)   # obs = longest
        last = extend(model, cache, prompt)
        fed["kv"] = B * P
        for s in range(steps):
            decode(model, cache, last, action, [-5], temperature=0.0)
            fed["kv"] += B * action
            if s < steps - 1:
                last = extend(model, cache, observations[s])
                fed["kv"] += B * max(map(len, observations[s]))                 # padded block, holes included

    def re_prefill():
        history = [list(p) for p in prompt]
        fed["full"] = 0
        for s in range(steps):
            cache = KVCache(cfg, B, max(map(len, history)) + action + 8, device, torch.float32)
            last = extend(model, cache, history)
            fed["full"] += B * max(map(len, history))
            tokens, _ = decode(model, cache, last, action, [-5], temperature=0.0)
            fed["full"] += B * action
            history = [h + t + (observations[s][b] if s < steps - 1 else []) for b, (h, t) in
                       enumerate(zip(history, tokens))]
    t_kv = timeit(with_cache, repeat, 1, device)
    t_full = timeit(re_prefill, repeat, 1, device)
    minimal = B * (P + steps * action) + sum(len(o) for obs_s in observations[:-1] for o in obs_s)
    return fed["kv"] / minimal, fed["full"] / minimal, t_full / t_kv


def ppo_child(quick: bool):
    """One PPO iteration of the default preset (rollout + rewards + update) in a fresh process: tokens/s, padding,
    peak RSS."""
    import cpu_speed
    import train
    from batching import collate
    from evaluation import rollout_policy
    from ppo import ppo_update
    from rewards import REWARDS
    from rollout import rollout
    from sft import corpus, train_tokenizer
    from tools import Environment, make_tasks
    cfg = train.parse_config(["--episodes-per-iter", "16" if quick else "64"])
    env, template = Environment(), cfg.rollout.template
    tok = train_tokenizer(corpus(env, make_tasks("train", 300, seed=1), template), cfg.vocab_size, template)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = cpu_speed.apply(Transformer(mcfg)) if cfg.cpu_speed else Transformer(mcfg)
    tasks = make_tasks("train", cfg.episodes_per_iter, seed=3)
    episodes = []
    for i in range(0, len(tasks), cfg.rollout_batch):
        episodes += rollout(rollout_policy(cfg)(model.eval(), tok, cfg.rollout, torch.Generator().manual_seed(0)),
                            tasks[i:i + cfg.rollout_batch], env, tok, cfg.rollout)
    for ep in episodes:
        ep.rewards = REWARDS["step"](ep, cfg.rewards)
    policy = PolicyWithValue(model.train(), ValueHead(mcfg.hidden_size))
    stats = ppo_update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-5), collate(episodes, tok.pad_id), cfg.ppo,
                       cfg.advantages)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"ppo_tokens_per_s": stats["tokens_per_s"], "padding_fraction": stats["padding_fraction"],
                      "ppo_iter_peak_rss_mb": rss}))


# ======================================================================================================================
# The real model (issue 16): SmolLM2-135M-Instruct + LoRA on the large suite.
# Every comparison runs both sides in one process on the same weights, dtype and thread count, in turn
# (A B A B ...), and reports the median of each: the cores are shared with other jobs, and a ratio measured side by
# side survives that far better than two absolute times measured minutes apart.

# The dtype of both sides: --dtype, by default train.py's `auto` (bfloat16 on a CPU that multiplies it natively,
# float32 elsewhere: an AVX2 CPU emulates bf16 ~30x slower, and the keys would time the emulation). Set by main().
REAL_DTYPE = torch.bfloat16


def autocast():
    return torch.autocast("cpu", REAL_DTYPE, enabled=REAL_DTYPE != torch.float32)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The sizes of issue 16 ("full"), and a "quick" set (--quick) that finishes on a busy machine: not comparable to full.
REAL_SIZES = {
    "full": dict(forward=(4, 512), ppo_episodes=8, generate=(32, 64), repeat=3, episodes=32, flags=[]),
    "quick": dict(forward=(2, 256), ppo_episodes=2, generate=(8, 16), repeat=1, episodes=4,
                  flags=["--max-steps", "2", "--max-action-tokens", "48"]),
}


def alternate(fns: dict, repeat: int) -> dict:
    """One warm-up call of each, then `repeat` rounds calling each in turn -> {name: median seconds}."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def smollm2_config(episodes: int, flags=()):
    """The settings of the real run (train.py --preset smollm2): LoRA rank/alpha, rollout, rewards, PPO."""
    import train
    return train.parse_config(["--preset", "smollm2", "--episodes-per-iter", str(episodes), *flags])


def expert_episodes(tok, n: int, seed: int = 0):
    """n rollout-shaped episodes (prompt, actions, observations) of the large suite's train split, by the expert."""
    from rollout import RolloutConfig, ScriptedPolicy, rollout
    from tools import Expert, make_suite
    suite, cfg = make_suite("large"), RolloutConfig(max_total_tokens=1536)
    return rollout(ScriptedPolicy(Expert(), tok, cfg), suite.tasks("train", n, seed=seed), suite.environment(), tok,
                   cfg)


def hf_model(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=REAL_DTYPE).eval()


def bench_real_forward(path, tok, repeat, B=4, T=512):
    """Full logits of B real episodes cut to T tokens, no grad: ours vs transformers, weights and autocast in REAL_DTYPE."""
    from hf import load_pretrained
    ids = torch.tensor([ep.token_ids[:T] for ep in expert_episodes(tok, B)])    # (B, T); every episode is longer
    ours, hf = load_pretrained(path, dtype=REAL_DTYPE)[0], hf_model(path)
    with torch.no_grad(), autocast():
        t = alternate({"ours": lambda: ours(ids), "hf": lambda: hf(input_ids=ids).logits}, repeat)
    return {"real_forward_ratio_vs_transformers": t["hf"] / t["ours"], "real_forward_tokens_per_s": B * T / t["ours"]}


def bench_real_compile(path, tok, repeat, B=4, T=512):
    """torch.compile on our forward (no grad, REAL_DTYPE, B real episodes cut to T tokens): compiled / eager speed, and
    the one-off compile time. Measured, not used by train.py: a training forward's lengths change every micro-batch
    and the KV cache is Python state, so there it would recompile or break the graph."""
    from hf import load_pretrained
    ids = torch.tensor([ep.token_ids[:T] for ep in expert_episodes(tok, B)])
    model = load_pretrained(path, dtype=REAL_DTYPE)[0]
    compiled = torch.compile(model)
    with torch.no_grad(), autocast():
        t0 = time.perf_counter()
        compiled(ids)
        compile_s = time.perf_counter() - t0
        t = alternate({"eager": lambda: model(ids), "compiled": lambda: compiled(ids)}, repeat)
    return {"real_compile_forward_speedup": t["eager"] / t["compiled"], "real_compile_s": compile_s}


def bench_real_ppo_step(path, tok, cfg, repeat, n_episodes=8):
    """One PPO micro-batch of expert episodes: forward, loss = −Σ log π(action tokens) / their count, backward, with
    LoRA (rank, alpha of the preset) on all 7 projections, autocast in REAL_DTYPE. Ours: frozen base stored in it, the shared
    prompt once, the LM head only where it predicts an action token. Reference: transformers + peft, full logits,
    float32 log_softmax and gather (TRL's logprobs_from_logits), masked to the action tokens."""
    import peft
    import cpu_speed
    from batching import collate, predictors, token_logprobs
    from hf import load_pretrained
    from model import add_lora, store_frozen_weights_in
    batch = collate(expert_episodes(tok, n_episodes), tok.pad_id)
    ids, att, am, prompt = batch["input_ids"], batch["attention_mask"], batch["action_mask"], \
        cpu_speed.shared_prompt_ids(batch)
    n = am.sum()
    model = store_frozen_weights_in(add_lora(load_pretrained(path)[0], r=cfg.lora_r, alpha=cfg.lora_alpha), REAL_DTYPE)
    ours = PolicyWithValue(cpu_speed.apply(model).train(), ValueHead(model.config.hidden_size))
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                           task_type="CAUSAL_LM")
    hf = peft.get_peft_model(hf_model(path), lora).train()      # adapters float32 (peft's autocast_adapter_dtype)
    losses = {}

    def ours_step():
        with autocast(), cpu_speed.shared_prompt(0 if prompt is None else prompt.shape[1]):
            logits, _ = ours(ids, att, logits_at=predictors(am))    # (N, V) at action predictors, the prompt once
            loss = -token_logprobs(logits, ids, targets=am).sum() / n
        loss.backward()
        ours.zero_grad(set_to_none=True)
        losses["ours"] = loss.item()

    def hf_step():
        with autocast():
            logits = hf(input_ids=ids, attention_mask=att).logits                  # (B, T, V)
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)   # (B, T−1)
        loss = -logp[am[:, 1:]].sum() / n
        loss.backward()
        hf.zero_grad(set_to_none=True)
        losses["peft"] = loss.item()
    t = alternate({"ours": ours_step, "peft": hf_step}, repeat)
    return {"real_ppo_step_ratio_vs_peft": t["peft"] / t["ours"], "real_ppo_step_s": t["ours"],
            "real_ppo_step_tokens": int(att.sum()), "real_ppo_step_loss": losses}    # the losses agree: same task


def bench_real_generate(path, tok, cfg, repeat, B=32, N=64):
    """B real large-suite prompts, N sampled tokens each (no stop): our rollout path (ModelPolicy.start + act: KV
    cache, the shared system prompt prefilled once) vs transformers.generate (left padding, min_new_tokens = N)."""
    from dataclasses import replace
    import cpu_speed
    from hf import load_pretrained
    from rollout import TEMPLATES, system_prompt
    from tools import make_suite
    suite = make_suite("large")
    env, template = suite.environment(), TEMPLATES[cfg.rollout.template]
    prompts = [tok.encode(template.prompt.format(system=system_prompt(env, task, cfg.rollout.schema_format),
                                                 user=task.query)) for task in suite.tasks("train", B, seed=0)]
    ours, hf = cpu_speed.apply(load_pretrained(path, dtype=REAL_DTYPE)[0]), hf_model(path)
    T = cfg.rollout.temperature
    one_step = replace(cfg.rollout, max_steps=1, max_action_tokens=N, max_obs_tokens=0)   # cache sized for N tokens

    def ours_generate():
        policy = cpu_speed.ModelPolicy(ours, tok, one_step, torch.Generator().manual_seed(0))
        policy.stop_ids = []                         # NOTE: no stop token, so every row samples N tokens, like HF's
        with policy.running():
            policy.start(prompts)
            tokens, _ = policy.act(None, [N] * B)
        assert all(len(t) == N for t in tokens)
    W = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (W - len(p)) + p for p in prompts])              # (B, W), left padding
    mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in prompts])

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=T, top_k=0, top_p=1.0,
                              max_new_tokens=N, min_new_tokens=N, pad_token_id=tok.pad_id)
        assert out.shape[1] == W + N
    t = alternate({"ours": ours_generate, "hf": hf_generate}, repeat)
    return {"real_generate_ratio_vs_transformers": t["hf"] / t["ours"], "real_generate_tokens_per_s": B * N / t["ours"],
            "real_generate_prompt_tokens": sum(map(len, prompts))}


def sampling_vs_fresh(policy, batch, ppo_cfg, temperature):
    """The tolerance question of use_sampling_logprobs: |log π from the rollout − log π of a fresh training forward|
    on action tokens (REAL_DTYPE), and ppo_update's no-grad pass (1) timed with log-probs and with values only."""
    import cpu_speed
    from batching import predictors, token_logprobs
    ids, att, am = batch["input_ids"], batch["attention_mask"], batch["action_mask"]
    plan = cpu_speed.SharedPromptMicrobatches.of_batch(batch, ppo_cfg)    # the prompt once per forward, no rounding
    fresh, t = torch.zeros(ids.shape), {"with_logprobs": 0.0, "values_only": 0.0}
    with torch.no_grad(), autocast(), plan.forwards():
        for rows, L, _, _ in plan(list(range(len(ids)))):
            idx = torch.tensor(rows)
            x, a, targets = ids[idx, :L], att[idx, :L], am[idx, :L]
            t0 = time.perf_counter()
            logits, _ = policy(x, a, logits_at=predictors(targets))
            fresh[idx, :L] = token_logprobs(logits, x, targets=targets, temperature=temperature)
            t1 = time.perf_counter()
            policy(x, a, logits_at=torch.zeros_like(targets))           # V only: no LM head
            t["with_logprobs"], t["values_only"] = t["with_logprobs"] + t1 - t0, t["values_only"] + time.perf_counter() - t1
    diff = (fresh - batch["old_logprobs"])[am].abs()
    return {"sampling_logprob_max_abs_diff": diff.max().item(), "sampling_logprob_mean_abs_diff": diff.mean().item(),
            "old_logprobs_pass_s": t}


def peak_rss_mb(reset: bool = False) -> float | None:
    """This process's peak resident memory (VmHWM, MB) since the last reset; reset=True then starts a new peak
    (Linux: writing 5 to /proc/self/clear_refs). None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return peak
    except (OSError, StopIteration):
        return None


def real_iteration(path, episodes: int, on: bool, flags=(), seed: int = 0) -> dict:
    """One StepTool iteration of the smollm2 preset (rollout at its temperature, step rewards, collate, ppo_update
    against the LoRA-disabled reference) with every speed feature on, or all off: --cpu-speed (cpu_speed.py: the
    shared prompt once in rollouts and training, once per optimizer step in the update; decode on prepacked weights;
    lengths rounded to 64; glibc's allocator), action-only logits, frozen base in REAL_DTYPE (off: float32, cast by
    autocast in training; rollouts run without autocast, as in train.py, so in float32), use_sampling_logprobs,
    micro-batches padded ≤ max_padding; on also has the preset's activation checkpointing (memory for more update
    time). Phase times from timestamps: the rollout (+ rewards, collate); ppo_update's pass (1) until its first
    grad-enabled policy call, split into the reference calls and the rest (π_old, V_old, advantages); the update from
    there to the end. Peak resident memory per phase: loading (the model, LoRA, the REAL_DTYPE cast), rollout, pass (1)
    (old log-probs + reference), update."""
    import cpu_speed
    from batching import Microbatches, collate, predictors, token_logprobs
    from evaluation import rollout_policy
    from hf import load_pretrained
    from model import add_lora, lora_disabled, store_frozen_weights_in
    from ppo import ppo_update
    from rewards import REWARDS
    from rollout import rollout
    from tools import make_suite
    cfg = smollm2_config(episodes, flags)
    cfg.cpu_speed = cfg.ppo.action_logits_only = cfg.ppo.use_sampling_logprobs = on
    cfg.ppo.max_padding = cfg.ppo.max_padding if on else 1.0           # off: micro-batches by token budget only
    cfg.checkpoint_layers = cfg.checkpoint_layers and on                # a memory switch the preset turns on
    temperature = cfg.rollout.temperature           # π is softmax(logits / T), the distribution that was sampled
    trim = cpu_speed.tune_allocator() if on else (lambda: None)   # as train.py (process-wide: one process per setting)
    torch.manual_seed(seed)
    model, tok = load_pretrained(path)
    model.checkpoint_layers = cfg.checkpoint_layers
    add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha)
    if on:
        cpu_speed.apply(store_frozen_weights_in(model, REAL_DTYPE))
    value_head = ValueHead(model.config.hidden_size)
    policy = PolicyWithValue(model, value_head, detach_critic=cfg.detach_critic)
    actor = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": actor, "lr": cfg.lr},
                                   {"params": list(value_head.parameters()), "lr": cfg.value_lr}], weight_decay=0.0)
    suite = make_suite("large")
    env, tasks, gen = suite.environment(), suite.tasks("train", episodes, seed=seed + 1), torch.Generator().manual_seed(seed)

    peaks = {"load": peak_rss_mb(reset=True)}
    t0 = time.perf_counter()
    model.eval()
    eps = []
    for i in range(0, episodes, cfg.rollout_batch):
        eps += rollout(rollout_policy(cfg)(model, tok, cfg.rollout, gen), tasks[i:i + cfg.rollout_batch], env, tok,
                       cfg.rollout)
    for ep in eps:
        ep.rewards = REWARDS[cfg.reward](ep, cfg.rewards)
    batch = collate(eps, tok.pad_id)
    t_rollout = time.perf_counter() - t0
    trim()                                          # as train.py does after each rollout and update
    peaks["rollout"] = peak_rss_mb(reset=True)
    model.train()
    extra = sampling_vs_fresh(policy, batch, cfg.ppo, temperature) if on else {}        # not timed
    peak_rss_mb(reset=True)                         # nor is its memory part of the iteration
    marks = {"reference": 0.0, "first_grad": None}

    def mark_first_grad():
        if torch.is_grad_enabled() and marks["first_grad"] is None:
            marks["first_grad"] = time.perf_counter()
            peaks["old_logprobs_and_reference"] = peak_rss_mb(reset=True)

    def timed_policy(*args, **kwargs):
        mark_first_grad()
        return policy(*args, **kwargs)
    timed_policy.model = model                      # what the shared prompt's micro-batches look for (cpu_speed)

    class Timed(cpu_speed.SharedPromptMicrobatches if on else Microbatches):
        @contextmanager
        def forwards(self, policy=None, autocast=None):     # the update's first step starts with its prompt
            if policy is not None:
                mark_first_grad()
            with super().forwards(policy, autocast):
                yield

    def reference(input_ids, attention_mask, targets=None):   # train.py's: the policy, adapters off
        t = time.perf_counter()
        with lora_disabled(model):
            logits = model(input_ids, attention_mask, logits_to_keep=None if targets is None else predictors(targets))
        out = token_logprobs(logits, input_ids, targets=targets, temperature=temperature)
        marks["reference"] += time.perf_counter() - t
        return out
    t1 = time.perf_counter()
    stats = ppo_update(timed_policy, optimizer, batch, cfg.ppo, cfg.advantages, reference_logprobs_fn=reference,
                       autocast_dtype=None if REAL_DTYPE == torch.float32 else REAL_DTYPE, generator=gen,
                       temperature=temperature, microbatches=Timed)
    t2 = time.perf_counter()
    peaks["update"] = peak_rss_mb()
    trim()
    phases = {"rollout": t_rollout, "old_logprobs": marks["first_grad"] - t1 - marks["reference"],
              "reference": marks["reference"], "update": t2 - marks["first_grad"]}
    prompt = cpu_speed.shared_prompt_ids(batch) if on else None
    return {"s": t2 - t0, "phase_s": phases, "phase_peak_rss_mb": peaks, "padding_fraction": stats["padding_fraction"],
            "tokens": int(batch["attention_mask"].sum()), "action_tokens": int(batch["action_mask"].sum()),
            "steps": sum(len(ep.steps) for ep in eps), "prefix_len": 0 if prompt is None else prompt.shape[1], **extra}


def real_iteration_child(path, size, which):
    """In a fresh process (glibc's malloc settings are per process): the iteration with everything on, or all off,
    and the process's peak RSS, loading the model included."""
    s = REAL_SIZES[size]
    r = real_iteration(path, s["episodes"], which == "on", s["flags"])
    # the process's peak: the largest phase peak (resetting VmHWM per phase resets ru_maxrss as well)
    r["peak_rss_mb"] = max(r["phase_peak_rss_mb"].values())
    print(json.dumps(r))


def bench_real(path, size, json_file="") -> dict:
    from hf import Tokenizer
    s = REAL_SIZES[size]
    with open(f"{path}/config.json") as f:
        cfg, tok = smollm2_config(s["episodes"], s["flags"]), Tokenizer.from_dir(path, json.load(f))
    r = {"size": size, "threads": torch.get_num_threads(), "model": path, "dtype": str(REAL_DTYPE)}
    # The iteration child first, while this process holds no model: run after the parts below, the two processes
    # together (transformers + peft + ours here, ~12 GB) were OOM-killed on a 24 GB machine.
    it = {}
    for which in ("on", "off"):
        child = subprocess.run([sys.executable, __file__, "--model", path, "--iteration-child", which, "--dtype",
                                str(REAL_DTYPE).removeprefix("torch.")]
                               + ["--quick"] * (size == "quick"), stdout=subprocess.PIPE, text=True, check=True)
        it[which] = json.loads(child.stdout.strip().splitlines()[-1])
    for part in (lambda: bench_real_forward(path, tok, s["repeat"], *s["forward"]),
                 lambda: bench_real_ppo_step(path, tok, cfg, s["repeat"], s["ppo_episodes"]),
                 lambda: bench_real_generate(path, tok, cfg, s["repeat"], *s["generate"]),
                 lambda: bench_real_compile(path, tok, s["repeat"], *s["forward"])):
        r |= part()
        gc.collect()                                 # each part's models go before the next part loads its own
        if json_file:                                # each part as it finishes: a long run leaves partial results
            report(r, json_file, quiet=True)
    on, off = it["on"], it["off"]
    r.update(real_iteration_s=on["s"], real_iteration_phase_s=on["phase_s"], real_iteration_off_s=off["s"],
             real_iteration_off_phase_s=off["phase_s"], real_iteration_speedup=off["s"] / on["s"],
             real_iteration_peak_rss_mb=on["peak_rss_mb"], real_iteration_off_peak_rss_mb=off["peak_rss_mb"],
             real_iteration_phase_peak_rss_mb=on["phase_peak_rss_mb"],
             real_iteration_off_phase_peak_rss_mb=off["phase_peak_rss_mb"],
             padding_fraction=on["padding_fraction"], padding_fraction_off=off["padding_fraction"],
             real_iteration_episodes=s["episodes"],
             real_iteration_tokens={"on": on["tokens"], "off": off["tokens"]},
             real_iteration_action_tokens={"on": on["action_tokens"], "off": off["action_tokens"]},
             real_iteration_prefix_len=on["prefix_len"],
             sampling_logprob_max_abs_diff=on["sampling_logprob_max_abs_diff"],
             sampling_logprob_mean_abs_diff=on["sampling_logprob_mean_abs_diff"],
             # use_sampling_logprobs: pass (1) still runs the forward for V_old, without the LM head; what that saves
             # is with_logprobs − values_only
             old_logprobs_pass_s=on["old_logprobs_pass_s"],
             use_sampling_logprobs_could_save_s=on["old_logprobs_pass_s"]["with_logprobs"]
             - on["old_logprobs_pass_s"]["values_only"])
    return r


def default_run(directory: str, train_flags=()) -> dict:
    """`python train.py` as a child process, cold (empty --cache-dir) and then warm (the same cache, a new --out): the
    wall time and the peak RSS of each (wait4's rusage: the child and every process it waited for, pip included)."""
    r = {}
    for which in ("cold", "warm"):
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
               "--out", os.path.join(directory, which), "--cache-dir", os.path.join(directory, "cache"), *train_flags]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} exited with {os.waitstatus_to_exitcode(status)}")
        r[f"default_run_{which}_s"] = time.perf_counter() - t0
        r[f"default_run_{which}_peak_rss_mb"] = usage.ru_maxrss / 1024
    return r


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="small sizes, ~1 minute")
    parser.add_argument("--model", default="", help="PATH of an imported checkpoint, or smollm2: the real-model keys")
    parser.add_argument("--cache-dir", default="runs/cache", help="where --model smollm2 is fetched and imported")
    parser.add_argument("--default-run", default="", metavar="DIR",
                        help="time `python train.py` cold and warm as child processes, in DIR (empty it first)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the real-model keys' weights and autocast (auto: as train.py --dtype auto)")
    parser.add_argument("--ppo-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--iteration-child", choices=["on", "off"], help=argparse.SUPPRESS)
    args, train_flags = parser.parse_known_args()
    if train_flags and not args.default_run:
        parser.error(f"unrecognized arguments: {' '.join(train_flags)}")
    global REAL_DTYPE
    from config import resolve_dtype
    REAL_DTYPE = getattr(torch, resolve_dtype(args.dtype, "cpu"))
    if args.default_run:
        return report(default_run(args.default_run, train_flags), args.json)
    if args.ppo_child:
        return ppo_child(args.quick)
    if args.iteration_child:
        return real_iteration_child(args.model, "quick" if args.quick else "full", args.iteration_child)
    if args.model:
        from gguf_import import resolve_model
        size = "quick" if args.quick else "full"
        return report(bench_real(resolve_model(args.model, args.cache_dir), size, args.json), args.json)
    dev, repeat = args.device, 3 if args.quick else 5
    torch.manual_seed(0)
    import train
    d = train.parse_config([])
    default = ModelConfig(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                          num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                          num_key_value_heads=d.num_kv_heads, tie_word_embeddings=True)
    big = ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4)
    r = {"matmul_gflops_fp32": matmul_gflops(torch.float32, dev), "matmul_gflops_bf16": matmul_gflops(torch.bfloat16, dev)}
    small = bench_forward_and_train(default, 8, 512, dev, repeat)
    r.update(forward_ratio_vs_transformers=small["forward_ratio"], train_step_ratio_vs_transformers=small["train_ratio"],
             train_step_mfu_fp32=small["train_gflops"] / r["matmul_gflops_fp32"],
             forward_tokens_per_s=small["forward_tokens_per_s"], train_tokens_per_s=small["train_tokens_per_s"])
    if not args.quick:
        large = bench_forward_and_train(big, 2, 256, dev, 3)
        r.update(forward_ratio_vs_transformers_100m=large["forward_ratio"],
                 train_step_ratio_vs_transformers_100m=large["train_ratio"],
                 train_step_mfu_fp32_100m=large["train_gflops"] / r["matmul_gflops_fp32"])
    gen_tps, gen_ratio = bench_generate(default, dev, repeat=2 if args.quick else 3)
    r.update(generate_tokens_per_s=gen_tps, generate_ratio_vs_transformers=gen_ratio)
    kv_work, full_work, time_ratio = bench_kv_continuation(default, dev, repeat=2 if args.quick else 3)
    r.update(kv_continuation_work_ratio=kv_work, reprefill_work_ratio=full_work, kv_continuation_time_ratio=time_ratio)
    child = subprocess.run([sys.executable, __file__, "--ppo-child"] + (["--quick"] if args.quick else []),
                           capture_output=True, text=True, check=True)
    r.update(json.loads(child.stdout.strip().splitlines()[-1]))
    report(r, args.json)


def report(r: dict, json_file: str, quiet=False):
    """Print the table (nested dicts one row per entry) and write the JSON."""
    rows = [(f"{k}.{k2}" if isinstance(v, dict) else k, x) for k, v in r.items()
            for k2, x in (v.items() if isinstance(v, dict) else [(None, v)])]
    width = max(len(k) for k, _ in rows)
    for k, v in [] if quiet else rows:
        print(f"{k:<{width}}  {'null' if v is None else f'{v:.3f}' if isinstance(v, float) else v}")
    if json_file:
        with open(json_file, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
