"""Fused LoRA backward: dX, dA and dB from dY, the saved x and xa, and the forward's dropout keep bits.

Shapes: dY [M, N], x [M, K], xa = drop(x)·Aᵀ [M, r] (fp32, saved by the forward), W [N, K] dense or 4-bit
(or, on the dequant path, its decode in the scratch buffer, read as dense), A [r, K], B [N, r]. With m
the keep-mask (1 bit per element, saved by the forward's pre-kernel) and q = 1/(1-p):

    g  = dY·B,  dB = s·dYᵀ·xa                   [M, r], [N, r]  ``_g_db_kernel`` (one pass over dY)
    dX = dY·deq(W) + m ⊙ ((s·q·g)·A)            [M, K]          ``_lora_dx_kernel``
    dA = s·gᵀ·drop(x) = s·q·gᵀ·(m ⊙ x)          [r, K]          ``da_partial`` in dX's epilogue
                                                                (r <= 32), else ``_reduce_m_kernel``
    dbias = Σ_m dY                              [N]             (torch)

``_lora_dx_kernel`` is one GEMM over tiles of dX whose N loop reads W tiles [BLOCK_N, BLOCK_K] (decoded in
registers for a 4-bit weight on the in-loop path, the transposed access of the forward's tile, same
decoder), then adds the LoRA term as r-deep epilogue dots, in rank slices, masked by the saved keep bits
(the mask multiplies the product, so it cannot share the main accumulator before it).

``_g_db_kernel`` streams dY once: each program owns a row tile and a split of the columns, accumulates g
over its columns and writes dB's partial sum over its rows. dA needs the whole g, so it comes after
``_g_db_kernel``: up to ``FUSED_DA_MAX_RANK`` each dX program (first reduction slice) reads its x tile
after storing dX and writes dA's partial sum over its rows (saving a pass over x); above it
``_reduce_m_kernel`` streams x once, each program a column tile and a slice of M. Partial sums go to
fp32 workspaces added in a fixed order (deterministic: no atomic adds of values): g's by the last of
``_g_db_kernel``'s column splits of each row tile (an atomic ticket says which), dB's and dA's together by
one ``_sum_partials_kernel`` launch after dX. The r-deep dots take bf16 operands for bf16
layers (the rounding plain torch does too), fp32 (tf32 on GPUs) for fp16 layers, whose range g, xa and s·g
may exceed, and fp32 for fp32.
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

from . import interpreted
from .code_lookup import load_w_codes, table_tensor
from .dropout import load_bits
from .lora_fwd import (
    AOT_R,
    DTYPES,
    band_tile,
    block_r,
    fp16_widened,
    gemm_configs,
    gemm_kernel,
    gemm_specs,
    low_rank_operand,
    m_bucket,
    rank_variants,
    readable,
    reduction_splits,
    sm_count,
    spec,
    split_range,
    split_tickets,
    weight_signature,
)
from .split_sum import store_slice, tickets
from .weight_tile import FORMATS, load_w_tile


@triton.jit
def _lora_dx_kernel(
    # pointers: dY [M, N], W (format WFMT; tab_ptr the code table words of ``code_lookup``, na_ptr and
    # nc_ptr NF4's nested absmax and code when DQ), g fp32 [M, R], A [R, K], keep bits [M, ceil(K/8)], dX [M, K]
    dy_ptr, w_ptr, ws_ptr, wz_ptr, tab_ptr, na_ptr, nc_ptr, g_ptr, a_ptr, bits_ptr, dx_ptr,
    # SPLIT: dX [M, K] (dx_ptr is then the slices' workspace) and the ``split_sum`` counters, one per tile
    sum_ptr, ticket_ptr,
    # with FUSE_DA: x [M, K] and the fp32 workspace of dA's partial sums [row tiles, R, K]
    x_ptr, da_ptr,
    # with BLEND: the gradient of drop(x) [M, K] (laid out as dX), mixed in by the keep bits (``blend_dropped``)
    blend_ptr,
    # sizes (M_BUCKET: M rounded up to a power of two, the autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_dym, stride_dxm, stride_xm,
    # s/(1-p); NF4's nested offset (DQ); BLEND's 1/(1-p)
    lora_scale, noff, blend_scale,
    # meta-parameters
    WFMT: tl.constexpr, QBLOCK: tl.constexpr, DQ: tl.constexpr, ROWS_ALIGNED: tl.constexpr, DROPOUT: tl.constexpr,
    USE_ASM: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, FUSE_DA: tl.constexpr, BLEND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # SPLIT as in the forward: slices of N, fp32 partial sums in dx_ptr [splits, M, K], LoRA term in slice 0,
    # the last slice of a tile to finish adding them into sum_ptr
    # output tiles are [BLOCK_M, BLOCK_K]; the reduction runs over N in BLOCK_N steps. EVEN_N (N a multiple
    # of BLOCK_N, every real layer): no step crosses N, so the loads inside the loop carry only the
    # loop-invariant row masks (a per-step mask costs ~90 instructions per step in the sm_90 4-bit loop)
    pid_m, pid_k = band_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    k0 = pid_k * BLOCK_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = k0 + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    m_mask = rm < M
    k_mask = rk < K
    rm64 = rm.to(tl.int64)
    # rows past M read row M - 1 (their outputs are never stored): no row mask on the loop's dY loads
    dy_rows = dy_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_dym

    if WFMT != 0 and ROWS_ALIGNED and QBLOCK % BLOCK_K == 0:
        # dXᵀ = Wᵀ·dYᵀ: the decoded W tile, transposed, is the register-sourced left operand of the tensor
        # cores (as in the forward); the scale varies along the reduction, so it is applied per element
        acc_t = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        n_lo, n_hi = split_range(N, BLOCK_N)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            n = n0 + rn
            if EVEN_N:
                dyt = tl.load(dy_rows + n[None, :])
                wt, _ = load_w_codes(w_ptr, ws_ptr, wz_ptr, tab_ptr, na_ptr, nc_ptr, noff, n, k0, None, K,
                                     WFMT, QBLOCK, DQ, BLOCK_N, BLOCK_K, dyt.dtype, USE_ASM, True)
            else:
                n_mask = n < N
                dyt = tl.load(dy_rows + n[None, :], mask=n_mask[None, :], other=0.0)
                wt, _ = load_w_codes(w_ptr, ws_ptr, wz_ptr, tab_ptr, na_ptr, nc_ptr, noff, n, k0, n_mask, K,
                                     WFMT, QBLOCK, DQ, BLOCK_N, BLOCK_K, dyt.dtype, USE_ASM, True)
            acc_t = tl.dot(tl.trans(wt), tl.trans(dyt), acc_t)
        if tl.program_id(1) == 0:
            acc_t += dx_lora_term(g_ptr, a_ptr, bits_ptr, rm64, rk, k0, m_mask, k_mask, K, R, lora_scale, DROPOUT,
                                  BLOCK_M, BLOCK_K, BLOCK_R, True)
        offs = rm64[None, :] * stride_dxm + rk[:, None]
        mask = k_mask[:, None] & m_mask[None, :]
        if BLEND:
            acc_t = blend_dropped(acc_t, blend_ptr, bits_ptr, offs, mask, rm64, k0, m_mask, K, blend_scale,
                                  BLOCK_M, BLOCK_K, True)
        if SPLIT:
            store_slice(acc_t, dx_ptr, M.to(tl.int64) * stride_dxm, offs, mask, ticket_ptr + tl.program_id(0),
                        sum_ptr)
        else:
            tl.store(dx_ptr + offs, acc_t.to(dx_ptr.dtype.element_ty), mask=mask)
        if FUSE_DA and tl.program_id(1) == 0:  # after the store: the dX accumulator's registers are free
            da_partial(g_ptr, x_ptr, bits_ptr, da_ptr, pid_m, rm64, rk, k0, m_mask, k_mask, K, R, stride_xm,
                       lora_scale, DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + rn
            n_mask = n < N
            if EVEN_N:
                dyt = tl.load(dy_rows + n[None, :])
            else:
                dyt = tl.load(dy_rows + n[None, :], mask=n_mask[None, :], other=0.0)
            wt = load_w_tile(w_ptr, ws_ptr, wz_ptr, n[:, None], rk[None, :], k0, n_mask[:, None],
                             k_mask[None, :], K, WFMT, QBLOCK, ROWS_ALIGNED, BLOCK_K)
            acc = tl.dot(dyt, wt.to(dyt.dtype), acc)
        acc += dx_lora_term(g_ptr, a_ptr, bits_ptr, rm64, rk, k0, m_mask, k_mask, K, R, lora_scale, DROPOUT,
                            BLOCK_M, BLOCK_K, BLOCK_R)
        offs = rm64[:, None] * stride_dxm + rk[None, :]
        mask = m_mask[:, None] & k_mask[None, :]
        if BLEND:
            acc = blend_dropped(acc, blend_ptr, bits_ptr, offs, mask, rm64, k0, m_mask, K, blend_scale, BLOCK_M,
                                BLOCK_K)
        tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)
        if FUSE_DA:
            da_partial(g_ptr, x_ptr, bits_ptr, da_ptr, pid_m, rm64, rk, k0, m_mask, k_mask, K, R, stride_xm,
                       lora_scale, DROPOUT, BLOCK_M, BLOCK_K, BLOCK_R)


# EVEN_N follows from the config the autotuner tries (its BLOCK_N) and the call's N
_lora_dx_even_n = triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})(_lora_dx_kernel)


@triton.jit
def dx_lora_term(g_ptr, a_ptr, bits_ptr, rm64, rk, k0, m_mask, k_mask, K, R, lora_scale, DROPOUT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 TRANSPOSED: tl.constexpr = False):
    """m ⊙ ((s/(1-p)·g)·A) for the dX tile [BLOCK_M, BLOCK_K] (or its transpose), in rank slices."""
    if TRANSPOSED:
        lo = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    else:
        lo = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_R):
        rj = j0 + tl.arange(0, BLOCK_R)
        j_mask = rj < R
        if TRANSPOSED:
            gt = tl.load(g_ptr + rm64[None, :] * R + rj[:, None], mask=j_mask[:, None] & m_mask[None, :], other=0.0)
            at = tl.load(a_ptr + rj[None, :] * K + rk[:, None], mask=k_mask[:, None] & j_mask[None, :], other=0.0)
            lo = tl.dot(fp16_widened(at), low_rank_operand(gt * lora_scale, at), lo)
        else:
            gt = tl.load(g_ptr + rm64[:, None] * R + rj[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0)
            at = tl.load(a_ptr + rj[:, None] * K + rk[None, :], mask=j_mask[:, None] & k_mask[None, :], other=0.0)
            lo = tl.dot(low_rank_operand(gt * lora_scale, at), fp16_widened(at), lo)
    if DROPOUT:
        kept = load_bits(bits_ptr, rm64, k0, (K + 7) // 8, m_mask, BLOCK_M, BLOCK_K)
        if TRANSPOSED:
            kept = tl.trans(kept)
        lo = tl.where(kept, lo, 0.0)
    return lo


@triton.jit
def blend_dropped(acc, other_ptr, bits_ptr, offs, mask, rm64, k0, m_mask, K, keep_scale,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """x's gradient where x went in twice, as drop(x) and as c = x − drop(x) (DoRA with dropout): ``acc`` is
    c's gradient (this reduction slice's share of it), ``other_ptr`` drop(x)'s at ``offs``; with the keep bits
    m and q = ``keep_scale`` = 1/(1-p), dx = acc + m·q·(other − acc). That is affine in acc: each slice of a
    split scales its share by 1 − m·q, and the first adds m·q·other."""
    kept = load_bits(bits_ptr, rm64, k0, (K + 7) // 8, m_mask, BLOCK_M, BLOCK_K)
    if TRANSPOSED:
        kept = tl.trans(kept)
    w = tl.where(kept, keep_scale, 0.0)
    out = acc * (1.0 - w)
    if tl.program_id(1) == 0:
        out += w * tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return out


@triton.jit
def da_partial(g_ptr, x_ptr, bits_ptr, da_ptr, pid_m, rm64, rk, k0, m_mask, k_mask, K, R, stride_xm, out_scale,
               DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dA's partial sum over this dX tile's rows, out_scale · gᵀ·drop(x) [R, BLOCK_K], into row tile
    ``pid_m`` of the workspace (the launcher adds the row tiles): the epilogue reads x once more (the
    separate pass would read all of it again), its r-deep products are r / N of the main loop's."""
    xt = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    if DROPOUT:
        xt = tl.where(load_bits(bits_ptr, rm64, k0, (K + 7) // 8, m_mask, BLOCK_M, BLOCK_K), xt, 0.0)
    out = da_ptr + pid_m.to(tl.int64) * R * K
    for j0 in range(0, R, BLOCK_R):
        rj = j0 + tl.arange(0, BLOCK_R)
        j_mask = rj < R
        gt = tl.load(g_ptr + rm64[None, :] * R + rj[:, None], mask=j_mask[:, None] & m_mask[None, :], other=0.0)
        part = tl.dot(low_rank_operand(gt, xt), fp16_widened(xt))
        tl.store(out + rj.to(tl.int64)[:, None] * K + rk[None, :], part * out_scale,
                 mask=j_mask[:, None] & k_mask[None, :])


@triton.jit
def _reduce_m_kernel(
    # pointers: big [M, C] (x), thin fp32 [M, R] (g), keep bits [M, ceil(C/8)], workspace fp32 [splits, R, C]
    big_ptr, thin_ptr, bits_ptr, ws_ptr,
    # sizes
    M, C, R, rows_per_split,
    # strides: big's rows
    stride_bm,
    # output scale
    out_scale,
    # meta-parameters
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial sums over one slice of M: out[j, c] = out_scale · Σ_m thin[m, j] · drop(big)[m, c]."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rj = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    c_mask = rc < C
    j_mask = rj < R
    m_start = pid_s * rows_per_split
    m_end = min(M, m_start + rows_per_split)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < m_end
        rm64 = rm.to(tl.int64)
        bt = tl.load(big_ptr + rm64[:, None] * stride_bm + rc[None, :], mask=m_mask[:, None] & c_mask[None, :],
                     other=0.0)
        if DROPOUT:
            bt = tl.where(load_bits(bits_ptr, rm64, pid_c * BLOCK_C, (C + 7) // 8, m_mask, BLOCK_M, BLOCK_C), bt, 0.0)
        tt = tl.load(thin_ptr + rm64[None, :] * R + rj[:, None], mask=j_mask[:, None] & m_mask[None, :], other=0.0)
        acc = tl.dot(low_rank_operand(tt, bt), fp16_widened(bt), acc)
    out = ws_ptr + pid_s.to(tl.int64) * C * R
    tl.store(out + rj.to(tl.int64)[:, None] * C + rc[None, :], acc * out_scale,
             mask=j_mask[:, None] & c_mask[None, :])


@triton.jit
def _g_db_kernel(
    # pointers: dY [M, N], B [N, R], xa fp32 [M, R]; workspaces fp32 g [n_splits, M, R], dB [m_tiles, N, R];
    # with several column splits: g fp32 [M, R] and int32 tickets [m_tiles, rank slices], all 0 at launch
    dy_ptr, b_ptr, xa_ptr, g_ws_ptr, db_ws_ptr, g_ptr, ticket_ptr,
    # sizes: N columns per split (a multiple of BLOCK_N)
    M, N, R, cols_per_split,
    # strides
    stride_dym,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over dY for both thin products: program (row tile, column split, rank slice) streams its
    [BLOCK_M, cols_per_split] part of dY once and writes g's partial sum over those columns and dB's
    partial sum over those rows (unscaled; the launcher sums dB's). The last split of a row tile to finish
    adds g's partials, in split order (the same sum every run), so dX needs no launch between."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = rm < M
    j_mask = rj < R
    rm64 = rm.to(tl.int64)
    xa = tl.load(xa_ptr + rm64[:, None] * R + rj[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0)
    n_start = pid_s * cols_per_split
    n_end = min(N, n_start + cols_per_split)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    db_rows = db_ws_ptr + pid_m.to(tl.int64) * N * R
    for n0 in range(n_start, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < n_end
        dyt = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :], mask=m_mask[:, None] & n_mask[None, :],
                      other=0.0)
        bt = tl.load(b_ptr + rn.to(tl.int64)[:, None] * R + rj[None, :], mask=n_mask[:, None] & j_mask[None, :],
                     other=0.0)
        g = tl.dot(dyt, bt, g)
        db = tl.dot(tl.trans(fp16_widened(dyt)), low_rank_operand(xa, dyt))
        tl.store(db_rows + rn.to(tl.int64)[:, None] * R + rj[None, :], db, mask=n_mask[:, None] & j_mask[None, :])
    g_offs = rm64[:, None] * R + rj[None, :]
    g_mask = m_mask[:, None] & j_mask[None, :]
    store_slice(g, g_ws_ptr, M.to(tl.int64) * R, g_offs, g_mask,
                ticket_ptr + pid_m * tl.num_programs(2) + tl.program_id(2), g_ptr)


@triton.jit
def _sum_slot(ws_ptr, out_ptr, parts, numel, scale, pid, BLOCK: tl.constexpr):
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + offs
    for _ in range(0, parts):  # in order: the same sum every run; the pointer steps a slice (64-bit)
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel
    tl.store(out_ptr + offs, acc * scale, mask=mask)


@triton.jit
def _sum_partials_kernel(
    # two independent sums, one launch: out = scale · Σ_i ws[i] over ``parts`` slices of ``numel`` fp32
    a_ws, a_out, a_parts, a_numel, a_scale, a_programs,
    b_ws, b_out, b_parts, b_numel, b_scale,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < a_programs:
        _sum_slot(a_ws, a_out, a_parts, a_numel, a_scale, pid, BLOCK)
    else:
        _sum_slot(b_ws, b_out, b_parts, b_numel, b_scale, pid - a_programs, BLOCK)


SUM_BLOCK = 1024


def sum_partials(first: tuple, second: tuple | None = None) -> tuple:
    """(scale · Σ_i ws[i] for (ws, parts, scale) in (first, second)): fp32 partial-sum workspaces [>= parts,
    *shape] (contiguous; slices past ``parts`` are ignored) added in slice order, both in one launch."""
    jobs = [j for j in (first, second) if j is not None]
    outs = [torch.empty(ws.shape[1:], dtype=torch.float32, device=ws.device) for ws, _, _ in jobs]
    numels = [o.numel() for o in outs]
    programs = [triton.cdiv(n, SUM_BLOCK) for n in numels]
    if sum(programs):
        (a_ws, a_parts, a_scale), (b_ws, b_parts, b_scale) = jobs[0], jobs[-1]
        _sum_partials_kernel[(sum(programs),)](
            a_ws, outs[0], a_parts, numels[0], float(a_scale), programs[0],
            b_ws, outs[-1], b_parts if len(jobs) > 1 else 0, numels[-1], float(b_scale),
            BLOCK=SUM_BLOCK, num_warps=4,
        )
    return tuple(outs) + ((None,) if second is None else ())


# ---------------------------------------------------------------------------------------------------------
# launch configs

# dA streams x once; a 64-wide column tile with 64-row steps keeps the fp32 operand tiles at 16 KiB each,
# and the split over M aims at ~2 programs per SM of an H100 (132 SMs).
REDUCE_CONFIG = {"BLOCK_M": 64, "BLOCK_COLS": 64, "num_warps": 4, "num_stages": 3}
INTERPRET_REDUCE_CONFIG = {"BLOCK_M": 16, "BLOCK_COLS": 32, "num_warps": 4, "num_stages": 1}
# g and dB stream dY once. dB's partial sums cost 4·r bytes per (row tile, column) in the workspace, written
# and read back: 256-row tiles keep that at an eighth of dY's bytes at r = 16 (64-row tiles would make it
# half); the column splits then give ~1 program per SM at M = 4096, whose g partials cost 4·r bytes per
# (split, row).
G_DB_CONFIG = {"BLOCK_M": 256, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
INTERPRET_G_DB_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
TARGET_PROGRAMS = 264
G_DB_TARGET_PROGRAMS = 132


def _reduce_config() -> dict:
    return INTERPRET_REDUCE_CONFIG if interpreted() else REDUCE_CONFIG


def _g_db_config() -> dict:
    return INTERPRET_G_DB_CONFIG if interpreted() else G_DB_CONFIG


def split_len(length: int, other_programs: int, block: int, target: int) -> tuple[int, int]:
    """(number of slices, slice length) cutting ``length`` into slices of whole ``block``s so that
    ``other_programs`` x slices is about ``target`` programs."""
    tiles = triton.cdiv(max(length, 1), block)
    splits = max(1, min(tiles, target // max(other_programs, 1)))
    size = triton.cdiv(tiles, splits) * block
    return triton.cdiv(max(length, 1), size), size


# dA rides in dX's epilogue up to this rank: its workspace (one fp32 [r, K] per row tile, allocated for the
# smallest row tile the autotuner may pick, 32) is then at most twice x's bytes
FUSED_DA_MAX_RANK = 32


def lora_dx(dy, g, w, w_scales, w_zeros, fmt, block, lora_A, scale, p, bits, nested=None,
            x=None, blend=None, blend_p=0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dX, dA's job or None): with ``x`` given (M, K > 0, unit column stride) dA = s/(1-p)·(m ⊙ x)ᵀ·g comes
    from the same launch, each program writing its rows' share to a workspace row tile; the job
    (workspace, row tiles, 1) is for ``sum_partials``. With ``blend`` (drop(x)'s gradient [M, K],
    contiguous; ``bits`` then its keep bits, ``blend_p`` its drop probability) dX is mixed with it as
    ``blend_dropped`` says."""
    m, n = dy.shape
    r, k = lora_A.shape
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0 or k == 0:
        return dx, None
    wfmt = FORMATS[fmt]
    g, lora_A = readable(g), readable(lora_A, dy)
    dummy = g
    aligned = wfmt != 0 and k % block == 0
    na, nc, noff = nested if nested is not None else (dummy, dummy, 0.0)
    splits = reduction_splits(m, k, n, sm_count(dy.device)) if aligned else 1
    out = dx if splits == 1 else torch.empty((splits, m, k), dtype=torch.float32, device=dy.device)
    tix = split_tickets("dx", wfmt == 0, aligned, m, k, dy.device) if splits > 1 else dummy
    fuse_da = x is not None
    if blend is not None and (tuple(blend.shape) != (m, k) or not blend.is_contiguous()):
        raise ValueError(f"blend: expected a contiguous [{m}, {k}] tensor, got {tuple(blend.shape)}")
    if fuse_da:
        smallest = min(c["BLOCK_M"] for c in gemm_configs("dx", wfmt == 0, aligned or wfmt == 0))
        da_ws = torch.empty((triton.cdiv(m, smallest), r, k), dtype=torch.float32, device=dy.device)
    kernel = gemm_kernel(_lora_dx_even_n, "dx", wfmt == 0, dy.device, aligned or wfmt == 0)
    kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]), splits)](
        dy, w, w_scales if w_scales is not None else dummy, w_zeros if w_zeros is not None else dummy,
        table_tensor(wfmt, dy.dtype, dy.device), na, nc, g, lora_A,
        bits if p > 0 or blend is not None else dummy, out, dx, tix,
        x if fuse_da else dy, da_ws if fuse_da else dummy, blend if blend is not None else dy,
        m, n, k, r, m_bucket(m), dy.stride(0), dx.stride(0), x.stride(0) if fuse_da else 0,
        float(scale) / (1.0 - p), float(noff), 1.0 / (1.0 - blend_p),
        WFMT=wfmt, QBLOCK=block if wfmt else 64, DQ=nested is not None, ROWS_ALIGNED=aligned, DROPOUT=p > 0,
        USE_ASM=not interpreted(), SPLIT=splits > 1, FUSE_DA=fuse_da, BLEND=blend is not None, BLOCK_R=block_r(r),
    )
    da = None
    if fuse_da:  # the row tiles of the config that ran (the autotuner's choice for this key)
        da = (da_ws, triton.cdiv(m, kernel.best_config.kwargs["BLOCK_M"]), 1.0)
    return dx, da


def reduce_da(x, g, out_scale, p=0.0, bits=None) -> torch.Tensor:
    """fp32 [R, K] = out_scale · gᵀ·drop(x) (split over M, the partial sums added by torch)."""
    m, c = x.shape
    r = g.shape[1]
    cfg = _reduce_config()
    col_tiles = triton.cdiv(c, cfg["BLOCK_COLS"])
    br = block_r(r)
    splits, rows = split_len(m, col_tiles, cfg["BLOCK_M"], TARGET_PROGRAMS)
    ws = torch.empty((splits, r, c), dtype=torch.float32, device=x.device)
    _reduce_m_kernel[(col_tiles, splits, triton.cdiv(r, br))](
        x, g, bits if p > 0 else g, ws, m, c, r, rows, x.stride(0),
        float(out_scale), DROPOUT=p > 0, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_COLS"],
        BLOCK_R=br, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return ws.sum(0) if splits > 1 else ws[0]


def g_and_db(dy, lora_B, xa, need_g: bool, need_db: bool, scale: float, defer_db: bool = False):
    """(g = dY·B fp32 [M, r] or None, dB = s·dYᵀ·xa fp32 [N, r] or None) from one pass over dY; with
    ``defer_db`` dB as its unsummed job for ``sum_partials`` (workspace, row tiles, s)."""
    m, n = dy.shape
    r = lora_B.shape[1]
    cfg = _g_db_config()
    br = block_r(r)
    m_tiles = triton.cdiv(max(m, 1), cfg["BLOCK_M"])
    splits, cols = split_len(n, m_tiles, cfg["BLOCK_N"], G_DB_TARGET_PROGRAMS)
    g_ws = torch.empty((splits, m, r), dtype=torch.float32, device=dy.device)
    db_ws = torch.empty((m_tiles, n, r), dtype=torch.float32, device=dy.device)
    g = g_ws[0] if splits == 1 else torch.empty((m, r), dtype=torch.float32, device=dy.device)
    if m == 0 or r == 0:
        db_ws.zero_()
        g.zero_()
    else:
        rank_slices = triton.cdiv(r, br)
        tix = tickets(dy.device, m_tiles * rank_slices) if splits > 1 else g
        _g_db_kernel[(m_tiles, splits, rank_slices)](
            dy, lora_B, xa, g_ws, db_ws, g, tix, m, n, r, cols, dy.stride(0),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=br,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    g = g if need_g else None
    if need_db and defer_db:
        return g, (db_ws, m_tiles, scale)
    db = sum_partials((db_ws, m_tiles, scale))[0] if need_db else None
    return g, db


def lora_backward(
    dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, bits: torch.Tensor | None,
    w: torch.Tensor, w_scales: torch.Tensor | None, w_zeros: torch.Tensor | None, fmt: str, block: int,
    lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, p: float,
    need_dx: bool = True, need_da: bool = True, need_db: bool = True, nested: tuple | None = None,
    blend: torch.Tensor | None = None, blend_p: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX in x's dtype, dA, dB in fp32) — each None when not needed. dY, x [M, *] with unit column stride;
    ``bits`` the forward's dropout keep bits when p > 0, or those of ``blend`` (``lora_dx``)."""
    m, k = x.shape
    fuse = need_dx and need_da and m > 0 and k > 0 and 0 < lora_A.shape[0] <= FUSED_DA_MAX_RANK
    # dB's partial sums wait for dA's (from dX's epilogue): one launch adds both
    g, db = g_and_db(dy, lora_B, xa, need_dx or need_da, need_db, scale, defer_db=fuse)
    dx = da = None
    if need_dx:
        dx, da = lora_dx(dy, g, w, w_scales, w_zeros, fmt, block, lora_A, scale, p, bits, nested,
                         x if fuse else None, blend, blend_p)
    if fuse:
        da, db_sum = sum_partials(da, db)
        db = db_sum if need_db else None
    elif need_da:
        # dA = s/(1-p)·(m ⊙ x)ᵀ·g, stored as [r, K]
        da = reduce_da(x, g, scale / (1.0 - p), p, bits)
    return dx, da, db


# ---------------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs

def aot_specs() -> list[dict]:
    specs = [spec("sum_partials", _sum_partials_kernel,
                  {"a_ws": "*fp32", "a_out": "*fp32", "a_parts": "i32", "a_numel": "i32", "a_scale": "fp32",
                   "a_programs": "i32", "b_ws": "*fp32", "b_out": "*fp32", "b_parts": "i32", "b_numel": "i32",
                   "b_scale": "fp32"},
                  {"BLOCK": SUM_BLOCK}, 4, 1)]
    rc, gc = REDUCE_CONFIG, G_DB_CONFIG
    for dname, dptr in DTYPES.items():
        ranks = list(rank_variants()) if dname == "bf16" else [("", block_r(AOT_R))]
        for suffix, br in ranks:
            specs.append(spec(
                f"reduce_m_{dname}_dropout{suffix}", _reduce_m_kernel,
                {"big_ptr": dptr, "thin_ptr": "*fp32", "bits_ptr": "*u8", "ws_ptr": "*fp32", "M": "i32",
                 "C": "i32", "R": "i32", "rows_per_split": "i32", "stride_bm": "i32", "out_scale": "fp32"},
                {"DROPOUT": True, "BLOCK_M": rc["BLOCK_M"], "BLOCK_C": rc["BLOCK_COLS"], "BLOCK_R": br},
                rc["num_warps"], rc["num_stages"]))
            specs.append(spec(
                f"g_db_{dname}{suffix}", _g_db_kernel,
                {"dy_ptr": dptr, "b_ptr": dptr, "xa_ptr": "*fp32", "g_ws_ptr": "*fp32", "db_ws_ptr": "*fp32",
                 "g_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32", "N": "i32", "R": "i32", "cols_per_split": "i32",
                 "stride_dym": "i32"},
                {"BLOCK_M": gc["BLOCK_M"], "BLOCK_N": gc["BLOCK_N"], "BLOCK_R": br},
                gc["num_warps"], gc["num_stages"]))
    # the dX output tile is [BLOCK_M, BLOCK_K], its N loop steps BLOCK_N
    specs += gemm_specs("dx", _lora_dx_kernel, lambda dptr, fid, dq: {
        "dy_ptr": dptr, **weight_signature(fid, dptr, dq), "tab_ptr": "*i32", "na_ptr": "*fp32", "nc_ptr": "*fp32",
        "g_ptr": "*fp32", "a_ptr": dptr, "bits_ptr": "*u8", "dx_ptr": dptr, "sum_ptr": dptr, "ticket_ptr": "*i32",
        "x_ptr": dptr, "da_ptr": "*fp32", "blend_ptr": dptr,
        "M": "i32", "N": "i32", "K": "i32", "R": "i32", "M_BUCKET": "i32", "stride_dym": "i32", "stride_dxm": "i32",
        "stride_xm": "i32", "lora_scale": "fp32", "noff": "fp32", "blend_scale": "fp32"},
        {"DROPOUT": True, "USE_ASM": True, "SPLIT": False, "EVEN_N": True, "FUSE_DA": True, "BLEND": False})
    # N not a multiple of BLOCK_N (every step masks its rows): once, on the large-M 4-bit config
    base = next(s for s in specs if s["name"] == "lora_dx_bf16_nf4-dq_128x128x64")
    ragged = dict(base, name=base["name"] + "_ragged_n", constexprs={**base["constexprs"], "EVEN_N": False})
    # dA by its own pass (ranks above FUSED_DA_MAX_RANK, rank 0, dX without dA): the same config
    no_da = dict(base, name=base["name"] + "_no_da", constexprs={**base["constexprs"], "FUSE_DA": False})
    # the rank-0 dX of DoRA with dropout, mixing in drop(x)'s gradient (``blend_dropped``), on the bf16 configs
    # the large-M dX picks from
    blend = [dict(s, name=s["name"] + "_blend",
                  constexprs={**s["constexprs"], "DROPOUT": False, "FUSE_DA": False, "BLEND": True})
             for s in specs if re.fullmatch(r"lora_dx_bf16_(dense_128x64x128|nf4-dq_128x128x64)", s["name"])]
    return specs + [ragged, no_da] + blend
