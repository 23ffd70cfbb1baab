"""One PPO update of a small Transformer on a fixed synthetic batch, for tests/test_distributed.py.

    python tests/distributed_worker.py OUT [--fsdp] [--lora]                              one process, B episodes
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT    2 ranks, B/2 episodes each

Rank 0 writes OUT/params.safetensors (the full policy after the update), OUT/initial.safetensors (before)
and OUT/stats.json (ppo_update's statistics).
"""
import argparse
import copy
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distributed  # noqa: E402
from model import ModelConfig, PolicyWithValue, Transformer, ValueHead, add_lora, lora_disabled  # noqa: E402
from batching import collate, token_logprobs  # noqa: E402
from advantages import AdvantageConfig  # noqa: E402
from ppo import PPOConfig, ppo_update  # noqa: E402
from rollout import Episode, Step  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

VOCAB = 50


def synthetic_episodes(n: int, seed: int = 0) -> list[Episode]:
    """Prompt, then 1-3 steps of (action tokens, observation tokens), random rewards, varied lengths."""
    rng = random.Random(seed)
    tokens = lambda lo, hi: [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    episodes = []
    for _ in range(n):
        ep, k = Episode(task=None), rng.randint(1, 3)
        ep.append(tokens(3, 8), False, -1)
        for s in range(k):
            ep.append(tokens(2, 6), True, s)
            if s < k - 1:
                ep.append(tokens(2, 5), False, s)
            ep.steps.append(Step("", None, None, "", True))
        ep.rewards = [rng.uniform(-1, 1) for _ in range(k)]
        episodes.append(ep)
    return episodes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--episodes", type=int, default=8)
    args = p.parse_args()
    d, device = distributed.init("cpu", fsdp=args.fsdp)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Transformer(config)
    if args.lora:
        add_lora(model, r=4, alpha=8)
        for n, q in model.named_parameters():     # B = 0 at init: give the adapters a non-zero start
            if "lora_B" in n:
                torch.nn.init.normal_(q, std=0.02)
    head = ValueHead(config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, std=0.1)
    policy = PolicyWithValue(model, head)
    initial = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    reference = None if args.lora else copy.deepcopy(model).requires_grad_(False)
    wrapped = distributed.wrap(policy, d, device)
    if reference is not None and d.fsdp:
        distributed.shard_reference(reference, d)

    def reference_logprobs(ids, mask, targets=None):     # the dense path: ppo reads only the action tokens
        if reference is None:
            with lora_disabled(model):
                return token_logprobs(model(ids, attention_mask=mask), ids)
        return token_logprobs(reference(ids, attention_mask=mask), ids)

    # SGD, not Adam: Adam would hide a wrongly scaled gradient (its step is invariant to the scale)
    optimizer = torch.optim.SGD([q for q in policy.parameters() if q.requires_grad], lr=0.5, momentum=0.9)
    batch = collate(distributed.shard(synthetic_episodes(args.episodes), d), pad_id=0)
    cfg = PPOConfig(ppo_epochs=2, minibatches=1, token_budget=48)   # 48: several micro-batches
    stats = ppo_update(wrapped, optimizer, batch, cfg, AdvantageConfig(kl_coef=0.1),
                       reference_logprobs_fn=reference_logprobs, generator=torch.Generator().manual_seed(0))
    state = distributed.full_state(policy, None, d)[0] if d.fsdp and d.world > 1 else policy.state_dict()
    if d.main:
        os.makedirs(args.out, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(args.out, "params.safetensors"))
        save_file(initial, os.path.join(args.out, "initial.safetensors"))
        with open(os.path.join(args.out, "stats.json"), "w") as f:
            json.dump({"world": d.world, **stats}, f)


if __name__ == "__main__":
    try:
        main()
    finally:  # as train.py: once main's modules are gone (distributed.shutdown says why)
        distributed.shutdown()
