"""Data-parallel training with PyTorch's own engine: `torchrun` + DistributedDataParallel, or FSDP2 (`fully_shard`).

Who calls it: train.py (set-up, sharding the episodes, gathering results, wrapping the policy, saving). ppo.py never
imports it: `wrap` attaches a `DataParallel` to the module it returns, as `module.data_parallel`, and ppo_update
runs through its three hooks (ppo.OneProcess is the same three for one process; see ppo.py's contract).

Why a module of its own: process-group set-up, which rank does what, and the FSDP details (gathering parameters for
generation and for saving) would bury train.py's loop. In a single process without torchrun every function here is
a no-op or the identity, so `python train.py` runs exactly as it would without this file.

Who does what (N ranks):
 1. Every rank rolls out its own share of each iteration's episodes, with its own seed stream: (seed, iteration,
    rank). The task sample and the PPO mini-batch shuffle are the same on every rank (seeded by (seed, iteration)).
 2. Gradients are averaged by DDP (all-reduce) or FSDP (reduce-scatter). ppo.py sums its normalisers (action-token
    counts) and batch statistics (advantage whitening, KL) over ranks and multiplies the loss by N, through the
    hooks of `DataParallel`, so one update with B/N episodes on each of N ranks equals one update with B episodes on
    one rank (tests/test_distributed.py).
 3. Evaluation shards the val/test tasks over ranks and gathers the episodes: every rank gets the global metrics.
 4. Only rank 0 prints, writes logs, progress bars, checkpoints and the final model. With --fsdp, gathering the
    weights for a save is collective (every rank takes part) and rank 0 writes.
 5. The SFT warm start is trained and cached by rank 0 while the others wait at a barrier, then loaded by them.

FSDP (`--fsdp`): every transformer block, the whole model, and the value head are `fully_shard`-ed: parameters,
gradients and optimizer state live in 1/N shards, gathered one block at a time for a forward or backward. For
rollouts (hundreds of small forwards) `gathered()` keeps the whole model gathered for the duration instead of
re-gathering every block at every generated token; that needs one full copy of the weights per device, which the
8B LoRA setting affords (README, "Scaling out").
"""
from __future__ import annotations

import gc
import os
import sys
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def main(self) -> bool:                      # the rank that prints and writes files
        return self.rank == 0


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: str, fsdp: bool = False) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR ...).
    Without torchrun: a single process, nothing initialised. Backend nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(fsdp=fsdp), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank)   # one GPU per process: --device cuda means "my GPU"
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    elif device == "cpu":
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        raise ValueError(f"--device {device}: distributed training supports cpu (gloo) and cuda (nccl)")
    return Dist(rank, world, local_rank, fsdp), dev


def shutdown():
    """Leave the process group, on every rank, after the program's objects are gone (train.py and the test worker
    call it once main has returned). NOTE: this is where a SIGABRT at exit came from ("terminate called without an
    active exception", about 1 run in 30 of two gloo ranks under load): DDP's reducer and FSDP's device meshes keep
    the process group and its last work objects alive after destroy_process_group, in reference cycles, until
    interpreter finalization; a gloo thread that then releases a tensor needs the GIL, is ended by the finalizing
    interpreter, and the C++ runtime aborts. So: all ranks finish their collectives together (barrier, skipped on an
    error, where a peer may never arrive), then the group is destroyed and the cycles collected while Python is
    fully alive."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks (a new tensor; the identity in a single process)."""
    if not initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def shard(items: list, d: Dist) -> list:
    """This rank's share: items rank, rank + N, rank + 2N, ..."""
    return items[d.rank::d.world]


def gather(items: list, d: Dist) -> list:
    """Every rank's list, concatenated in rank order (episodes, for global metrics). Uses torch's object collective,
    which pickles: only between our own ranks, never for anything read from disk or the network."""
    if d.world == 1:
        return items
    out = [None] * d.world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def max_over_ranks(x: float, d: Dist) -> float:
    """For timings: an iteration takes as long as its slowest rank."""
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# ----------------------------------------------------------------------------------------------------------------------
# Wrapping the policy


def wrap(policy, d: Dist, device: torch.device):
    """The module ppo_update trains: the policy itself (1 process), DDP(policy), or the policy with FSDP2 applied
    in place (every block, the model, the value head); on N ranks it carries its `data_parallel` hooks."""
    if d.world == 1:
        return policy
    if d.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in policy.model.model.layers:
            fully_shard(block)
        fully_shard(policy.model)                # a root of its own: rollouts and the reference call it directly
        if policy.value_head is not None:          # None: a critic-free advantage
            fully_shard(policy.value_head)
        module = policy
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
    module.data_parallel = DataParallel(module, d.world, d.fsdp)
    return module


class DataParallel:
    """What ppo_update needs on N ranks, as three hooks (ppo.OneProcess has the same three for one process).

    DDP and FSDP average the gradients over ranks; ppo.py normalises each loss by the action-token count of the whole
    mini-batch (all ranks: `all_sum`), so the loss is multiplied by N and N ranks take exactly the step one rank
    would take on all the episodes."""

    def __init__(self, module, world: int, fsdp: bool):
        self.module = weakref.proxy(module)  # weak: the module holds this object (no cycle; see shutdown)
        self.world, self.fsdp = world, fsdp

    @staticmethod
    def all_sum(x: torch.Tensor) -> torch.Tensor:
        return all_sum(x)

    def microbatches(self, groups: list) -> list:
        """[(rows, loss weight, gradient-sync context)] for one optimizer step's micro-batches (or one forward pass):
         - weight N (see the class docstring);
         - FSDP: every forward all-gathers weights, a collective, so every rank runs as many micro-batches as the
           busiest one: the list is padded with repeats of its last group, of weight 0. (DDP only communicates on
           the synced backward.)
         - gradients cross ranks once per optimizer step: every micro-batch but the last runs under `no_sync`."""
        n_real = len(groups)
        if self.fsdp:
            n = torch.tensor([n_real])
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            groups = groups + [groups[-1]] * (int(n) - n_real)
        return [(group, float(self.world) if j < n_real else 0.0, nullcontext() if j == len(groups) - 1 else
                 self.no_sync()) for j, group in enumerate(groups)]

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm; returns it, before clipping, as a plain tensor (FSDP: the DTensor of the
        shards' norms made whole)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @contextmanager
    def no_sync(self):
        """Accumulate this backward's gradients locally, without crossing ranks: DDP's no_sync, FSDP2's
        set_requires_gradient_sync(False)."""
        if not self.fsdp:
            with self.module.no_sync():
                yield
            return
        mods = _fsdp_modules(self.module)
        for m in mods:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in mods:
                m.set_requires_gradient_sync(True, recurse=False)


def shard_reference(reference, d: Dist):
    """FSDP: shard the frozen reference policy like the policy (when it is a separate copy, i.e. without LoRA)."""
    if d.fsdp and d.world > 1:
        from torch.distributed.fsdp import fully_shard
        for block in reference.model.layers:
            fully_shard(block)
        fully_shard(reference)
    return reference


def _fsdp_modules(module):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model, d: Dist):
    """FSDP: keep every parameter gathered (unsharded) inside the block, e.g. for a rollout's hundreds of decode
    forwards; resharded on exit. No-op without FSDP."""
    if not d.fsdp or d.world == 1:
        yield model
        return
    mods = _fsdp_modules(model)
    for m in mods:                  # gather now, on every rank, so a rank with nothing to generate cannot stall the
        m.set_reshard_after_forward(False)          # others' first forward
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_state(policy, optimizer, d: Dist) -> tuple[dict, dict | None]:
    """FSDP: the full (unsharded) state dicts of the policy and of the optimizer, on CPU, on rank 0 (empty
    elsewhere). Collective: every rank must call it. Optimizer state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(policy, options=options)
    optim_sd = get_optimizer_state_dict(policy, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def load_full_optimizer_state(policy, optimizer, optim_sd: dict):
    """FSDP: load a full, name-keyed optimizer state (as `full_state` returns it) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=optim_sd,
                             options=StateDictOptions(full_state_dict=True))
