"""INT4 group-wise asymmetric: per row and group of g (64 or 128) consecutive K elements a scale and
an integer zero point; w = (q - zero) * scale, computed in fp32, then cast.

Layout of W[N, K] (K a multiple of g, so rows never share a byte or a group):

    data   uint8 [N, K/2]      row n:  byte j = (q[n, 2j] << 4) | q[n, 2j+1]

             byte:   0            1            2               K/2-1
          row 0:  [q00 | q01]  [q02 | q03]  [q04 | q05]  ...  [.. | q0,K-1]
                   7..4 3..0
          row 1:  [q10 | q11]  ...
    scales float32 [N, K/g]    scales[n, k // g]
    zeros  uint8   [N, K/g]    zeros[n, k // g], in 0..15

How kernels read it:
- a K-tiled GEMM loads W[n, k0:k0+BK] as the BK/2 consecutive bytes data[n, k0/2 : (k0+BK)/2] of one
  row (BK a divisor of g keeps one scale and zero per tile row, or BK a multiple of g uses BK/g of them);
  element k sits in byte k >> 1, high nibble when k is even.
- a 16-byte-load GEMV reads 32 consecutive codes of one row per load. g/2 is 32 or 64 bytes, a multiple
  of 16, and rows start at n*K/2 bytes, a multiple of 32: every aligned 16-byte load lies inside one
  group of one row, so it needs a single (scale, zero).

Quantization (the reference rule): per group, lo = min(min(w), 0), hi = max(max(w), 0) so that 0.0 is
exactly representable; scale = (hi - lo) / 15 (1.0 for an all-zero group); zero = round(-lo / scale)
clamped to 0..15; q = clamp(round(w / scale) + zero, 0, 15), rounding half to even, all in fp32.
"""

from __future__ import annotations

import torch

from .nibbles import pack_nibbles, unpack_nibbles
from .packed import GROUP_SIZES, Packed4bit, check_finite_weight


def check_int4_args(shape, group_size: int) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape: expected a 2-D weight [N, K] with N, K >= 1, got {tuple(shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES}, got {group_size}")
    if shape[1] % group_size:
        raise ValueError(
            f"w: INT4 needs K (the last dimension) to be a multiple of group_size={group_size}, got shape "
            f"{tuple(shape)}; use group_size in {GROUP_SIZES} dividing K, or scheme='nf4' (any shape)"
        )


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> Packed4bit:
    """Group-wise asymmetric 4-bit quantization of a 2-D bf16/fp16/fp32 weight (rule in the docstring)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"w: expected dtype bfloat16, float16 or float32, got {w.dtype}")
    check_int4_args(tuple(w.shape), group_size)
    check_finite_weight(w)
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo = g.amin(dim=2).clamp(max=0.0)
    hi = g.amax(dim=2).clamp(min=0.0)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(g / scale.unsqueeze(2)) + zero.unsqueeze(2)).clamp(0, 15).to(torch.uint8)
    data = pack_nibbles(q).view(n, k // 2)
    return Packed4bit(
        "int4", data, (int(n), int(k)), group_size, scales=scale.contiguous(), zeros=zero.to(torch.uint8)
    )


def dequantize_int4(packed: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """The plain-torch oracle: W[N, K] = ((q - zero) * scale) in fp32, cast once to ``dtype``."""
    n, k = packed.shape
    g = packed.block
    q = unpack_nibbles(packed.data, n * k).view(n, k // g, g).to(torch.int32)
    w = (q - packed.zeros.to(torch.int32).unsqueeze(2)).float() * packed.scales.float().unsqueeze(2)
    return w.to(dtype).view(n, k)
