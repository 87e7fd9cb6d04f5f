"""Triton kernels, one concern per file. Imported lazily by the ops (importing triton is not free)."""
