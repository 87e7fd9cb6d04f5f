"""DoRA's per-column scaling of the fused LoRA output, forward and backward, one pass over M·N each.

DoRA multiplies output column n of z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ by g[n] = m[n] / ‖W + s·B·A‖_n (the norm detached):

    forward   y = g ⊙ z (+ u) (+ bias)          u: the base product of the dropped part of x (dropout on)
    backward  dz = g ⊙ dy,  Σ_rows dy ⊙ z        (the magnitude's gradient before its 1/‖·‖ factor)

Where g is already folded into the GEMM (``ops.dora``: a 4-bit weight's row scales), the same kernels run
without it: the forward only adds u and bias (or does not run), the backward only takes the column sums.

``_dora_norm_kernel`` gives the detached row norms and g in one launch from what the fused GEMM at M = r
returns (W·Aᵀ, and A·Aᵀ from its low-rank pre-kernel) and ‖W_n‖²:

    ‖W_n + s·(B·A)_n‖² = ‖W_n‖² + Σ_j B[n,j]·(2s·(W·Aᵀ)[n,j] + s²·(B·A·Aᵀ)[n,j])

(fp32; B·A·Aᵀ formed in registers, r ≤ 512), instead of a dozen small torch launches on [N, r].

``_row_sq_norms_kernel`` gives ‖W_n‖² of a 4-bit base from its codes (each element decoded in fp32 and
rounded to the compute dtype, as the layer's GEMMs and ``dequantize`` give it), without writing W.

With dropout, ``_drop_split_kernel`` makes both inputs of DoRA's two base products in one pass over x:
xd = drop(x) and c = x − xd, the keep-mask drawn as the fused op's dropout draws it (``dropout.keep_bytes``,
Philox from a seed tensor) and saved as bits; ``_drop_split_bwd_kernel`` gives dx = dc + keep·s·(dxd − dc)
(s = 1/(1-p)) from those bits in one pass.

The two streams are memory-bound passes over [M, N]. A program owns BLOCK_N columns and visits every
SPLITS-th band of BLOCK_M rows, so g, bias and the column sums stay in registers across its bands and the
sums leave as one fp32 row per program ([SPLITS, N] partials, added by the launcher): no atomics, so the
result does not depend on scheduling. Products and sums are fp32; y and dz are rounded once to z's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packed import NESTED_BLOCKSIZE
from . import device_guard, interpreted
from .dropout import keep_bytes, load_bits, threshold, unpack_bits
from .lora_fwd import nested_absmax
from .weight_tile import FORMATS, load_w_tile


@triton.jit
def _dora_scale_fwd_kernel(
    # pointers
    z_ptr, g_ptr, u_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, SPLITS,
    # meta-parameters
    HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_G:
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for band in range(tl.program_id(1), tl.cdiv(M, BLOCK_M), SPLITS):
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + band * BLOCK_M  # int64: rows * N passes 2^31
        ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        y = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_G:
            y *= g[None, :]
        if HAS_U:
            y += tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += b[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dora_scale_bwd_kernel(
    # pointers
    dy_ptr, z_ptr, g_ptr, dz_ptr, part_ptr,
    # sizes
    M, N, SPLITS,
    # meta-parameters
    STORE_DZ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # g: dz's scale; for the column sums alone, a factor on them (1 / m, so the sums leave as dm's parts)
    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
    # per-element sums across bands, reduced over rows once at the end (no cross-warp reduction per band)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for band in range(tl.program_id(1), tl.cdiv(M, BLOCK_M), SPLITS):
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + band * BLOCK_M  # int64: rows * N passes 2^31
        ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if STORE_DZ:
            tl.store(dz_ptr + offs, (dy * g[None, :]).to(dz_ptr.dtype.element_ty), mask=ok)
        acc += dy * z
    sums = tl.sum(acc, axis=0)
    if not STORE_DZ:
        sums *= g
    tl.store(part_ptr + tl.program_id(1).to(tl.int64) * N + cols, sums, mask=col_ok)


@triton.jit
def _dora_gain_kernel(
    # pointers
    m_ptr, norm_ptr, b_ptr, sc_ptr, code_ptr, nested_ptr, g_ptr, inv_m_ptr, b_out_ptr, sc_out_ptr,
    # sizes
    N, R, KB, offset, zero_m,
    # meta-parameters
    DQ: tl.constexpr, NESTED_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    rows64 = rows.to(tl.int64)  # N·KB may pass 2^31
    m = tl.load(m_ptr + rows, mask=ok, other=1.0).to(tl.float32)
    m = tl.where(m == 0.0, zero_m, m)
    g = m / tl.load(norm_ptr + rows, mask=ok, other=1.0)
    tl.store(g_ptr + rows, g, mask=ok)
    tl.store(inv_m_ptr + rows, 1.0 / m, mask=ok)
    for j0 in range(0, R, BLOCK_C):  # g ⊙ B, rounded once to B's dtype
        js = j0 + tl.arange(0, BLOCK_C)
        t_ok = ok[:, None] & (js < R)[None, :]
        offs = rows64[:, None] * R + js[None, :]
        b = tl.load(b_ptr + offs, mask=t_ok, other=0.0)
        tl.store(b_out_ptr + offs, (b.to(tl.float32) * g[:, None]).to(b.dtype), mask=t_ok)
    for j0 in range(0, KB, BLOCK_C):  # each row's block scales (a double-quantized absmax decoded) times g
        js = j0 + tl.arange(0, BLOCK_C)
        t_ok = ok[:, None] & (js < KB)[None, :]
        offs = rows64[:, None] * KB + js[None, :]
        if DQ:
            sc = nested_absmax(sc_ptr, code_ptr, nested_ptr, offs, t_ok, offset, NESTED_BLOCK)
        else:
            sc = tl.load(sc_ptr + offs, mask=t_ok, other=0.0)
        tl.store(sc_out_ptr + offs, sc * g[:, None], mask=t_ok)


@triton.jit
def _dora_norm_kernel(
    # pointers
    wa_ptr, b_ptr, aat_ptr, sq_ptr, m_ptr, norm_ptr, g_ptr,
    # sizes
    N, R, scale,
    # meta-parameters
    WITH_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    rows64 = rows.to(tl.int64)  # N·r may pass 2^31
    acc = tl.load(sq_ptr + rows, mask=ok, other=0.0)
    for j0 in range(0, R, BLOCK_R):
        js = j0 + tl.arange(0, BLOCK_R)
        tile_ok = ok[:, None] & (js < R)[None, :]
        b_j = tl.load(b_ptr + rows64[:, None] * R + js[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        wa_j = tl.load(wa_ptr + js[None, :].to(tl.int64) * N + rows[:, None], mask=tile_ok, other=0.0).to(tl.float32)
        q_j = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for i in range(0, R):  # (B·A·Aᵀ)[:, js]: rank-1 updates, A·Aᵀ is symmetric r x r
            b_i = tl.load(b_ptr + rows64 * R + i, mask=ok, other=0.0).to(tl.float32)
            aat_i = tl.load(aat_ptr + i * R + js, mask=js < R, other=0.0)
            q_j += b_i[:, None] * aat_i[None, :]
        acc += tl.sum(b_j * (2.0 * scale * wa_j + (scale * scale) * q_j), axis=1)
    norm = tl.sqrt(tl.maximum(acc, 0.0))
    tl.store(norm_ptr + rows, norm, mask=ok)
    if WITH_G:
        m = tl.load(m_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(g_ptr + rows, m / tl.where(ok, norm, 1.0), mask=ok)  # (rows past N: no 0 / 0)


_NORM_BLOCK_N, _NORM_BLOCK_R = 64, 16


def dora_norm(wa: torch.Tensor, b: torch.Tensor, aat: torch.Tensor, sq: torch.Tensor, m: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(‖W + s·B·A‖ per row, g = m / that, or None without ``m``), fp32 [N]: ``wa`` = A·Wᵀ [r, N] and ``b``
    [N, r] contiguous in one dtype, ``aat`` = A·Aᵀ fp32 [r, r], ``sq`` = ‖W_n‖² fp32 [N], ``m`` [N]."""
    r, n = wa.shape
    norm = torch.empty(n, dtype=torch.float32, device=wa.device)
    g = None if m is None else torch.empty_like(norm)
    with device_guard(wa.device):
        _dora_norm_kernel[(triton.cdiv(n, _NORM_BLOCK_N),)](
            wa, b, aat, sq, norm if m is None else m, norm, norm if g is None else g, n, r, float(scale),
            WITH_G=m is not None, BLOCK_N=_NORM_BLOCK_N, BLOCK_R=_NORM_BLOCK_R, num_warps=NUM_WARPS)
    return norm, g


@triton.jit
def _drop_tile(M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's tile of [M, K]: rows (int64), its first column, in-bounds rows, in-bounds mask, offsets."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    return rows, k0, row_ok, row_ok[:, None] & (cols < K)[None, :], rows[:, None] * K + cols[None, :]


@triton.jit
def _drop_split_kernel(
    # pointers
    x_ptr, seed_ptr, xd_ptr, c_ptr, bits_ptr,
    # sizes
    M, K, KB, thresh, keep_scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, k0, row_ok, ok, offs = _drop_tile(M, K, BLOCK_M, BLOCK_K)
    byte = keep_bytes(tl.load(seed_ptr), rows, k0, K, thresh, BLOCK_M, BLOCK_K)
    jb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    tl.store(bits_ptr + rows[:, None] * KB + jb[None, :], byte, mask=row_ok[:, None] & (jb < KB)[None, :])
    keep = unpack_bits(byte, BLOCK_M, BLOCK_K)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    # xd rounded to x's dtype first, so that c = x - xd is the difference of the two stored tensors
    xd = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)
    tl.store(xd_ptr + offs, xd, mask=ok)
    tl.store(c_ptr + offs, (x.to(tl.float32) - xd.to(tl.float32)).to(x.dtype), mask=ok)


@triton.jit
def _drop_split_bwd_kernel(
    # pointers
    dxd_ptr, dc_ptr, bits_ptr, dx_ptr,
    # sizes
    M, K, KB, keep_scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, k0, row_ok, ok, offs = _drop_tile(M, K, BLOCK_M, BLOCK_K)
    keep = load_bits(bits_ptr, rows, k0, KB, row_ok, BLOCK_M, BLOCK_K)
    dxd = tl.load(dxd_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dc = tl.load(dc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dx = dc + tl.where(keep, (dxd - dc) * keep_scale, 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


_DROP_BLOCK_M, _DROP_BLOCK_K = 16, 128


def _drop_grid(m: int, k: int) -> tuple[int, int]:
    return triton.cdiv(m, _DROP_BLOCK_M), triton.cdiv(k, _DROP_BLOCK_K)


def drop_split(x: torch.Tensor, seed: torch.Tensor, p: float):
    """(xd = drop(x), c = x − xd, keep bits uint8 [M, ceil(K/8)]) for x [M, K] contiguous, the mask of
    ``seed`` (a 1-element int64 tensor on x's device) and drop probability ``p`` (``dropout.dropout_mask``
    materializes the same mask)."""
    m, k = x.shape
    kb = triton.cdiv(k, 8)
    xd, c = torch.empty_like(x), torch.empty_like(x)
    bits = torch.empty(m, kb, dtype=torch.uint8, device=x.device)
    if x.numel():
        with device_guard(x.device):
            _drop_split_kernel[_drop_grid(m, k)](x, seed, xd, c, bits, m, k, kb, threshold(p), 1.0 / (1.0 - p),
                                                 BLOCK_M=_DROP_BLOCK_M, BLOCK_K=_DROP_BLOCK_K, num_warps=NUM_WARPS)
    return xd, c, bits


def drop_split_bwd(dxd: torch.Tensor, dc: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """dx = dc + keep·(dxd − dc)/(1 − p) for [M, K] contiguous gradients and ``drop_split``'s bits."""
    m, k = dc.shape
    dx = torch.empty_like(dc)
    if dc.numel():
        with device_guard(dc.device):
            _drop_split_bwd_kernel[_drop_grid(m, k)](dxd, dc, bits, dx, m, k, bits.shape[1], 1.0 / (1.0 - p),
                                                     BLOCK_M=_DROP_BLOCK_M, BLOCK_K=_DROP_BLOCK_K,
                                                     num_warps=NUM_WARPS)
    return dx


@triton.jit
def _row_sq_norms_kernel(
    # pointers
    w_ptr, s_ptr, z_ptr, out_ptr,
    # sizes
    N, K,
    # meta-parameters
    WFMT: tl.constexpr, QBLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, ROUND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        # entries past K or N decode to 0: their scale is loaded masked wherever a step can pass K (one
        # scale per row and step only when the step lies inside one block, and K is whole blocks)
        w = load_w_tile(w_ptr, s_ptr, z_ptr, rows[:, None], cols[None, :], k0, n_ok[:, None], (cols < K)[None, :],
                        K, WFMT, QBLOCK, ROWS_ALIGNED, BLOCK_K)
        # the value the layer computes with: decoded in fp32, rounded once to the compute dtype
        if ROUND == 1:
            w = w.to(tl.bfloat16).to(tl.float32)
        elif ROUND == 2:
            w = w.to(tl.float16).to(tl.float32)
        acc += tl.sum(w * w, axis=1)
    tl.store(out_ptr + rows, acc, mask=n_ok)


_SQ_BLOCK_N, _SQ_BLOCK_K = 16, 64
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def row_sq_norms_4bit(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: str, n: int, k: int,
                      block: int, dtype: torch.dtype) -> torch.Tensor:
    """‖W_n‖² fp32 [N] of a 4-bit weight as decoded to ``dtype`` (fp32, bf16, fp16), read from its codes:
    no [N, K] tensor. ``w``, ``scales`` (fp32: a double-quantized absmax decoded first), ``zeros`` (INT4) as
    ``weight_args`` gives them."""
    out = torch.empty(n, dtype=torch.float32, device=w.device)
    if n and k:
        wfmt = FORMATS[fmt]
        with device_guard(w.device):
            _row_sq_norms_kernel[(triton.cdiv(n, _SQ_BLOCK_N),)](
                w, scales, scales if zeros is None else zeros, out, n, k, WFMT=wfmt, QBLOCK=block,
                ROWS_ALIGNED=k % block == 0, ROUND=_ROUND[dtype], BLOCK_N=_SQ_BLOCK_N, BLOCK_K=_SQ_BLOCK_K,
                num_warps=NUM_WARPS)
    else:
        out.zero_()
    return out


# 32 x 128 tiles, 4 warps: 32 elements per thread per band (16-byte loads of 16-bit rows).
BLOCK_M, BLOCK_N, NUM_WARPS = 32, 128, 4
_INTERPRET_BLOCK_M, _INTERPRET_BLOCK_N = 16, 32
# Programs per SM the launcher aims for: enough bands in flight to cover HBM latency.
_PROGRAMS_PER_SM = 4


def _blocks() -> tuple[int, int]:
    return (_INTERPRET_BLOCK_M, _INTERPRET_BLOCK_N) if interpreted() else (BLOCK_M, BLOCK_N)


def _splits(m: int, n: int, device: torch.device) -> tuple[tuple[int, int], int]:
    """(grid, SPLITS): every column block, and as many row splits as fill the GPU (1 under the interpreter)."""
    bm, bn = _blocks()
    col_blocks, bands = triton.cdiv(n, bn), triton.cdiv(m, bm)
    if interpreted() or device.type != "cuda":
        splits = 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(bands, triton.cdiv(_PROGRAMS_PER_SM * sms, col_blocks)))
    return (col_blocks, splits), splits


def dora_scale_fwd(z: torch.Tensor, g: torch.Tensor | None, u: torch.Tensor | None, bias: torch.Tensor | None):
    """y = g ⊙ z (+ u) (+ bias): z, u [M, N] contiguous in one dtype, g [N] fp32 (None: z as it is), bias [N]
    in z's dtype."""
    m, n = z.shape
    y = torch.empty_like(z)
    if z.numel():
        grid, splits = _splits(m, n, z.device)
        bm, bn = _blocks()
        dummy = z if g is None else g
        with device_guard(z.device):
            _dora_scale_fwd_kernel[grid](
                z, dummy, z if u is None else u, dummy if bias is None else bias, y, m, n, splits,
                HAS_G=g is not None, HAS_U=u is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=NUM_WARPS,
            )
    return y


def dora_scale_bwd(dy: torch.Tensor, z: torch.Tensor, g: torch.Tensor | None,
                   factor: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dz = g ⊙ dy in z's dtype, Σ_rows dy ⊙ z as fp32 [N]); dy and z [M, N] contiguous, g [N] fp32. With
    ``g`` None: (None, factor ⊙ Σ_rows dy ⊙ z), ``factor`` [N] fp32."""
    m, n = z.shape
    dz = None if g is None else torch.empty_like(z)
    grid, splits = _splits(m, n, z.device)
    part = torch.empty(splits, n, dtype=torch.float32, device=z.device)
    if z.numel():
        bm, bn = _blocks()
        with device_guard(z.device):
            _dora_scale_bwd_kernel[grid](dy, z, factor if g is None else g, z if dz is None else dz, part, m, n,
                                         splits, STORE_DZ=g is not None, BLOCK_M=bm, BLOCK_N=bn,
                                         num_warps=NUM_WARPS)
    else:
        part.zero_()
    return dz, part.sum(0)


_GAIN_BLOCK_N, _GAIN_BLOCK_C = 32, 64


def dora_gain(m: torch.Tensor, norm: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
              nested: tuple | None, zero_m: float):
    """What folding g = m / ‖·‖ into a 4-bit weight needs, in one launch: (g fp32 [N], 1 / m fp32 [N],
    g ⊙ B [N, r] in B's dtype, each row's block scales times g, fp32 [N, K / block]); a magnitude that is 0
    counts as ``zero_m``. ``scales``: fp32 [N·K / block], or the uint8 absmax codes with ``nested`` =
    (nested_absmax, nested_code, offset) for double quantization; m [N], norm fp32 [N], B [N, r] contiguous."""
    n, r = b.shape
    kb = scales.numel() // max(n, 1)
    g, inv_m = (torch.empty(n, dtype=torch.float32, device=b.device) for _ in range(2))
    b_out = torch.empty_like(b)
    sc_out = torch.empty(n, kb, dtype=torch.float32, device=b.device)
    na, nc, off = nested if nested is not None else (g, g, 0.0)
    if n:
        with device_guard(b.device):
            _dora_gain_kernel[(triton.cdiv(n, _GAIN_BLOCK_N),)](
                m, norm, b, scales, nc, na, g, inv_m, b_out, sc_out, n, r, kb, float(off), float(zero_m),
                DQ=nested is not None, NESTED_BLOCK=NESTED_BLOCKSIZE, BLOCK_N=_GAIN_BLOCK_N, BLOCK_C=_GAIN_BLOCK_C,
                num_warps=NUM_WARPS)
    return g, inv_m, b_out, sc_out


def aot_specs() -> list[dict]:
    """The launchers' configs for 16-bit outputs (fp32 runs the same code on 4-byte elements)."""
    specs = []
    for t in ("bf16", "fp16"):
        drop = {"BLOCK_M": _DROP_BLOCK_M, "BLOCK_K": _DROP_BLOCK_K}
        specs.append({
            "name": f"dora_drop_fwd_{t}", "fn": _drop_split_kernel,
            "signature": {"x_ptr": f"*{t}", "seed_ptr": "*i64", "xd_ptr": f"*{t}", "c_ptr": f"*{t}",
                          "bits_ptr": "*u8", "M": "i32", "K": "i32", "KB": "i32", "thresh": "i64",
                          "keep_scale": "fp32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"},
            "constexprs": drop, "num_warps": NUM_WARPS, "num_stages": 1, "large_m_gemm": False,
            "divisible_by_16": ["x_ptr", "seed_ptr", "xd_ptr", "c_ptr", "bits_ptr", "K", "KB"],
        })
        specs.append({
            "name": f"dora_drop_bwd_{t}", "fn": _drop_split_bwd_kernel,
            "signature": {"dxd_ptr": f"*{t}", "dc_ptr": f"*{t}", "bits_ptr": "*u8", "dx_ptr": f"*{t}", "M": "i32",
                          "K": "i32", "KB": "i32", "keep_scale": "fp32", "BLOCK_M": "constexpr",
                          "BLOCK_K": "constexpr"},
            "constexprs": drop, "num_warps": NUM_WARPS, "num_stages": 1, "large_m_gemm": False,
            "divisible_by_16": ["dxd_ptr", "dc_ptr", "bits_ptr", "dx_ptr", "K", "KB"],
        })
        specs.append({
            "name": f"dora_norm_{t}", "fn": _dora_norm_kernel,
            "signature": {"wa_ptr": f"*{t}", "b_ptr": f"*{t}", "aat_ptr": "*fp32", "sq_ptr": "*fp32",
                          "m_ptr": "*fp32", "norm_ptr": "*fp32", "g_ptr": "*fp32", "N": "i32", "R": "i32",
                          "scale": "fp32", "WITH_G": "constexpr", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"},
            "constexprs": {"WITH_G": True, "BLOCK_N": _NORM_BLOCK_N, "BLOCK_R": _NORM_BLOCK_R},
            "num_warps": NUM_WARPS, "num_stages": 1, "large_m_gemm": False,
            "divisible_by_16": ["wa_ptr", "b_ptr", "aat_ptr", "sq_ptr", "m_ptr", "norm_ptr", "g_ptr", "N", "R"],
        })
        common = {"M": "i32", "N": "i32", "SPLITS": "i32"}
        specs.append({
            "name": f"dora_gain_{t}", "fn": _dora_gain_kernel,
            "signature": {"m_ptr": "*fp32", "norm_ptr": "*fp32", "b_ptr": f"*{t}", "sc_ptr": "*u8",
                          "code_ptr": "*fp32", "nested_ptr": "*fp32", "g_ptr": "*fp32", "inv_m_ptr": "*fp32",
                          "b_out_ptr": f"*{t}", "sc_out_ptr": "*fp32", "N": "i32", "R": "i32", "KB": "i32",
                          "offset": "fp32", "zero_m": "fp32", "DQ": "constexpr", "NESTED_BLOCK": "constexpr",
                          "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"},
            "constexprs": {"DQ": True, "NESTED_BLOCK": NESTED_BLOCKSIZE, "BLOCK_N": _GAIN_BLOCK_N,
                           "BLOCK_C": _GAIN_BLOCK_C},
            "num_warps": NUM_WARPS, "num_stages": 1, "large_m_gemm": False,
            "divisible_by_16": ["m_ptr", "norm_ptr", "b_ptr", "sc_ptr", "code_ptr", "nested_ptr", "g_ptr",
                                "inv_m_ptr", "b_out_ptr", "sc_out_ptr", "N", "R", "KB"],
        })
        # g applied (4-bit weights fold it into the GEMM instead: the add of u and bias, column sums only)
        for name, g in (("dora_fwd", True), ("dora_add", False)):
            specs.append({
                "name": f"{name}_{t}", "fn": _dora_scale_fwd_kernel,
                "signature": {"z_ptr": f"*{t}", "g_ptr": "*fp32", "u_ptr": f"*{t}", "bias_ptr": f"*{t}",
                              "y_ptr": f"*{t}", **common, "HAS_G": "constexpr", "HAS_U": "constexpr",
                              "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                "constexprs": {"HAS_G": g, "HAS_U": True, "HAS_BIAS": True, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N},
                "num_warps": NUM_WARPS, "num_stages": 1, "large_m_gemm": False,
                "divisible_by_16": ["z_ptr", "g_ptr", "u_ptr", "bias_ptr", "y_ptr", "N"],
            })
        # ‖W_n‖² of an aligned NF4 base (bnb's 64-blocks, fp32 absmax) rounded to the compute dtype
        specs.append({
            "name": f"dora_sq_nf4_{t}", "fn": _row_sq_norms_kernel,
            "signature": {"w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32",
                          "K": "i32", "WFMT": "constexpr", "QBLOCK": "constexpr", "ROWS_ALIGNED": "constexpr",
                          "ROUND": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            "constexprs": {"WFMT": FORMATS["nf4"], "QBLOCK": 64, "ROWS_ALIGNED": True, "ROUND": _ROUND[_DTYPES[t]],
                           "BLOCK_N": _SQ_BLOCK_N, "BLOCK_K": _SQ_BLOCK_K},
            "num_warps": NUM_WARPS, "num_stages": 1, "large_m_gemm": False,
            "divisible_by_16": ["w_ptr", "s_ptr", "z_ptr", "out_ptr", "N", "K"],
        })
        for name, store in (("dora_bwd", True), ("dora_colsum", False)):
            specs.append({
                "name": f"{name}_{t}", "fn": _dora_scale_bwd_kernel,
                "signature": {"dy_ptr": f"*{t}", "z_ptr": f"*{t}", "g_ptr": "*fp32", "dz_ptr": f"*{t}",
                              "part_ptr": "*fp32", **common, "STORE_DZ": "constexpr", "BLOCK_M": "constexpr",
                              "BLOCK_N": "constexpr"},
                "constexprs": {"STORE_DZ": store, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N},
                "num_warps": NUM_WARPS, "num_stages": 1, "large_m_gemm": False,
                "divisible_by_16": ["dy_ptr", "z_ptr", "g_ptr", "dz_ptr", "part_ptr", "N"],
            })
    return specs
