"""Loading a tile of a base weight W[N, K] into registers, decoded to fp32 when it is 4-bit.

The GEMMs never write a dequantized weight: their main loops call ``load_w_tile`` for the rows ``n`` and
columns ``k`` they need (any broadcastable index tensors, so the forward's [BLOCK_K, BLOCK_N] tile and the
backward's transposed [BLOCK_N, BLOCK_K] tile come from the same code).

Formats (``WFMT``), layouts as in ``fusedlora.formats``:
- ``DENSE``: W itself, [N, K] row-major, any float dtype; returned as stored.
- ``NF4``: bitsandbytes' flat layout: flat index f = n*K + k, byte f // 2 holds f's code in its HIGH nibble
  when f is even, LOW when odd; value = code[q] * absmax[f // QBLOCK] with fp32 absmax (double-quantized
  absmax is decoded to fp32 before the GEMM, see ``lora_fwd.decode_absmax``).
- ``INT4``: bytes [N, K // 2] row-major, element k of row n in byte k // 2 (HIGH nibble for even k);
  value = (q - zero[n, k // QBLOCK]) * scale[n, k // QBLOCK], fp32 scales, uint8 zeros. K % QBLOCK == 0.

Offsets: the row part (n*K, up to N*K) is computed in int64 once per row; the per-element part stays
int32, so sizes with N*K >= 2^31 address correctly without int64 arithmetic on every element.

This is the general reader (dense weights, NF4 with K % blocksize != 0), used by the dense GEMMs and by
the 4-bit GEMMs where rows do not start on a byte or tiles cross scale blocks; the aligned 4-bit tiles
(every real layer) are read by ``code_lookup.load_w_codes``, which decodes bytes by byte permutes.
"""

from __future__ import annotations

import triton
import triton.language as tl

DENSE = 0
NF4 = 1
INT4 = 2
FORMATS = {"dense": DENSE, "nf4": NF4, "int4": INT4}


@triton.jit
def nf4_value(q):
    """NF4 code value of the 4-bit index q (int tensor), as a 4-level select tree (no table in memory)."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    v0 = tl.where(b0, -0.6961928009986877, -1.0)
    v1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    v2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    v3 = tl.where(b0, 0.0, -0.09105003625154495)
    v4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    v5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    v6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    v7 = tl.where(b0, 1.0, 0.7229568362236023)
    v01 = tl.where(b1, v1, v0)
    v23 = tl.where(b1, v3, v2)
    v45 = tl.where(b1, v5, v4)
    v67 = tl.where(b1, v7, v6)
    v03 = tl.where(b2, v23, v01)
    v47 = tl.where(b2, v67, v45)
    return tl.where(b3, v47, v03).to(tl.float32)


@triton.jit
def load_w_tile(
    w_ptr, s_ptr, z_ptr,
    n, k, k0, n_mask, k_mask,
    K,
    WFMT: tl.constexpr, QBLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile W[n, k] (shape of n + k); dense: W's dtype, 4-bit: fp32. Masked-out entries are finite."""
    mask = n_mask & k_mask
    n64 = n.to(tl.int64)
    if WFMT == 0:
        return tl.load((w_ptr + n64 * K) + k, mask=mask, other=0.0)
    else:
        if WFMT == 1:
            row = n64 * K
            par = (row & 1).to(tl.int32)
            t = par + k
            byte = tl.load((w_ptr + (row >> 1)) + (t >> 1), mask=mask, other=0)
            q = tl.where((t & 1) == 0, byte >> 4, byte & 15)
            blk = row // QBLOCK
            rem = (row - blk * QBLOCK).to(tl.int32)
            if ROWS_ALIGNED and QBLOCK % BLOCK_K == 0:
                absmax = tl.load((s_ptr + blk) + (rem + k0) // QBLOCK, mask=n_mask, other=0.0)
            else:
                absmax = tl.load((s_ptr + blk) + (rem + k) // QBLOCK, mask=mask, other=0.0)
            return nf4_value(q) * absmax
        else:
            byte = tl.load((w_ptr + n64 * (K // 2)) + (k >> 1), mask=mask, other=0)
            q = tl.where((k & 1) == 0, byte >> 4, byte & 15)
            srow = n64 * (K // QBLOCK)
            if QBLOCK % BLOCK_K == 0:
                g = k0 // QBLOCK
                scale = tl.load((s_ptr + srow) + g, mask=n_mask, other=0.0)
                zero = tl.load((z_ptr + srow) + g, mask=n_mask, other=0)
            else:
                g = k // QBLOCK
                scale = tl.load((s_ptr + srow) + g, mask=mask, other=0.0)
                zero = tl.load((z_ptr + srow) + g, mask=mask, other=0)
            return (q.to(tl.float32) - zero.to(tl.float32)) * scale
