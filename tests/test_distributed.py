"""Data-parallel training on CPU with gloo, through PyTorch's own launcher (`python -m torch.distributed.run`, the
module behind `torchrun`): the same flags on 2 processes, one update equal to one update on 1 process, FSDP2."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

import distributed
from hf import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def run(args, nproc=None, timeout=300):
    """`python SCRIPT ARGS` or `torchrun --nproc_per_node N SCRIPT ARGS`; one thread per process (2 cores here)."""
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class FakeDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: counts the micro-batches run under no_sync()."""

    def __init__(self):
        super().__init__()
        self.unsynced = 0

    @contextmanager
    def no_sync(self):
        self.unsynced += 1
        yield


def test_ddp_micro_batches_weigh_n_and_all_but_the_last_skip_the_gradient_all_reduce():
    module = FakeDDP()
    micro = distributed.DataParallel(module, world=2, fsdp=False).microbatches([[0], [1, 2], [3]])
    assert [(rows, weight) for rows, weight, _ in micro] == [([0], 2.0), ([1, 2], 2.0), ([3], 2.0)]
    for _, _, grad_sync in micro:
        with grad_sync:
            pass
    assert module.unsynced == 2


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--fsdp"], ["--fsdp", "--lora"]], ids=["ddp", "fsdp", "fsdp-lora"])
def test_one_update_on_two_ranks_with_half_the_episodes_each_equals_one_update_on_one_rank(tmp_path, flags):
    run([WORKER, str(tmp_path / "one"), *flags])
    run([WORKER, str(tmp_path / "two"), *flags], nproc=2)
    one, two = (load_file(str(tmp_path / name / "params.safetensors")) for name in ("one", "two"))
    stats = [json.load(open(tmp_path / name / "stats.json")) for name in ("one", "two")]
    assert [s["world"] for s in stats] == [1, 2]
    assert sorted(one) == sorted(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    # The same batch statistics: token counts, whitening and the KL are global, not per rank.
    for key in ("loss", "pg_loss", "v_loss", "entropy", "grad_norm", "reward", "kl", "explained_variance"):
        assert abs(stats[1][key] - stats[0][key]) <= 1e-5 * max(1.0, abs(stats[0][key])), key
    # ...and the update was not a no-op: the trained weights moved far beyond the tolerance.
    initial = load_file(str(tmp_path / "one" / "initial.safetensors"))
    assert stats[0]["optimizer_steps"] == 2 and stats[0]["skipped_steps"] == 0
    assert max((one[n] - initial[n]).abs().max().item() for n in one) > 5e-4


def train(tmp, *args, nproc=2):
    return run(["train.py", "--preset", "smoke", "--cache-dir", str(tmp / "cache"), *args], nproc=nproc)


@pytest.mark.slow
def test_a_two_process_torchrun_smoke_run_writes_one_log_and_one_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train(tmp_path, "--out", str(out), "--iters", "2", "--keep-checkpoints", "1")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in records] == [0, 1]                 # rank 0 alone logs: one record per iteration
    assert sorted(p for p in os.listdir(out) if p.startswith("ckpt-")) == ["ckpt-000001"]
    assert result.stdout.count("Test split") == 1                  # and prints
    # The checkpoint holds every parameter of the final model, whole and equal to it (after the last iteration).
    model, _ = load_pretrained(str(out / "final"))
    saved = load_file(str(out / "ckpt-000001" / "trainable.safetensors"))
    final = {f"model.{name}": p for name, p in model.named_parameters()}
    assert sorted(saved) == sorted(final)
    for name, p in final.items():
        torch.testing.assert_close(saved[name], p.detach(), atol=0, rtol=0, msg=name)


@pytest.mark.slow
def test_fsdp_checkpoints_hold_whole_tensors_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tmp_path, "--fsdp", "--out", str(straight), "--iters", "2")
    train(tmp_path, "--fsdp", "--out", str(resumed), "--iters", "1")
    result = train(tmp_path, "--fsdp", "--out", str(resumed), "--iters", "2", "--resume")
    assert "resumed from" in result.stdout and "at iteration 1" in result.stdout
    # Gathered on rank 0, not one rank's shard: the embedding has the whole vocabulary.
    config = json.load(open(straight / "final" / "config.json"))
    weights = load_file(str(straight / "ckpt-000001" / "trainable.safetensors"))
    assert weights["model.model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    optimizer = load_file(str(straight / "ckpt-000001" / "optimizer.safetensors"))
    assert optimizer["state.model.model.embed_tokens.weight.exp_avg"].shape == weights[
        "model.model.embed_tokens.weight"].shape
    a, b = (load_file(str(run_dir / "final" / "model.safetensors")) for run_dir in (straight, resumed))
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    logs = [[json.loads(line)["return"] for line in open(run_dir / "metrics.jsonl")] for run_dir in (straight, resumed)]
    assert logs[0] == logs[1]
