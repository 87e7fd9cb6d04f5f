"""Fused LoRA backward: dX, dA and dB from dY, the saved x and xa, and the dropout seed.

Shapes: dY [M, N], x [M, K], xa = drop(x)·Aᵀ [M, r] (fp32, saved by the forward), W [N, K] dense or 4-bit,
A [r, K], B [N, r]. With m the keep-mask regenerated from the seed (never stored) and q = 1/(1-p):

    g  = dY·B                                   [M, r]  fp32 (the forward's pre-kernel, V = Bᵀ)
    dX = dY·deq(W) + m ⊙ ((s·q·g)·A)            [M, K]  ``_lora_dx_kernel``
    dA = s·gᵀ·drop(x) = s·q·((m ⊙ x)ᵀ·g)ᵀ       [r, K]  ``_reduce_m_kernel`` (big = x, thin = g)
    dB = s·dYᵀ·xa                               [N, r]  ``_reduce_m_kernel`` (big = dY, thin = xa)
    dbias = Σ_m dY                              [N]     (torch)

``_lora_dx_kernel`` is one GEMM over tiles of dX whose N loop dequantizes W tiles [BLOCK_N, BLOCK_K] in
registers (the transposed access of the forward's tile, same decoder), then adds the LoRA term as an
r-deep epilogue dot whose result is masked by the regenerated dropout mask (the mask multiplies the
product, so it cannot share the main accumulator before it).

dA and dB are the same reduction over M, out = scale·drop(big)ᵀ·thin with a thin fp32 right side: each
program owns a column tile of big and a contiguous slice of M (split-M, so that short outputs still fill
the GPU) and writes fp32 partial sums to a [splits, ...] workspace that torch sums (deterministic, no
atomics); dA's workspace is laid out [r, K] directly. The dots run in fp32 (tf32 on GPUs): g and xa are
fp32, and x, dY convert exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted
from .dropout import keep
from .lora_fwd import (
    AOT_R,
    DTYPES,
    band_tile,
    block_r,
    gemm_kernel,
    gemm_spec_variants,
    lowrank,
    m_bucket,
    spec,
    weight_signature,
)
from .weight_tile import FORMATS, load_w_pairs, load_w_tile


@triton.jit
def _lora_dx_kernel(
    # pointers: dY [M, N], W (format WFMT), g fp32 [M, R], A [R, K], dX [M, K]
    dy_ptr, w_ptr, ws_ptr, wz_ptr, g_ptr, a_ptr, seed_ptr, dx_ptr,
    # sizes (M_BUCKET: M rounded up to a power of two, the autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_dym, stride_dxm,
    # s/(1-p) and the drop probability
    lora_scale, p,
    # meta-parameters
    WFMT: tl.constexpr, QBLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # output tiles are [BLOCK_M, BLOCK_K]; the reduction runs over N in BLOCK_N steps
    pid_m, pid_k = band_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    k0 = pid_k * BLOCK_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = k0 + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    m_mask = rm < M
    k_mask = rk < K
    rm64 = rm.to(tl.int64)
    dy_rows = dy_ptr + rm64[:, None] * stride_dym

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + rn
        n_mask = n < N
        dyt = tl.load(dy_rows + n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if WFMT != 0 and ROWS_ALIGNED and QBLOCK % BLOCK_K == 0:
            wt = load_w_pairs(w_ptr, ws_ptr, wz_ptr, n, k0, n_mask, K, WFMT, QBLOCK, BLOCK_N, BLOCK_K)
        else:
            wt = load_w_tile(w_ptr, ws_ptr, wz_ptr, n[:, None], rk[None, :], k0, n_mask[:, None],
                             k_mask[None, :], K, WFMT, QBLOCK, ROWS_ALIGNED, BLOCK_K)
        acc = tl.dot(dyt, wt.to(dyt.dtype), acc)

    rj = tl.arange(0, BLOCK_R)
    j_mask = rj < R
    gt = tl.load(g_ptr + rm64[:, None] * R + rj[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0)
    at = tl.load(a_ptr + rj[:, None] * K + rk[None, :], mask=j_mask[:, None] & k_mask[None, :], other=0.0)
    lo = tl.dot((gt * lora_scale).to(at.dtype), at)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        lo = tl.where(keep(seed, rm64[:, None] * K + rk[None, :], p), lo, 0.0)
    acc += lo
    tl.store(dx_ptr + rm64[:, None] * stride_dxm + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def _reduce_m_kernel(
    # pointers: big [M, C] (x or dY), thin fp32 [M, R] (g or xa), workspace fp32 [splits, ...]
    big_ptr, thin_ptr, seed_ptr, ws_ptr,
    # sizes
    M, C, R, rows_per_split,
    # strides: big's rows; the workspace element (c, j) of a split at c*stride_oc + j*stride_or
    stride_bm, stride_oc, stride_or,
    # output scale and the drop probability applied to big
    out_scale, p,
    # meta-parameters
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial sums over one slice of M: out[c, j] = out_scale · Σ_m drop(big)[m, c] · thin[m, j]."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rj = tl.arange(0, BLOCK_R)
    c_mask = rc < C
    j_mask = rj < R
    m_start = pid_s * rows_per_split
    m_end = min(M, m_start + rows_per_split)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < m_end
        rm64 = rm.to(tl.int64)
        bt = tl.load(big_ptr + rm64[None, :] * stride_bm + rc[:, None], mask=c_mask[:, None] & m_mask[None, :],
                     other=0.0)
        if DROPOUT:
            bt = tl.where(keep(seed, rm64[None, :] * C + rc[:, None], p), bt, 0.0)
        tt = tl.load(thin_ptr + rm64[:, None] * R + rj[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0)
        acc = tl.dot(bt.to(tl.float32), tt, acc)
    out = ws_ptr + pid_s.to(tl.int64) * C * R
    tl.store(out + rc.to(tl.int64)[:, None] * stride_oc + rj[None, :] * stride_or, acc * out_scale,
             mask=c_mask[:, None] & j_mask[None, :])


# ---------------------------------------------------------------------------------------------------------
# launch configs

# dA / dB stream x or dY once; a 64-wide column tile with 64-row steps keeps the fp32 operand tiles at
# 16 KiB each, and the split over M aims at ~2 programs per SM of an H100 (132 SMs).
REDUCE_CONFIG = {"BLOCK_M": 64, "BLOCK_COLS": 64, "num_warps": 4, "num_stages": 3}
INTERPRET_REDUCE_CONFIG = {"BLOCK_M": 16, "BLOCK_COLS": 32, "num_warps": 4, "num_stages": 1}
TARGET_PROGRAMS = 264

def _reduce_config() -> dict:
    return INTERPRET_REDUCE_CONFIG if interpreted() else REDUCE_CONFIG


def _splits(m: int, col_tiles: int, block_m: int) -> tuple[int, int]:
    """(number of M slices, rows per slice), slices a multiple of block_m rows."""
    m_tiles = triton.cdiv(max(m, 1), block_m)
    splits = max(1, min(m_tiles, TARGET_PROGRAMS // max(col_tiles, 1)))
    rows = triton.cdiv(m_tiles, splits) * block_m
    return triton.cdiv(max(m, 1), rows), rows


def lora_dx(dy, g, w, w_scales, w_zeros, fmt, block, lora_A, scale, p, seed) -> torch.Tensor:
    m, n = dy.shape
    r, k = lora_A.shape
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0 or k == 0:
        return dx
    wfmt = FORMATS[fmt]
    dummy = g
    gemm_kernel(_lora_dx_kernel)[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)](
        dy, w, w_scales if w_scales is not None else dummy, w_zeros if w_zeros is not None else dummy,
        g, lora_A, seed if p > 0 else dummy, dx,
        m, n, k, r, m_bucket(m), dy.stride(0), dx.stride(0), float(scale) / (1.0 - p), float(p),
        WFMT=wfmt, QBLOCK=block if wfmt else 64, ROWS_ALIGNED=(wfmt != 0 and k % block == 0),
        DROPOUT=p > 0, BLOCK_R=block_r(r),
    )
    return dx


def reduce_m(big, thin, out_scale, p=0.0, seed=None, transpose_out=False) -> torch.Tensor:
    """fp32 out_scale · drop(big)ᵀ·thin: [C, R], or [R, C] with ``transpose_out`` (split over M, summed)."""
    m, c = big.shape
    r = thin.shape[1]
    cfg = _reduce_config()
    col_tiles = triton.cdiv(c, cfg["BLOCK_COLS"])
    splits, rows = _splits(m, col_tiles, cfg["BLOCK_M"])
    shape = (splits, r, c) if transpose_out else (splits, c, r)
    ws = torch.empty(shape, dtype=torch.float32, device=big.device)
    stride_oc, stride_or = (1, c) if transpose_out else (r, 1)
    _reduce_m_kernel[(col_tiles, splits)](
        big, thin, seed if p > 0 else thin, ws, m, c, r, rows, big.stride(0), stride_oc, stride_or,
        float(out_scale), float(p), DROPOUT=p > 0, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_COLS"],
        BLOCK_R=block_r(r), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return ws.sum(0) if splits > 1 else ws[0]


def lora_backward(
    dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor | None,
    w: torch.Tensor, w_scales: torch.Tensor | None, w_zeros: torch.Tensor | None, fmt: str, block: int,
    lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, p: float,
    need_dx: bool = True, need_da: bool = True, need_db: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX in x's dtype, dA, dB in fp32) — each None when not needed. dY, x [M, *] with unit column stride."""
    r = lora_A.shape[0]
    g = None
    if need_dx or need_da:
        g = lowrank(dy, lora_B, lora_B.stride(1), lora_B.stride(0), r)
    dx = lora_dx(dy, g, w, w_scales, w_zeros, fmt, block, lora_A, scale, p, seed) if need_dx else None
    # dA = s/(1-p)·(m ⊙ x)ᵀ·g stored as [r, K]; dB = s·dYᵀ·xa
    da = reduce_m(x, g, scale / (1.0 - p), p, seed, transpose_out=True) if need_da else None
    db = reduce_m(dy, xa, scale) if need_db else None
    return dx, da, db


# ---------------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs

def aot_specs() -> list[dict]:
    specs = []
    rc = REDUCE_CONFIG
    for dname, dptr in DTYPES.items():
        for dropout in (False, True):  # dB: no dropout; dA: dropout
            specs.append(spec(
                f"reduce_m_{dname}{'_dropout' if dropout else ''}", _reduce_m_kernel,
                {"big_ptr": dptr, "thin_ptr": "*fp32", "seed_ptr": "*i64", "ws_ptr": "*fp32", "M": "i32", "C": "i32",
                 "R": "i32", "rows_per_split": "i32", "stride_bm": "i32", "stride_oc": "i32", "stride_or": "i32",
                 "out_scale": "fp32", "p": "fp32"},
                {"DROPOUT": dropout, "BLOCK_M": rc["BLOCK_M"], "BLOCK_C": rc["BLOCK_COLS"],
                 "BLOCK_R": block_r(AOT_R)},
                rc["num_warps"], rc["num_stages"]))
    for dname, dptr, fname, fid, qblock, aligned, cfg in gemm_spec_variants():
        sig = {"dy_ptr": dptr, **weight_signature(fid, dptr), "g_ptr": "*fp32", "a_ptr": dptr,
               "seed_ptr": "*i64", "dx_ptr": dptr, "M": "i32", "N": "i32", "K": "i32", "R": "i32",
               "M_BUCKET": "i32", "stride_dym": "i32", "stride_dxm": "i32", "lora_scale": "fp32", "p": "fp32"}
        # the same tile sizes as the forward: the output tile is [BLOCK_M, BLOCK_K], the N loop steps BLOCK_N
        meta = {k: v for k, v in cfg.items() if not k.startswith("num_")}
        specs.append(spec(
            f"lora_dx_{dname}_{fname}_{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}", _lora_dx_kernel,
            sig, {"WFMT": fid, "QBLOCK": qblock, "ROWS_ALIGNED": aligned, "DROPOUT": True, **meta,
                  "BLOCK_R": block_r(AOT_R)},
            cfg["num_warps"], cfg["num_stages"], large_m_gemm=cfg["BLOCK_M"] >= 64))
    return specs
