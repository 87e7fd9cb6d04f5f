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
replacement is a rename, so a kill at any moment leaves a complete checkpoint folder: the previous one
until the new one is wholly in place. A kill between the new folder's rename and DIR/trainer_state.json's
replacement leaves the file naming the previous one; ``latest`` searches the trainer's folders too and
resumes from the newest complete one. Older folders are removed only after DIR/trainer_state.json names a
newer one, and only folders the trainer's manifest names (outdir.py): nothing else in DIR is touched.
Files get the user's umask. Tensors go to safetensors, everything else to JSON: loading a checkpoint
never unpickles anything; a damaged file is an error naming it.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from . import outdir

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
write_json = outdir.write_json


def _replace_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)




def read_json(path: str, what: str = "--resume") -> dict:
    """A JSON object from ``path``; a damaged file is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is damaged (not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {path} is damaged (not UTF-8 text)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: {path} is damaged (expected a JSON object, got {type(obj).__name__})")
    return obj


def _step_of(name: str) -> int | None:
    tail = name[len(PREFIX):]
    return int(tail) if name.startswith(PREFIX) and tail.isdigit() else None


def _complete(out_dir: str, name: str) -> dict | None:
    """The trainer state of checkpoint folder ``name`` when it is whole, else None."""
    folder = os.path.join(out_dir, name)
    if any(not os.path.isfile(os.path.join(folder, f)) for f in (STATE, OPTIMIZER, RNG, *ADAPTER_FILES)):
        return None
    try:
        state = read_json(os.path.join(folder, STATE))
    except (OSError, ValueError):
        return None
    return state if state.get("checkpoint") == name and state.get("step") == _step_of(name) else None


def latest(out_dir: str) -> dict | None:
    """The newest complete checkpoint's trainer state, or None when DIR holds none.

    DIR/trainer_state.json names the newest checkpoint except after a kill between a checkpoint folder's
    rename and that file's replacement; the folders the trainer owns are searched too, so such a checkpoint
    is found rather than orphaned."""
    if not os.path.isdir(out_dir):
        return None
    top = os.path.join(out_dir, STATE)
    best = read_json(top) if os.path.isfile(top) else None
    if best is not None and _complete(out_dir, str(best.get("checkpoint", ""))) is None:
        best = None
    for name in outdir.owned(out_dir):
        step = _step_of(name)
        if step is not None and (best is None or step > best["step"]):
            best = _complete(out_dir, name) or best
    return best


def require_latest(out_dir: str) -> dict:
    """The state to resume from; a clear error when there is none or its files are damaged."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--resume: the output directory {out_dir} does not exist (no checkpoint to resume)")
    top = os.path.join(out_dir, STATE)
    if not os.path.isfile(top) and not any(_step_of(n) is not None for n in outdir.owned(out_dir)):
        raise FileNotFoundError(f"--resume: {out_dir} holds no checkpoint ({STATE} not found)")
    state = latest(out_dir)
    if state is None:
        named = read_json(top) if os.path.isfile(top) else {}
        folder = os.path.join(out_dir, str(named.get("checkpoint", "")))
        missing = [f for f in (STATE, OPTIMIZER, RNG, *ADAPTER_FILES) if not os.path.isfile(os.path.join(folder, f))]
        raise FileNotFoundError(f"--resume: {out_dir} holds no complete checkpoint ({folder} is missing "
                                f"{missing or 'nothing but its trainer state does not match'})")
    folder = os.path.join(out_dir, state["checkpoint"])
    for name in (OPTIMIZER, RNG):
        _check_safetensors(os.path.join(folder, name))
    return state


def _check_safetensors(path: str) -> None:
    """Reads the header and checks that every tensor's bytes lie inside the file (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header size out of range")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            raise ValueError(f"{size} bytes, the header describes {8 + n + max(ends, default=0)}")
    except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--resume: {path} is damaged ({exc})") from None


def remove_stale(out_dir: str, keep: str | None) -> None:
    """Remove the trainer's own unfinished temporary folders and its checkpoint folders older than ``keep``
    (the checkpoint DIR/trainer_state.json names). Nothing the manifest does not name is touched."""
    keep_step = _step_of(keep) if keep else None
    for name in sorted(outdir.owned(out_dir)):
        tmp = os.path.join(out_dir, f"{TMP_PREFIX}{name}")
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        step = _step_of(name)
        if step is not None and (keep_step is None or step < keep_step):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            outdir.disown(out_dir, name)


def promote(out_dir: str, state: dict) -> None:
    """Make checkpoint ``state`` the one DIR's top-level files show (after a kill left them at an older one)."""
    top = os.path.join(out_dir, STATE)
    current = read_json(top) if os.path.isfile(top) else {}
    if current.get("checkpoint") != state["checkpoint"]:
        folder = os.path.join(out_dir, state["checkpoint"])
        for f in ADAPTER_FILES:
            _replace_copy(os.path.join(folder, f), os.path.join(out_dir, f))
        write_json(top, state)


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
    mine = name in outdir.owned(out_dir)
    outdir.own(out_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_adapter(tmp)
    save_file(tensors, os.path.join(tmp, OPTIMIZER))
    save_file(rng, os.path.join(tmp, RNG))
    state = {**state, "step": step, "checkpoint": name}
    write_json(os.path.join(tmp, STATE), state)
    outdir.user_modes(tmp)
    if os.path.exists(final):
        if not mine:
            raise FileExistsError(f"{final} exists and was not made by this trainer; it was left as it is")
        shutil.rmtree(final)  # an incomplete orphan of an earlier run (a complete one would have been resumed)
    os.rename(tmp, final)
    for f in ADAPTER_FILES:
        _replace_copy(os.path.join(final, f), os.path.join(out_dir, f))
    write_json(os.path.join(out_dir, STATE), state)
    remove_stale(out_dir, keep=name)
    return final


def load(out_dir: str, state: dict, params: list[tuple[str, torch.nn.Parameter]], optimizer) -> dict:
    """Restore the parameters and optimizer of checkpoint ``state``; returns the RNG tensors."""
    folder = os.path.join(out_dir, state["checkpoint"])
    tensors = _load_tensors(os.path.join(folder, OPTIMIZER))
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
    return _load_tensors(os.path.join(folder, RNG))


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"--resume: {path} is damaged ({str(exc).splitlines()[0] if str(exc) else exc})") from None
