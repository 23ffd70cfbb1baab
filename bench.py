"""Speed and memory, measured against transformers and against the machine's own matmul peak, in one process.

    python bench.py [--device cpu|cuda] [--json out.json] [--quick]

Every figure is the median of repeated runs after a warm-up; comparisons are ratios measured in the same process
(machines here are shared and noisy). transformers is only needed for the comparison columns.
JSON keys (numbers, null where not measured): matmul_gflops_fp32, matmul_gflops_bf16, forward_ratio_vs_transformers,
forward_ratio_vs_transformers_100m, train_step_ratio_vs_transformers, train_step_mfu_fp32, generate_ratio_vs_transformers,
kv_continuation_work_ratio, kv_continuation_time_ratio, ppo_tokens_per_s, padding_fraction, ppo_iter_peak_rss_mb.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

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
    import train
    from ppo import ppo_update
    from rewards import REWARDS
    from rollout import ModelPolicy, collate, rollout
    from sft import corpus, train_tokenizer
    from tools import Environment, make_tasks
    cfg = train.parse_config(["--episodes-per-iter", "16" if quick else "64"])
    env = Environment()
    tok = train_tokenizer(corpus(env, make_tasks("train", 300, seed=1), cfg.template), cfg.vocab_size, cfg.template)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(mcfg)
    tasks = make_tasks("train", cfg.episodes_per_iter, seed=3)
    episodes = []
    for i in range(0, len(tasks), cfg.rollout_batch):
        episodes += rollout(ModelPolicy(model.eval(), tok, cfg.rollout, torch.Generator().manual_seed(0)),
                            tasks[i:i + cfg.rollout_batch], env, tok, cfg.rollout)
    for ep in episodes:
        ep.rewards = REWARDS["step"](ep, cfg.rewards)
    policy = PolicyWithValue(model.train(), ValueHead(mcfg.hidden_size))
    stats = ppo_update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-5), collate(episodes, tok.pad_id), cfg.ppo)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"ppo_tokens_per_s": stats["tokens_per_s"], "padding_fraction": stats["padding_fraction"],
                      "ppo_iter_peak_rss_mb": rss}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="small sizes, ~1 minute")
    parser.add_argument("--ppo-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ppo_child:
        return ppo_child(args.quick)
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
    width = max(map(len, r))
    for k, v in r.items():
        print(f"{k:<{width}}  {'null' if v is None else f'{v:.3f}' if isinstance(v, float) else v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
