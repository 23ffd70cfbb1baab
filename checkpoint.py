"""Crash-safe checkpoints and exact resume.

Who calls it: train.py, once per iteration (`save`) and at start-up with --resume (`check_resume`, `latest`,
`load_state`).

Why a module of its own: writing atomically, keeping the last K, and restoring optimizer and RNG states is
bookkeeping that would bury train.py's loop.

A checkpoint is a directory `ckpt-000042/` holding
    model/                      the policy in the Hugging Face layout (LoRA merged: loads anywhere)
    trainable.safetensors       the trainable weights as they are (LoRA adapters unmerged, or the whole model)
    value_head.safetensors      the critic
    optimizer.safetensors       optimizer tensors ("state.<param index or name>.<exp_avg ...>"); the rest in state.json
    rng.safetensors             torch RNG state (a uint8 tensor)
    state.json                  iteration, config, metrics so far, optimizer param groups, Python/NumPy RNG states
Guarantees:
 1. Atomic: everything is written into `ckpt-000042.tmp/`, each file fsync-ed, then the directory is renamed; a crash
    mid-write leaves only a `.tmp` directory that `latest` ignores and the next save removes.
 2. Nothing is pickled: tensors go through safetensors, everything else through JSON.
 3. A checkpoint never holds a non-finite value: `save` refuses with an error naming the tensor.
"""
from __future__ import annotations

import ast
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
from dataclasses import asdict

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hf import save_pretrained, strip_prefix

_NAME = re.compile(r"^ckpt-(\d{6})$")


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict, path: str):
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"refusing to checkpoint: tensor '{name}' has non-finite values")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _optimizer_tensors(sd: dict) -> tuple[dict, dict]:
    """An optimizer state dict -> (tensors "state.<param>.<name>", JSON). <param> is the parameter's index, or its
    name when the state was gathered from FSDP shards."""
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"state.{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save(run_dir: str, iteration: int, model, tokenizer, value_head, optimizer, config: dict, metrics: list,
         trainable: dict, keep: int = 3, extra: dict | None = None, full: tuple | None = None) -> str:
    """Write checkpoint `iteration` atomically and keep only the newest `keep` checkpoints. `full`: (policy state,
    optimizer state) gathered from FSDP shards (distributed.full_state), used instead of the sharded modules."""
    if full is not None:
        policy_state, optimizer_state = full
        trainable = {n: policy_state[n] for n in trainable}
        head_state = strip_prefix(policy_state, "value_head.")
    else:
        policy_state, optimizer_state = None, optimizer.state_dict()
        head_state = {} if value_head is None else dict(value_head.state_dict())     # None: critic-free
    final = os.path.join(run_dir, f"ckpt-{iteration:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_pretrained(model, tokenizer, os.path.join(tmp, "model"),
                    state=policy_state and strip_prefix(policy_state, "model."))
    _save_tensors(trainable, os.path.join(tmp, "trainable.safetensors"))
    _save_tensors(head_state, os.path.join(tmp, "value_head.safetensors"))
    opt_tensors, opt_json = _optimizer_tensors(optimizer_state)
    _save_tensors(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    _save_tensors({"torch": torch.get_rng_state()}, os.path.join(tmp, "rng.safetensors"))
    np_state = np.random.get_state()
    state = {"iteration": iteration, "config": config, "metrics": metrics, "optimizer": opt_json,
             "python_rng": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
             "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]], "extra": extra or {}}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)                      # the commit point
    _fsync_dir(run_dir)
    for old in sorted(checkpoints(run_dir))[:-keep]:
        shutil.rmtree(os.path.join(run_dir, f"ckpt-{old:06d}"), ignore_errors=True)
    return final


def checkpoints(run_dir: str) -> list[int]:
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(run_dir)) if m)


def latest(run_dir: str) -> str | None:
    found = checkpoints(run_dir)
    return os.path.join(run_dir, f"ckpt-{found[-1]:06d}") if found else None


def load_state(path: str, trainable_params: dict, value_head) -> dict:
    """Restore weights and RNG states in place; return state.json (iteration, metrics, optimizer state ...). Call it
    before the model is wrapped (DDP, FSDP), then `load_optimizer` once the optimizer exists."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        weights = load_file(os.path.join(path, "trainable.safetensors"))
        head = load_file(os.path.join(path, "value_head.safetensors"))
        rng = load_file(os.path.join(path, "rng.safetensors"))
    except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as e:
        raise ValueError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    missing = set(trainable_params) - set(weights)
    if missing:
        raise ValueError(f"cannot resume from {path}: checkpoint lacks {sorted(missing)[0]} (different --model/LoRA?)")
    with torch.no_grad():
        for name, p in trainable_params.items():
            p.copy_(weights[name])
    if value_head is not None:
        value_head.load_state_dict(head)
    torch.set_rng_state(rng["torch"])
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return state


def load_optimizer(path: str, optimizer, state: dict, policy=None):
    """Restore the optimizer of `load_state`'s checkpoint. Index-keyed state (one process, DDP) loads directly;
    name-keyed state (gathered from FSDP shards) is scattered back to this rank's shards through `policy`."""
    try:
        opt_tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    sd = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, v in list(opt_tensors.items()) + list(state["optimizer"]["scalars"].items()):
        param, name = key.removeprefix("state.").rsplit(".", 1)
        sd["state"].setdefault(int(param) if param.isdigit() else param, {})[name] = v
    if all(isinstance(k, int) for k in sd["state"]):
        optimizer.load_state_dict(sd)
    else:
        from distributed import load_full_optimizer_state
        load_full_optimizer_state(policy, optimizer, sd)


# ----------------------------------------------------------------------------------------------------------------------
# Provenance: what produced a result


REPO = os.path.dirname(os.path.abspath(__file__))


def source_hash(paths: list[str]) -> str:
    """A short hash of the code of these source files (relative to the repository; a folder: its *.py files): their
    syntax trees without comments and bare strings (docstrings), so an edit of an explanation keeps the key and any
    edit of code changes it. (Hashing the bytes, three docstring edits once orphaned a 38-minute warm start.) The
    tree's printed form can differ between Python versions: another Python, another key."""
    h = hashlib.sha256()
    for path in sorted(paths):
        full = os.path.join(REPO, path)
        files = sorted(os.path.join(full, f) for f in os.listdir(full) if f.endswith(".py")) if os.path.isdir(full) \
            else [full]
        for file in files:
            h.update(os.path.relpath(file, REPO).encode())
            with open(file, "rb") as f:
                h.update(code_of(f.read()).encode())
    return h.hexdigest()[:12]


class _Docstrings(ast.NodeTransformer):
    def visit_Expr(self, node):                      # a bare string statement does nothing: drop it
        is_text = isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        return None if is_text else node


def code_of(source: bytes) -> str:
    """The syntax tree of a Python source, printed without positions, comments or docstrings."""
    return ast.dump(_Docstrings().visit(ast.parse(source)))


def git_state() -> dict:
    """{"commit": HEAD or None outside a git checkout, "dirty": uncommitted changes to tracked files}."""
    def git(*args):
        done = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except OSError:                                  # no git on this machine
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def provenance() -> dict:
    """What produced a result: the code (git commit, dirty tree), torch, threads, Python, machine, date."""
    return {**git_state(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# Flags that may change when a run is resumed; any other change would continue one experiment as another (seen: a
# resume with another --token-budget retrained the SFT warm start under the checkpoint's adapters). --n-test only
# sizes the final evaluation: a finished run resumed with another one is re-evaluated (experiment.py --n-test); a run
# directory may be moved or copied (--out).
RESUMABLE_CHANGES = {"resume", "out", "iters", "eval_every", "keep_checkpoints", "max_bad_iters", "checkpoint_layers",
                     "n_test"}


def check_resume(cfg):
    """--resume: refuse, in one line, a checkpoint saved with other settings (before any work is done)."""
    path = cfg.resume and latest(cfg.out)
    if not path:
        return
    flat = lambda c: {f"{k}.{j}" if isinstance(v, dict) else k: w for k, v in c.items()  # noqa: E731
                      for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}
    try:
        with open(os.path.join(path, "state.json")) as f:
            saved = flat(json.load(f)["config"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    for key, value in flat(asdict(cfg)).items():
        if key.split(".")[-1] not in RESUMABLE_CHANGES and saved.get(key, value) != value:
            flag = "--" + key.split(".")[-1].replace("_", "-")
            raise ValueError(f"cannot resume from {path}: it was saved with {flag} {saved[key]}, not {value}; "
                             f"resume with the settings it started with")
