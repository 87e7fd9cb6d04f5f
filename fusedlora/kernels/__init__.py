"""Triton kernels, one concern per file. Imported lazily by the ops (importing triton is not free)."""

import contextlib
import os

import torch


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then run on CPU tensors, with a single launch config)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(device: torch.device):
    """Context in which launches go to ``device``: Triton launches on the current CUDA device, so a layer on
    cuda:1 must make cuda:1 current (a no-op context for CPU tensors under the interpreter)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
