"""Dropout keep-masks drawn with Philox from (seed, counter), saved as bits by the forward.

One Philox4x32-10 call gives four 32-bit outputs; each output decides two elements with its two 16-bit
halves, so one call covers 8 elements (~11 instructions per element in the sm_90 build instead of ~90 for
a call per element). For a 2-D input x [M, K] element (m, k) is decided by the call with counter
``m * ceil(K / 8) + k // 8``: with i = k % 8, output i // 2, its low half for even i, high half for odd i.
It is kept iff that 16-bit number is >= ``threshold(p)`` = round(p · 2¹⁶), i.e. with probability 1 − p
up to 2⁻¹⁷. Groups of 8 never straddle two rows, so a tile whose columns start at a multiple of 8 draws
whole calls, and each call yields one byte of the mask directly (``keep_bytes``).

The forward pre-kernel draws the mask, applies it and saves it as bits, 1 per element ([M, ceil(K / 8)]
bytes, bit i of byte j is column 8j + i); the dX and dA kernels read those bits (``load_bits``) instead of
drawing again. Counters are int64 (Philox takes them as two 32-bit words), so inputs with M·K ≥ 2³¹
elements draw distinct numbers.

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
    """The 16-bit threshold of drop probability p: a 16-bit draw u keeps its element iff u >= threshold."""
    return min(int(round(p * 2.0**16)), 2**16 - 1)


@triton.jit
def _keep_pair(u, t, shift: tl.constexpr):
    """Bits ``shift`` (low half of u) and ``shift + 1`` (high half) of a mask byte."""
    return (((u & 0xFFFF) >= t).to(tl.uint8) << shift) | (((u >> 16) >= t).to(tl.uint8) << (shift + 1))


@triton.jit
def keep_bytes(seed, rows, k0, K, thresh, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask of elements (rows[i], k0 + j), j < BLOCK_K, as uint8 [BLOCK_M, BLOCK_K // 8]: bit i of
    byte j is column k0 + 8j + i. rows int64, k0 % 8 == 0. One Philox call per byte."""
    c = rows[:, None] * ((K + 7) // 8) + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    u0, u1, u2, u3 = tl.randint4x(seed, c)
    t = thresh.to(tl.uint32)
    return _keep_pair(u0, t, 0) | _keep_pair(u1, t, 2) | _keep_pair(u2, t, 4) | _keep_pair(u3, t, 6)


@triton.jit
def unpack_bits(byte, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_K] of a [BLOCK_M, BLOCK_K // 8] byte tile (bit i of byte j: column 8j + i)."""
    shifts = tl.arange(0, 8).to(tl.uint8)
    return tl.reshape((byte[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_M, BLOCK_K)) != 0


@triton.jit
def load_bits(bits_ptr, rows, k0, KB, row_mask, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Bool keep-mask [BLOCK_M, BLOCK_K] of columns k0.. (k0 % 8 == 0) from a saved [M, KB] bit mask."""
    jb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    byte = tl.load(bits_ptr + rows[:, None] * KB + jb[None, :], mask=row_mask[:, None] & (jb < KB)[None, :],
                   other=0)
    return unpack_bits(byte, BLOCK_M, BLOCK_K)


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
    kept = unpack_bits(keep_bytes(seed, rows, k0, K, thresh, BLOCK_M, BLOCK_K), BLOCK_M, BLOCK_K)
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
