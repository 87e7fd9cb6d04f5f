"""One scratch buffer per device for the dequant path's decoded weight, shared by every layer.

The dequant path (``ops.paths``) decodes a 4-bit W[N, K] into this buffer right before the dense fused
GEMM that reads it, forward and dX alike, and nothing keeps a reference to the decoded weight after the
GEMM is launched: kernels on one stream run in order, so the next layer may overwrite it. The buffer grows
to the largest weight seen (the smaller one is dropped first, so the peak extra memory is one layer's
weight in the compute dtype) and comes from torch's caching allocator; ``release_scratch`` hands it back.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[torch.device, torch.Tensor] = {}


def weight_scratch(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [n, k] tensor of ``dtype`` on ``device`` viewing the device's scratch buffer (contents undefined)."""
    device = torch.device(device)
    need = n * k * torch.empty((), dtype=dtype).element_size()
    buf = _BUFFERS.get(device)
    if buf is None or buf.numel() < need:
        _BUFFERS.pop(device, None)  # freed before the larger one is allocated: one weight at a time
        buf = torch.empty(max(need, 16), dtype=torch.uint8, device=device)
        _BUFFERS[device] = buf
    return buf[:need].view(dtype).view(n, k)


def scratch_nbytes(device=None) -> int:
    """Bytes held by the scratch buffer of ``device`` (all devices when None)."""
    if device is None:
        return sum(b.numel() for b in _BUFFERS.values())
    buf = _BUFFERS.get(torch.device(device))
    return 0 if buf is None else buf.numel()


def release_scratch(device=None) -> None:
    """Drop the scratch buffer of ``device`` (all devices when None); the caching allocator gets it back."""
    if device is None:
        _BUFFERS.clear()
    else:
        _BUFFERS.pop(torch.device(device), None)
