"""Dropout keep-masks drawn with Philox from (seed, offset), regenerated wherever they are needed.

For a 2-D input x [M, K] the element (m, k) has offset ``m*K + k`` (its flat index) and is kept iff
``tl.rand(seed, m*K + k) >= p``, i.e. with probability 1 - p. Every kernel that applies dropout (the
forward pre-kernel, the dX and dA kernels) calls ``keep`` with these offsets, so the mask is never stored:
forward and backward agree because they recompute the same numbers. ``tl.rand`` splits 64-bit offsets
into two Philox counter words, so offsets below 2^32 give the same numbers whether computed in int32 or
int64, and inputs with M*K >= 2^31 elements draw distinct numbers.

The seed is an int64 scalar read from a 1-element device tensor (drawn by the op from torch's default
generator of x's device), so drawing it never synchronizes the host with the device.

``dropout_mask(seed, shape, p, device)`` materializes the bool keep-mask (x's shape; leading dimensions
are flattened into M, which keeps the flat index) so that tests can hand it to the reference op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def keep(seed, offsets, p):
    """Bool keep-mask for ``offsets`` (flat indices m*K + k): rand >= p, so P(keep) = 1 - p."""
    return tl.rand(seed, offsets) >= p


@triton.jit
def _dropout_mask_kernel(
    # pointers
    seed_ptr, out_ptr,
    # sizes
    numel, p,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    kept = keep(seed, offs, p)
    tl.store(out_ptr + offs, kept.to(tl.int8), mask=offs < numel)


_MASK_BLOCK = 1024


def seed_tensor(seed, device) -> torch.Tensor:
    """The 1-element int64 device tensor the kernels read their seed from (an int or such a tensor)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed: expected a 1-element int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2^63), got {seed!r}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def dropout_mask(seed, shape, p: float, device) -> torch.Tensor:
    """Bool keep-mask of ``shape`` the kernels use for ``seed`` and drop probability ``p``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a float in [0, 1), got {p!r}")
    device = torch.device(device)
    out = torch.empty(tuple(shape), dtype=torch.int8, device=device)
    numel = out.numel()
    if numel:
        grid = (triton.cdiv(numel, _MASK_BLOCK),)
        _dropout_mask_kernel[grid](seed_tensor(seed, device), out, numel, float(p), BLOCK=_MASK_BLOCK)
    return out.view(torch.bool)


def aot_specs() -> list[dict]:
    return [
        {
            "name": "dropout_mask",
            "fn": _dropout_mask_kernel,
            "signature": {"seed_ptr": "*i64", "out_ptr": "*i8", "numel": "i64", "p": "fp32",
                          "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": _MASK_BLOCK},
            "num_warps": 4,
            "num_stages": 1,
            "large_m_gemm": False,
        }
    ]
