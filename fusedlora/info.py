"""What runs here: versions, GPU, the CUDA extension, the backend family (``fusedlora info``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from . import __version__
from ._ext import EXTENSION_ERROR, extension_loaded
from .ops.backend import ENV_VAR, backend


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gib = p.total_memory / 2**30
            gpus.append(f"{p.name} (sm_{p.major}{p.minor}, {gib:.0f} GiB, {p.multi_processor_count} SMs)")
    try:
        chosen = backend()
    except (RuntimeError, ValueError) as exc:
        chosen = f"error: {exc}"
    return {
        "fusedlora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "GPU": "; ".join(gpus) if gpus else "none",
        "CUDA extension": "loaded" if extension_loaded() else f"not loaded ({EXTENSION_ERROR})",
        ENV_VAR: os.environ.get(ENV_VAR, "unset"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
        "backend": chosen,
    }


def report() -> str:
    rows = collect()
    width = max(map(len, rows))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())
