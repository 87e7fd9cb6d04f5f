"""Dropout keep-masks drawn with Philox from (seed, counter), regenerated wherever they are needed.

One Philox call (10 rounds) gives four 32-bit outputs, and each of them decides one element, so a mask
costs a quarter of a call per element. For a 2-D input x [M, K] element (m, k) takes output ``k % 4`` of
the call with counter ``m * ceil(K / 4) + k // 4`` (groups of four never straddle two rows, so any tile
whose columns start at a multiple of 4 draws whole calls), and is kept iff that output is
>= ``threshold(p)`` = round(p · 2³²), i.e. with probability 1 − p up to 2⁻³². Every kernel that applies
dropout (the forward pre-kernel, the dX and dA kernels) calls ``keep_tile`` with these counters, so the
mask is never stored: forward and backward agree because they recompute the same numbers. Counters are
int64 (Philox takes them as two 32-bit words), so inputs with M·K ≥ 2³¹ elements draw distinct numbers.

The seed is an int64 scalar read from a 1-element device tensor (drawn by the op from torch's default
generator of x's device), so drawing it never synchronizes the host with the device.

``dropout_mask(seed, shape, p, device)`` materializes the bool keep-mask (x's shape; leading dimensions
are flattened into M) so that tests can hand it to the reference op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_guard


def threshold(p: float) -> int:
    """The uint32 threshold of drop probability p: an output u keeps its element iff u >= threshold."""
    return min(int(round(p * 2.0**32)), 2**32 - 1)


@triton.jit
def keep_tile(seed, rows, k0, K, thresh, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Bool keep-mask [BLOCK_M, BLOCK_K] of the elements (rows[i], k0 + j); rows int64, k0 % 4 == 0."""
    groups = (K + 3) // 4
    c = rows[:, None] * groups + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    u0, u1, u2, u3 = tl.randint4x(seed, c)
    # element 4c + i takes output i: interleave the four outputs along K
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK_M, BLOCK_K))
    return u >= thresh.to(tl.uint32)


@triton.jit
def _dropout_mask_kernel(
    # pointers
    seed_ptr, out_ptr,
    # sizes
    M, K, thresh,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    kept = keep_tile(seed, rows, k0, K, thresh, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], kept.to(tl.int8),
             mask=(rows < M)[:, None] & (cols < K)[None, :])


_MASK_BLOCK_M = 16
_MASK_BLOCK_K = 64


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
    if out.numel():
        k = out.shape[-1]
        m = out.numel() // k
        grid = (triton.cdiv(m, _MASK_BLOCK_M), triton.cdiv(k, _MASK_BLOCK_K))
        with device_guard(device):
            _dropout_mask_kernel[grid](seed_tensor(seed, device), out, m, k, threshold(p),
                                       BLOCK_M=_MASK_BLOCK_M, BLOCK_K=_MASK_BLOCK_K)
    return out.view(torch.bool)


def aot_specs() -> list[dict]:
    return [
        {
            "name": "dropout_mask",
            "fn": _dropout_mask_kernel,
            "signature": {"seed_ptr": "*i64", "out_ptr": "*i8", "M": "i32", "K": "i32", "thresh": "i64",
                          "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"},
            "constexprs": {"BLOCK_M": _MASK_BLOCK_M, "BLOCK_K": _MASK_BLOCK_K},
            "num_warps": 4,
            "num_stages": 1,
            "large_m_gemm": False,
        }
    ]
