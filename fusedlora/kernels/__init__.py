"""Triton kernels, one concern per file. Imported lazily by the ops (importing triton is not free)."""

import os


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then run on CPU tensors, with a single launch config)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
