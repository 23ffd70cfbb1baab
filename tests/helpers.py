"""Test-only conveniences built on model.py (not used by training, so they live here)."""
import torch

from model import KVCache, decode, extend


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens=64, stop_ids=None, **sampling):
    """A fresh cache, one extend over the prompts, one decode. -> (tokens, logprobs) as python lists."""
    p = next(model.parameters())
    cache = KVCache(model.config, len(prompts), max(map(len, prompts)) + int(torch.as_tensor(max_new_tokens).max()),
                    p.device, p.dtype)
    last = extend(model, cache, prompts)
    return decode(model, cache, last, max_new_tokens, tokenizer.eos_ids if stop_ids is None else stop_ids, **sampling)
