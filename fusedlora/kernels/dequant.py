"""Triton 4-bit format kernels: dequantize NF4 (double quantization decoded in the same pass) and INT4,
flat over bytes; quantize to NF4 with bitsandbytes' exact bytes.

Both formats (``fusedlora.formats``) put two codes per byte, first element in the HIGH nibble, and one
scale per ``BLOCK`` consecutive flat elements (NF4: absmax per blocksize elements of W[N, K] flattened;
INT4: per group of g along K, and since K % g == 0 the flat group index of element e is e // g, scales
and zeros being [N, K/g] row-major). A program takes BYTES consecutive bytes = 2*BYTES elements, as a
tile with one row per scale block:

    NF4   out[e] = cast(code[q_e] * absmax[e // B]),  absmax[b] = ncode[qa[b]] * nabs[b // 256] + offset
    INT4  out[e] = cast(float(q_e - zero[e // g]) * scale[e // g])

Bit-identical to the plain-torch reference: every product and sum is one fp32 operation rounded once, so
the launchers turn off FMA contraction (``enable_fp_fusion=False``), and the cast rounds to nearest even.

NF4 quantize (``formats.nf4`` has the rule): a program takes ROWS blocks of BLOCKSIZE elements,
    absmax = max|w|;  v = clamp(w * (1 / absmax), -1, 1)   (trailing partial block: w / absmax)
    q = #{ i : v > mid_i }   over the 15 fp32 midpoints of the sorted code (a tie goes to the lower code)
with IEEE division (``div_rn``; Triton's ``/`` is approximate on GPUs). Padding elements read as 0 and
encode to code 7 (0.0), the pad bitsandbytes writes into the last low nibble of an odd N*K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.nf4 import nf4_code


@triton.jit
def _scale_block_tile(pid, BLOCK: tl.constexpr, BYTES: tl.constexpr):
    """A program's BYTES bytes as a [BYTES / (BLOCK/2), BLOCK/2] tile: one row per scale block, so each
    thread loads its block's scale once and 16 consecutive bytes of it."""
    rows = pid * (BYTES // (BLOCK // 2)) + tl.arange(0, BYTES // (BLOCK // 2))
    b = rows[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    return rows, b


@triton.jit
def _store_nibble_pairs(out_ptr, rows, hi, lo, numel, BLOCK: tl.constexpr):
    """Element 2j (the high nibble) then 2j+1, cast once to the output dtype."""
    vals = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)
    e = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + e, vals, mask=e < numel)


@triton.jit
def _dequant_nf4_kernel(
    # pointers
    data_ptr,  # uint8 [ceil(numel / 2)]
    absmax_ptr,  # fp32 [n_blocks], or uint8 [n_blocks] with DOUBLE_QUANT
    nested_absmax_ptr,  # fp32 [ceil(n_blocks / 256)]  (DOUBLE_QUANT)
    nested_code_ptr,  # fp32 [256]                    (DOUBLE_QUANT)
    code_ptr,  # fp32 [16], the NF4 values
    out_ptr,  # [numel] in the output dtype
    # sizes and scalars (n_bytes = ceil(numel / 2), passed so that the JIT sees its divisibility by 16
    # and vectorizes the masked loads)
    numel,
    n_bytes,
    nested_offset,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BYTES: tl.constexpr,
):
    blk, b = _scale_block_tile(tl.program_id(0).to(tl.int64), BLOCKSIZE, BYTES)
    byte = tl.load(data_ptr + b, mask=b < n_bytes, other=0)
    bmask = blk * (BLOCKSIZE // 2) < n_bytes
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
        nabs = tl.load(nested_absmax_ptr + blk // 256, mask=bmask, other=0.0)
        scale = tl.load(nested_code_ptr + qa) * nabs + nested_offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * scale[:, None]
    lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * scale[:, None]
    _store_nibble_pairs(out_ptr, blk, hi, lo, numel, BLOCKSIZE)


@triton.jit
def _dequant_int4_kernel(
    # pointers
    data_ptr,  # uint8 [N, K / 2]
    scales_ptr,  # fp32 [N, K / GROUP]
    zeros_ptr,  # uint8 [N, K / GROUP]
    out_ptr,  # [N, K] in the output dtype
    # sizes (n_bytes = numel / 2)
    numel,
    n_bytes,
    # meta-parameters
    GROUP: tl.constexpr,
    BYTES: tl.constexpr,
):
    grp, b = _scale_block_tile(tl.program_id(0).to(tl.int64), GROUP, BYTES)
    byte = tl.load(data_ptr + b, mask=b < n_bytes, other=0)
    gmask = grp * (GROUP // 2) < n_bytes
    zero = tl.load(zeros_ptr + grp, mask=gmask, other=0).to(tl.int32)[:, None]
    scale = tl.load(scales_ptr + grp, mask=gmask, other=0.0)[:, None]
    hi = ((byte >> 4).to(tl.int32) - zero).to(tl.float32) * scale
    lo = ((byte & 0xF).to(tl.int32) - zero).to(tl.float32) * scale
    _store_nibble_pairs(out_ptr, grp, hi, lo, numel, GROUP)


@triton.jit
def _quantize_nf4_kernel(
    # pointers
    w_ptr,  # [numel] bf16/fp16/fp32, W[N, K] flattened
    mid_ptr,  # fp32 [15], midpoints of the NF4 code
    data_ptr,  # uint8 [ceil(numel / 2)]
    absmax_ptr,  # fp32 [n_blocks]
    # sizes
    numel,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    safe = tl.maximum(absmax, tl.full([ROWS], 1e-38, tl.float32))
    full = (blk + 1) * BLOCKSIZE <= numel
    inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), safe)
    v = tl.where(full[:, None], x * inv[:, None], tl.math.div_rn(x, tl.broadcast_to(safe[:, None], x.shape)))
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    q = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
    for i in tl.static_range(15):
        q += (v > tl.load(mid_ptr + i)).to(tl.int32)
    hi, lo = tl.split(tl.reshape(q, [ROWS, BLOCKSIZE // 2, 2]))
    byte = ((hi << 4) | lo).to(tl.uint8)
    b = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(data_ptr + b, byte, mask=b < (numel + 1) // 2)
    # the stored absmax of the trailing partial block is the clamped one (bitsandbytes stores that too)
    n_blocks = (numel + BLOCKSIZE - 1) // BLOCKSIZE
    tl.store(absmax_ptr + blk, tl.where(full, absmax, safe), mask=blk < n_blocks)


# 2048 bytes in, 4096 elements out per program: 16 bytes per thread at 4 warps (one 16-byte load each).
_BYTES = 2048
_NUM_WARPS = 4
_CODES: dict[torch.device, torch.Tensor] = {}


def _code(device: torch.device) -> torch.Tensor:
    if device not in _CODES:
        _CODES[device] = nf4_code(device)
    return _CODES[device]


def dequantize_nf4_triton(data, absmax, nested_absmax, nested_code, nested_offset, blocksize, n, k, dtype,
                          out=None):
    """Launcher; arguments already validated by the op (``fusedlora.ops.dequant``). ``out``: a contiguous
    [n, k] tensor of ``dtype`` to write into (the dequant path's scratch), else a new one."""
    numel = n * k
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=data.device)
    dq = nested_absmax is not None
    n_bytes = (numel + 1) // 2
    grid = (triton.cdiv(n_bytes, _BYTES),)
    _dequant_nf4_kernel[grid](
        data, absmax, nested_absmax if dq else absmax, nested_code if dq else absmax, _code(data.device), out,
        numel, n_bytes, float(nested_offset),
        BLOCKSIZE=blocksize, DOUBLE_QUANT=dq, BYTES=_BYTES, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return out


def dequantize_int4_triton(data, scales, zeros, group_size, dtype, out=None):
    n, half_k = data.shape
    k = 2 * half_k
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=data.device)
    grid = (triton.cdiv(n * half_k, _BYTES),)
    _dequant_int4_kernel[grid](
        data, scales, zeros, out, n * k, n * half_k,
        GROUP=group_size, BYTES=_BYTES, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return out


_QUANT_ROWS = 8  # blocks per program: 512..2048 elements, 4 warps
_MIDS: dict[torch.device, torch.Tensor] = {}


def _mids(device: torch.device) -> torch.Tensor:
    if device not in _MIDS:
        code = nf4_code(device)
        _MIDS[device] = (code[:-1] + code[1:]) / 2
    return _MIDS[device]


def quantize_nf4_triton(w, blocksize):
    """(uint8 data [ceil(numel/2), 1], fp32 absmax [n_blocks]) of a contiguous weight; validated by the op."""
    numel = w.numel()
    n_blocks = triton.cdiv(numel, blocksize)
    data = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(n_blocks, _QUANT_ROWS),)
    _quantize_nf4_kernel[grid](
        w, _mids(w.device), data, absmax, numel,
        BLOCKSIZE=blocksize, ROWS=_QUANT_ROWS, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return data, absmax


_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _spec(name: str, fn, pointers: dict, constexprs: dict, scalars: dict | None = None) -> dict:
    """One AOT config: the launchers' num_warps, no FMA contraction, and what the JIT specializes on at
    launch for real layer shapes (16-byte aligned torch allocations, element and byte counts that are
    multiples of 16)."""
    scalars = scalars or {}
    signature = {**pointers, **scalars, **{c: "constexpr" for c in constexprs}}
    return {
        "name": name, "fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": _NUM_WARPS,
        "num_stages": 1, "enable_fp_fusion": False, "large_m_gemm": False,
        "divisible_by_16": [*pointers, *(a for a in scalars if a in ("numel", "n_bytes"))],
    }


def aot_specs() -> list[dict]:
    """The configurations to compile ahead of time (sm_80 / sm_90): what the launchers above run."""
    specs = []
    sizes = {"numel": "i64", "n_bytes": "i64"}
    for t in _TRITON_DTYPES.values():
        for dq in (False, True):
            pointers = {"data_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32", "nested_absmax_ptr": "*fp32",
                        "nested_code_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": f"*{t}"}
            specs.append(_spec(f"dequant_nf4_b64_{'dq_' if dq else ''}{t}", _dequant_nf4_kernel, pointers,
                               {"BLOCKSIZE": 64, "DOUBLE_QUANT": dq, "BYTES": _BYTES},
                               {**sizes, "nested_offset": "fp32"}))
        pointers = {"data_ptr": "*u8", "scales_ptr": "*fp32", "zeros_ptr": "*u8", "out_ptr": f"*{t}"}
        specs.append(_spec(f"dequant_int4_g128_{t}", _dequant_int4_kernel, pointers,
                           {"GROUP": 128, "BYTES": _BYTES}, sizes))
        pointers = {"w_ptr": f"*{t}", "mid_ptr": "*fp32", "data_ptr": "*u8", "absmax_ptr": "*fp32"}
        specs.append(_spec(f"quantize_nf4_b64_{t}", _quantize_nf4_kernel, pointers,
                           {"BLOCKSIZE": 64, "ROWS": _QUANT_ROWS}, {"numel": "i64"}))
    return specs


__all__ = ["aot_specs", "quantize_nf4_triton", "dequantize_int4_triton", "dequantize_nf4_triton"]
