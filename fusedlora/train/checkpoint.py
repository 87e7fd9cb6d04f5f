"""Checkpoints: written whole or not at all, read back exactly.

Layout of an output directory DIR:

    DIR/checkpoint-000100/             one complete checkpoint
        adapter_config.json            the adapter, PEFT format (fl.save_adapter)
        adapter_model.safetensors
        optimizer.safetensors          the trainable parameters and AdamW's moments and step, by parameter name
                                       (whole tensors, also when --fsdp shards them across processes)
        rng.safetensors                torch's generator states, one per process (CPU, and CUDA if used)
        trainer_state.json             step, config, data position, scheduler and optimizer settings, log
    DIR/adapter_config.json            the latest checkpoint's adapter, for PEFT and fl.load_adapter
    DIR/adapter_model.safetensors
    DIR/trainer_state.json             the latest checkpoint's trainer_state.json, naming its folder

A checkpoint is written into DIR/.tmp-checkpoint-N (its trainer_state.json last) and renamed to
DIR/checkpoint-N; then the adapter files are copied up and DIR/trainer_state.json is replaced, last. Every
replacement is a rename, so a kill at any moment leaves DIR/trainer_state.json naming a complete folder:
the previous checkpoint until the new one is wholly in place. Older folders are removed only after that.
Tensors go to safetensors, everything else to JSON: loading a checkpoint never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, replaced in one rename (a kill leaves the old file or the new one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def latest(out_dir: str) -> dict | None:
    """The latest complete checkpoint's trainer state, or None when DIR holds none."""
    path = os.path.join(out_dir, STATE)
    return read_json(path) if os.path.isfile(path) else None


def require_latest(out_dir: str) -> dict:
    """The state to resume from; a clear error when there is none or its folder is not whole."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--resume: the output directory {out_dir} does not exist (no checkpoint to resume)")
    state = latest(out_dir)
    if state is None:
        raise FileNotFoundError(f"--resume: {out_dir} holds no checkpoint ({STATE} not found)")
    folder = os.path.join(out_dir, state.get("checkpoint", ""))
    missing = [f for f in (STATE, OPTIMIZER, RNG, *ADAPTER_FILES) if not os.path.isfile(os.path.join(folder, f))]
    if not state.get("checkpoint") or missing:
        raise FileNotFoundError(f"--resume: checkpoint folder {folder} is missing {missing or 'its name'}")
    inner = read_json(os.path.join(folder, STATE))
    if inner.get("step") != state.get("step"):
        raise ValueError(f"--resume: {folder}/{STATE} is at step {inner.get('step')}, {out_dir}/{STATE} at "
                         f"step {state.get('step')}")
    return state


def remove_stale(out_dir: str, keep: str | None) -> None:
    """Remove unfinished temporary folders and checkpoint folders other than ``keep``."""
    if not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        if name.startswith(TMP_PREFIX) or (name.startswith(PREFIX) and name != keep):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one (FSDP2's DTensor) gathered from every process, which must all call this
    in the same order; any other tensor as it is."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(src: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``src`` (a whole tensor, the same on every process) laid out as ``p``: this process's shard when ``p`` is
    sharded (a collective, like ``full``), else ``src`` itself."""
    if isinstance(p, DTensor) and src.shape == p.shape:
        return distribute_tensor(src.to(p.device), p.device_mesh, p.placements)
    return src


def optimizer_tensors(params: list[tuple[str, torch.nn.Parameter]], optimizer) -> dict[str, torch.Tensor]:
    """The parameters and the optimizer's per-parameter state, keyed by parameter name; sharded tensors are
    gathered whole, so the file is the same whether the run shards them or not."""
    sd = optimizer.state_dict()["state"]
    out = {}
    for i, (name, p) in enumerate(params):
        out[f"param/{name}"] = full(p)
        for key, value in sd.get(i, {}).items():
            out[f"{key}/{name}"] = full(value) if torch.is_tensor(value) else torch.tensor(value)
    return {k: v.to("cpu").contiguous() for k, v in out.items()}


def optimizer_groups(optimizer) -> list[dict]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
            for g in optimizer.state_dict()["param_groups"]]


def save(out_dir: str, step: int, state: dict, save_adapter, tensors: dict, rng: dict) -> str:
    """Write checkpoint ``step`` (see the module docstring). ``save_adapter(dir)`` writes the adapter files."""
    name = f"{PREFIX}{step:06d}"
    tmp = os.path.join(out_dir, f"{TMP_PREFIX}{name}")
    final = os.path.join(out_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_adapter(tmp)
    save_file(tensors, os.path.join(tmp, OPTIMIZER))
    save_file(rng, os.path.join(tmp, RNG))
    state = {**state, "step": step, "checkpoint": name}
    write_json(os.path.join(tmp, STATE), state)
    # A folder of this name can only be an orphan of a killed run (the current state names an older step).
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for f in ADAPTER_FILES:
        _replace_copy(os.path.join(final, f), os.path.join(out_dir, f))
    write_json(os.path.join(out_dir, STATE), state)
    remove_stale(out_dir, keep=name)
    return final


def load(out_dir: str, state: dict, params: list[tuple[str, torch.nn.Parameter]], optimizer) -> dict:
    """Restore the parameters and optimizer of checkpoint ``state``; returns the RNG tensors."""
    folder = os.path.join(out_dir, state["checkpoint"])
    tensors = load_file(os.path.join(folder, OPTIMIZER))
    names = [n for n, _ in params]
    stored = sorted(k.split("/", 1)[1] for k in tensors if k.startswith("param/"))
    if stored != sorted(names):
        raise ValueError(f"--resume: the checkpoint's trainable parameters differ from the model's "
                         f"(only in checkpoint: {sorted(set(stored) - set(names))[:5]}, "
                         f"only in model: {sorted(set(names) - set(stored))[:5]})")
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, name = key.split("/", 1)
        by_name.setdefault(name, {})[kind] = value
    opt_state = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(params):
            entry = by_name[name]
            src = entry.pop("param")
            if src.shape != p.shape or src.dtype != p.dtype:
                raise ValueError(f"--resume: parameter {name} is {tuple(src.shape)} {src.dtype} in the checkpoint, "
                                 f"{tuple(p.shape)} {p.dtype} in the model")
            if isinstance(p, DTensor):
                p.to_local().copy_(_like(src, p).to_local())
            else:
                p.copy_(src)
            if entry:
                opt_state[i] = {k: _like(v, p) for k, v in entry.items()}
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return load_file(os.path.join(folder, RNG))
