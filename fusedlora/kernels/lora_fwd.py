"""Fused LoRA forward: y = x·deq(W)ᵀ + s·xa·Bᵀ (+ bias), with xa = drop(x)·Aᵀ.

Shapes: x [M, K] (row stride ``stride_xm``, unit column stride), W [N, K] dense or 4-bit (see
``weight_tile``), A [r, K], B [N, r], bias [N], y [M, N]; xa [M, r] is fp32.

Two launches:
1. ``_lowrank_kernel``: xa = drop(x)·Aᵀ (A given by strides). Dropout keeps x[m, k] by ``dropout.keep_bytes``
   (Philox, eight elements per call), scales the fp32 result by 1/(1-p), and writes the keep-mask as bits
   for the backward. A program owns BLOCK_M rows (and, at few rows, a slice of K) and one slice of at most
   RANK_SLICE ranks, and streams its rows once; A is tiny and stays in cache.
2. ``_lora_fwd_kernel``: one GEMM over tiles of y whose K loop reads W tiles (a dense W, or a 4-bit one
   decoded in registers: the in-loop path of ``ops.paths``; on its dequant path the op hands over the
   decode in the scratch buffer as a dense W), followed by r extra K-steps in rank slices:
   y_tile += (s·xa_tile)·B_tileᵀ, i.e. y = [x | s·xa]·[W | B]ᵀ, then bias, then one store. Accumulation is
   fp32; operands of the tensor core dots are x's dtype (fp32 inputs run tf32 dots on GPUs), except s·xa
   for fp16 inputs, which stays fp32 (tf32 dot) so it cannot overflow. Tiles are visited in GROUP_M-row
   bands so consecutive programs share W tiles in L2.
At few tokens without dropout (``fuses_xa``) the 4-bit GEMM makes xa in its own K loop and the first
launch does not run.

Offsets that scale with M·K, M·N or N·K are built in int64 once per row; per-element offsets stay int32.

``decode_absmax`` turns double-quantized NF4 absmax codes into fp32 (one small launch over n_blocks
elements, ≈ N·K/64): absmax[i] = nested_code[qa[i]] · nested_absmax[i // 256] + nested_offset.

Launch configs: the GEMMs (this forward and the backward's dX) are autotuned over a short list (one for
4-bit weights, one per GEMM for dense ones) keyed on M rounded up to a power of two (so a new token count
inside a bucket does not retune), N, K and the weight format, one autotuner per device; under
TRITON_INTERPRET=1 a single small config; ``set_gemm_configs`` replaces the lists (sweeps).
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

from . import interpreted
from .code_lookup import load_w_codes, table_tensor
from .dropout import keep_bytes, threshold, unpack_bits
from .split_sum import store_slice, tickets
from .weight_tile import FORMATS, load_w_tile


@triton.jit
def nested_absmax(qa_ptr, code_ptr, nested_absmax_ptr, i, mask, offset, NESTED_BLOCK: tl.constexpr):
    """fp32 absmax of double-quantized NF4 blocks ``i``: code[qa[i]] · nested_absmax[i // NESTED_BLOCK] +
    offset (0 where ``mask`` is off)."""
    qa = tl.load(qa_ptr + i, mask=mask, other=0).to(tl.int32)
    code = tl.load(code_ptr + qa, mask=mask, other=0.0)
    return code * tl.load(nested_absmax_ptr + i // NESTED_BLOCK, mask=mask, other=0.0) + offset


@triton.jit
def _decode_absmax_kernel(
    # pointers
    qa_ptr, code_ptr, nested_absmax_ptr, out_ptr,
    # sizes
    n_blocks, offset,
    # meta-parameters
    NESTED_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_blocks
    tl.store(out_ptr + i, nested_absmax(qa_ptr, code_ptr, nested_absmax_ptr, i, mask, offset, NESTED_BLOCK),
             mask=mask)


@triton.jit
def _lowrank_kernel(
    # pointers: x [M, K]; V element (j, k) at v_ptr + j*stride_vj + k*stride_vk; out fp32 [M, R]; with
    # dropout the keep-mask bits [M, ceil(K / 8)] written by the first rank slice; with K slices, out is
    # their workspace [slices, M, R], sum_ptr [M, R] the result and ticket_ptr the ``split_sum`` counters
    x_ptr, v_ptr, seed_ptr, out_ptr, bits_ptr, sum_ptr, ticket_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_vj, stride_vk,
    # dropout: keep threshold (``dropout.threshold``), 1/(1-p)
    thresh, inv_keep,
    # meta-parameters
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # programs are (row block, K slice, column block of out): ranks above BLOCK_R re-read x once per column
    # block; at few rows K is cut into slices (split_range) whose fp32 partial sums out_ptr[s] holds, the
    # last slice of a tile to finish adding them into sum_ptr
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rj = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = rm < M
    j_mask = rj < R
    rm64 = rm.to(tl.int64)
    x_rows = x_ptr + rm64[:, None] * stride_xm
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo, k_hi = split_range(K, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DROPOUT:
            byte = keep_bytes(seed, rm64, k0, K, thresh, BLOCK_M, BLOCK_K)
            xt = tl.where(unpack_bits(byte, BLOCK_M, BLOCK_K), xt, 0.0)
            if tl.program_id(2) == 0:
                jb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                kb = (K + 7) // 8
                tl.store(bits_ptr + rm64[:, None] * kb + jb[None, :], byte, mask=m_mask[:, None] & (jb < kb)[None, :])
        vt = tl.load(v_ptr + k[:, None] * stride_vk + rj[None, :] * stride_vj,
                     mask=k_mask[:, None] & j_mask[None, :], other=0.0)
        acc = tl.dot(xt, vt, acc)
    if DROPOUT:
        acc = acc * inv_keep
    offs = rm64[:, None] * R + rj[None, :]
    mask = m_mask[:, None] & j_mask[None, :]
    store_slice(acc, out_ptr, M.to(tl.int64) * R, offs, mask,
                ticket_ptr + tl.program_id(0) * tl.num_programs(2) + tl.program_id(2), sum_ptr)


@triton.jit
def lora_epilogue(acc, xa_ptr, b_ptr, rm64, rn, m_mask, n_mask, R, scale, BLOCK_R: tl.constexpr,
                  TRANSPOSED: tl.constexpr = False):
    """acc + s·xa[rm, :]·B[rn, :]ᵀ for acc [BLOCK_M, BLOCK_N], or its transpose acc + B[rn, :]·(s·xa[rm, :])ᵀ
    for acc [BLOCK_N, BLOCK_M] when TRANSPOSED; in BLOCK_R-wide slices of r (any rank, registers bounded
    by BLOCK_R)."""
    for j0 in range(0, R, BLOCK_R):
        rj = j0 + tl.arange(0, BLOCK_R)
        j_mask = rj < R
        if TRANSPOSED:
            xa = tl.load(xa_ptr + rm64[None, :] * R + rj[:, None], mask=j_mask[:, None] & m_mask[None, :],
                         other=0.0)
            bt = b_rows(b_ptr, rn, n_mask, rj, j_mask, R)
            acc = tl.dot(fp16_widened(bt), low_rank_operand(xa * scale, bt), acc)
        else:
            xa = tl.load(xa_ptr + rm64[:, None] * R + rj[None, :], mask=m_mask[:, None] & j_mask[None, :],
                         other=0.0)
            bt = tl.load(b_ptr + rn.to(tl.int64)[None, :] * R + rj[:, None], mask=j_mask[:, None] & n_mask[None, :],
                         other=0.0)
            acc = tl.dot(low_rank_operand(xa * scale, bt), fp16_widened(bt), acc)
    return acc


@triton.jit
def b_rows(b_ptr, rn, n_mask, rj, j_mask, R):
    """B[rn, rj] [len(rn), len(rj)] (0 outside the masks)."""
    return tl.load(b_ptr + rn.to(tl.int64)[:, None] * R + rj[None, :], mask=n_mask[:, None] & j_mask[None, :],
                   other=0.0)


@triton.jit
def low_rank_operand(v, other):
    """The fp32 left factor of an r-deep dot, as the dot's operand type: ``other``'s dtype for bf16 (fp32's
    range, so no overflow) and fp32; fp32 for fp16, whose 65504 limit s·xa or s·g may pass where the fp32
    reference does not (the dot then runs in tf32, the same 10-bit mantissa as fp16)."""
    if other.dtype == tl.float16:
        out = v
    else:
        out = v.to(other.dtype)
    return out


@triton.jit
def fp16_widened(v):
    """``v`` as the right operand of an r-deep dot whose left one is ``low_rank_operand``."""
    if v.dtype == tl.float16:
        out = v.to(tl.float32)
    else:
        out = v
    return out


@triton.jit
def split_range(L, STEP: tl.constexpr):
    """[lo, hi) of this program's slice of a reduction of length L: slice program_id(1) of num_programs(1),
    whole STEPs each."""
    per = tl.cdiv(tl.cdiv(L, STEP), tl.num_programs(1)) * STEP
    lo = tl.program_id(1) * per
    return lo, min(L, lo + per)


@triton.jit
def band_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """(row tile, column tile) of program ``pid``, visiting tiles in bands of GROUP row tiles: consecutive
    programs share column tiles (the weight) while they are hot in L2."""
    num_r = tl.cdiv(rows, BLOCK_ROWS)
    num_c = tl.cdiv(cols, BLOCK_COLS)
    band = GROUP * num_c
    first = (pid // band) * GROUP
    height = min(num_r - first, GROUP)
    return first + (pid % band) % height, (pid % band) // height


@triton.jit
def _lora_fwd_kernel(
    # pointers (tab_ptr: the code table words of ``code_lookup``; na_ptr, nc_ptr: NF4's nested absmax and
    # code when DQ)
    x_ptr, w_ptr, ws_ptr, wz_ptr, tab_ptr, na_ptr, nc_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
    # HAS_RES: a tensor [M, N] added to y (row stride stride_rm)
    res_ptr,
    # SPLIT: y [M, N] (y_ptr is then the slices' workspace) and the ``split_sum`` counters, one per tile
    # (then, with FUSED_XA, one per row tile)
    sum_ptr, ticket_ptr,
    # FUSED_XA: A [R, K] contiguous, the fp32 workspace of xa's slices [splits, M, R] when SPLIT
    a_ptr, xa_ws_ptr,
    # sizes (M_BUCKET: M rounded up to a power of two, the autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_xm, stride_ym, stride_rm,
    # LoRA scale s; NF4's nested offset (DQ)
    scale, noff,
    # meta-parameters
    WFMT: tl.constexpr, QBLOCK: tl.constexpr, DQ: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, USE_ASM: tl.constexpr, SPLIT: tl.constexpr,
    FUSED_XA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # SPLIT (4-bit in-loop path, few tokens): program (tile, s) sums the s-th of num_programs(1) slices of K
    # into fp32 y_ptr[s] ([splits, M, N]), the LoRA term and bias in slice 0; the last slice of a tile to
    # finish adds them into sum_ptr (``split_sum``).
    # FUSED_XA (4-bit in-loop path, few tokens, no dropout, R <= BLOCK_R): xa = x·Aᵀ comes from the same K
    # loop (one r-row dot per step on the x tile already loaded) instead of the pre-kernel; each slice adds
    # the LoRA term of its own share of xa (the term is linear in xa) and the first column tile writes xa
    # out for the backward
    pid_m, pid_n = band_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    # rows past M read row M - 1 (their outputs are never stored): the x loads in the loop need no mask,
    # which costs a compare and a select per load per step otherwise
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm

    if WFMT != 0 and ROWS_ALIGNED and QBLOCK % BLOCK_K == 0:
        # yᵀ = W·xᵀ: the decoded tile is the left operand, which the tensor cores (wgmma) take straight from
        # registers. NF4 with BLOCK_M <= BLOCK_K: each K step is one scale block per row, applied to the
        # step's product (BLOCK_M / BLOCK_K FMAs per weight element, but the loop then waits for its
        # wgmma); wider token tiles scale each weight element (``times_scale``: one instruction per element
        # in bf16, 2.5 in fp16) and keep a wgmma in flight. INT4 is always scaled per element (its zero
        # point would cost a second FMA per output).
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if FUSED_XA:
            rj = tl.arange(0, BLOCK_R)
            j_mask = rj < R
            xa_t = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        k_lo, k_hi = split_range(K, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            xt = tl.load(x_rows + (k0 + rk)[None, :])
            wt, w_scale = load_w_codes(w_ptr, ws_ptr, wz_ptr, tab_ptr, na_ptr, nc_ptr, noff, rn, k0, n_mask, K,
                                       WFMT, QBLOCK, DQ, BLOCK_N, BLOCK_K, xt.dtype, USE_ASM, BLOCK_M > BLOCK_K)
            if WFMT == 1 and BLOCK_M <= BLOCK_K:
                acc_t += tl.dot(wt, tl.trans(xt)) * w_scale[:, None]
            else:
                acc_t = tl.dot(wt, tl.trans(xt), acc_t)
            if FUSED_XA:
                at = tl.load(a_ptr + rj[:, None] * K + (k0 + rk)[None, :], mask=j_mask[:, None], other=0.0)
                xa_t = tl.dot(at, tl.trans(xt), xa_t)
        if FUSED_XA:
            # fp32 operands (tf32 on GPUs): a slice's share of s·xa is not rounded to a 16-bit type before the
            # shares are added
            acc_t = tl.dot(b_rows(b_ptr, rn, n_mask, rj, j_mask, R).to(tl.float32), xa_t * scale, acc_t)
            if pid_n == 0:
                xa_offs = rm64[None, :] * R + rj[:, None]
                xa_mask = j_mask[:, None] & m_mask[None, :]
                if SPLIT:
                    store_slice(xa_t, xa_ws_ptr, M.to(tl.int64) * R, xa_offs, xa_mask,
                                ticket_ptr + tl.num_programs(0) + pid_m, xa_ptr)
                else:
                    tl.store(xa_ptr + xa_offs, xa_t, mask=xa_mask)
        if tl.program_id(1) == 0:
            if not FUSED_XA:
                acc_t = lora_epilogue(acc_t, xa_ptr, b_ptr, rm64, rn, m_mask, n_mask, R, scale, BLOCK_R, True)
            if HAS_BIAS:
                acc_t += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        offs = rm64[None, :] * stride_ym + rn[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
        if HAS_RES and tl.program_id(1) == 0:
            acc_t += tl.load(res_ptr + rm64[None, :] * stride_rm + rn[:, None], mask=mask, other=0.0).to(tl.float32)
        if SPLIT:
            store_slice(acc_t, y_ptr, M.to(tl.int64) * stride_ym, offs, mask, ticket_ptr + tl.program_id(0), sum_ptr)
        else:
            tl.store(y_ptr + offs, acc_t.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_mask = k < K
            xt = tl.load(x_rows + k[None, :], mask=k_mask[None, :], other=0.0)
            wt = load_w_tile(w_ptr, ws_ptr, wz_ptr, rn[None, :], k[:, None], k0, n_mask[None, :],
                             k_mask[:, None], K, WFMT, QBLOCK, ROWS_ALIGNED, BLOCK_K)
            acc = tl.dot(xt, wt.to(xt.dtype), acc)
        # the LoRA term as r extra K-steps of the same accumulator
        acc = lora_epilogue(acc, xa_ptr, b_ptr, rm64, rn, m_mask, n_mask, R, scale, BLOCK_R)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + rm64[:, None] * stride_rm + rn[None, :], mask=m_mask[:, None] & n_mask[None, :],
                           other=0.0).to(tl.float32)
        tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------------------
# launch configs

def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
            "num_warps": warps, "num_stages": stages}


# The 4-bit in-loop GEMMs. BLOCK_K stays 64 so that every NF4/INT4 block size (64, 128, 256) is a multiple
# of it: one scale per row per K step. In the forward BLOCK_N is the weight rows (the register operand of
# wgmma, 64 per warpgroup) and BLOCK_M the tokens; in dX, BLOCK_K is the weight columns (the output width,
# held to 64 by the scale blocks), BLOCK_N the reduction step. The decode costs a fixed number of
# instructions per weight element (sm_90, bf16: ~7-11 forward, ~9-11 dX), the tensor work BLOCK_M MMAs per weight
# element: 256-token tiles hide the decode under the tensor cores (~16 instructions per element fit at
# 2048 FMA/clk per SM), 64- and 32-token tiles serve mid and small M.
INLOOP_FWD_CONFIGS = [
    _cfg(256, 128, 64, 8, 3),  # large M: two warpgroups of 64 weight rows x 256 tokens
    # mid M: one warpgroup, 128 weight rows x 128 tokens, each weight element scaled in the loop; the
    # tensor time per step (640 clocks) covers its ~520 instructions in bf16 (sm_90), one wave at M = 512
    _cfg(128, 128, 64, 4, 3),
    _cfg(128, 64, 64, 4, 3),   # the same with 64 weight rows: twice the programs over N
    _cfg(64, 128, 64, 4, 4),   # mid M, 64-token tiles: twice the programs where 128-token ones fill no wave
    _cfg(32, 64, 64, 4, 4),    # small M: N/64 programs spread the weight stream over more SMs
]
INLOOP_DX_CONFIGS = [
    _cfg(128, 128, 64, 4, 3),  # large M: one warpgroup, 64 weight columns x 128 tokens (256 spill)
    _cfg(64, 128, 64, 4, 4),
    _cfg(32, 64, 64, 4, 4),
]
# Configs that spill without wgmma's register operand (sm_80's mma.sync keeps both operands in registers
# differently): launches on GPUs before sm_90 leave them out.
HOPPER_ONLY = ({"BLOCK_M": 256, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 128})
# Configs the forward leaves out where it makes xa itself (``fuses_xa``, at most FUSED_XA_MAX_M tokens): beside
# their 128-register accumulators the 128 x 128 and 256 x 128 tiles then hold xa's, and spill in the sm_90
# builds of triton 3.8 (INT4: both; NF4: the first), while 256-token tiles are mostly empty there anyway.
NOT_FUSED_XA = ({"BLOCK_M": 128, "BLOCK_N": 128}, {"BLOCK_M": 256, "BLOCK_N": 128})
# 4-bit weights whose rows do not start on a byte or whose scale blocks cross K tiles (K % blocksize != 0,
# no real layer): every element gathers its own byte and scale, which needs small tiles not to spill.
UNALIGNED_CONFIGS = [_cfg(32, 32, 64, 4, 2)]
# Dense weights (a dense base, or a 4-bit one decoded into the scratch by the dequant path): no scale
# block to respect, so a deeper pipeline (4 stages of 32 KiB in bf16). 128x256 tiles would halve the x
# reloads but hold a 128-register accumulator per thread: the LoRA epilogue then spills (sm_90 build).
DENSE_FWD_CONFIGS = [
    _cfg(128, 128, 64, 8, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(32, 64, 64, 4, 4),
]
# dX writes [BLOCK_M, BLOCK_K] tiles and steps BLOCK_N along the reduction: 128-wide output tiles (the
# 4-bit dX is held to 64 by the scale blocks); 256-wide ones spill on sm_90.
DENSE_DX_CONFIGS = [
    _cfg(128, 64, 128, 8, 4),
    _cfg(64, 64, 128, 4, 4),
    _cfg(32, 64, 64, 4, 4),
]
# the interpreter runs one config; 32-wide tiles make small test shapes cover several tiles and masks
INTERPRET_CONFIG = _cfg(32, 32, 32, 4, 1, group_m=2)
# the thin r-wide GEMMs (pre-kernel): memory-bound streams of x; 32 rows per program gives M/32 programs
# (128 at M=4096) and a 32x128 tile keeps one warpgroup's loads 16 bytes wide.
LOWRANK_CONFIG = {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
LOWRANK_SMALL_M_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
INTERPRET_LOWRANK_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
M_BUCKET_CAP = 16384
# Ranks are processed in slices of at most RANK_SLICE columns, so registers and shared memory are bounded
# for any r (the largest rank the ops accept is ``ops.lora.MAX_RANK``); 64-wide slices spill on sm_80.
RANK_SLICE = 32


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), M_BUCKET_CAP)


def block_r(r: int) -> int:
    """Width of one rank slice: tl.dot needs every dimension >= 16; r pads up to a power of two, at most
    RANK_SLICE (larger ranks loop over slices)."""
    return min(max(16, triton.next_power_of_2(r)), RANK_SLICE)


_CONFIG_OVERRIDE: list[dict] | None = None


def _matches(cfg: dict, tiles: tuple) -> bool:
    return any(all(cfg[k] == v for k, v in t.items()) for t in tiles)


def hopper_only(cfg: dict, dense: bool) -> bool:
    return not dense and _matches(cfg, HOPPER_ONLY)


def gemm_configs(role: str, dense: bool, aligned: bool = True, hopper: bool = True,
                 fused_xa: bool = False) -> list[dict]:
    """Launch configs of a fused GEMM: ``role`` "fwd" or "dx", over a dense or a 4-bit weight (``aligned``:
    K a multiple of its block size), on an sm_90+ GPU or (``hopper`` False) an older one; ``fused_xa``: the
    forward making xa itself."""
    if _CONFIG_OVERRIDE is not None:
        return _CONFIG_OVERRIDE
    if interpreted():
        return [INTERPRET_CONFIG]
    if not dense:
        if not aligned:
            return UNALIGNED_CONFIGS
        configs = INLOOP_FWD_CONFIGS if role == "fwd" else INLOOP_DX_CONFIGS
        return [c for c in configs if (hopper or not hopper_only(c, dense))
                and not (fused_xa and _matches(c, NOT_FUSED_XA))]
    return DENSE_FWD_CONFIGS if role == "fwd" else DENSE_DX_CONFIGS


def set_gemm_configs(configs: list[dict] | None = None) -> None:
    """Autotune the fused GEMMs (forward and dX) over ``configs`` from now on (None: the built-in lists).

    For config sweeps on a GPU: pass one config to time it alone. Dicts as in ``INLOOP_FWD_CONFIGS``.
    """
    global _CONFIG_OVERRIDE
    _CONFIG_OVERRIDE = None if configs is None else [dict(c) for c in configs]
    _AUTOTUNED.clear()


def lowrank_config(m: int, sms: int) -> dict:
    """The pre-kernel's tile: 32 rows once that still gives two programs per SM, else 16."""
    if interpreted():
        return INTERPRET_LOWRANK_CONFIG
    return LOWRANK_CONFIG if triton.cdiv(m, LOWRANK_CONFIG["BLOCK_M"]) >= 2 * sms else LOWRANK_SMALL_M_CONFIG


def lowrank_splits(m_tiles: int, steps: int, sms: int) -> int:
    """Slices of K for the pre-kernel's ``m_tiles`` row tiles: none from one program per SM up (a stream
    needs bytes in flight, which 3 stages of a 16 x 128 tile per program give, not programs; slices cost
    the fp32 partials' bytes and a tail that reads them back), else ``slices``."""
    return 1 if m_tiles >= sms else slices(m_tiles, steps, sms)


def autotuned(kernel, configs: list[dict]):
    """``kernel`` autotuned over ``configs``, keyed on the M bucket, N, K and the weight format (tensor
    dtypes join the key on their own)."""
    tconfigs = [
        triton.Config({k: v for k, v in c.items() if not k.startswith("num_")},
                      num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in configs
    ]
    return triton.autotune(configs=tconfigs, key=["M_BUCKET", "N", "K", "WFMT", "ROWS_ALIGNED"])(kernel)


_AUTOTUNED: dict = {}


def gemm_kernel(kernel, role: str, dense: bool, device: torch.device, aligned: bool = True,
                fused_xa: bool = False):
    """``kernel`` (a fused GEMM) autotuned over ``gemm_configs(role, dense, aligned, fused_xa=fused_xa)``,
    one autotuner per device (the best config of one GPU says nothing about another)."""
    device = torch.device(device)
    key = (kernel, role, dense, aligned, device, fused_xa)
    if key not in _AUTOTUNED:
        hopper = device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9
        _AUTOTUNED[key] = autotuned(kernel, gemm_configs(role, dense, aligned, hopper, fused_xa))
    return _AUTOTUNED[key]


def _grid_2d(rows: int, cols: int, rows_key: str, cols_key: str, splits: int = 1):
    return lambda meta: (triton.cdiv(rows, meta[rows_key]) * triton.cdiv(cols, meta[cols_key]), splits)


_SMS: dict = {}
# programs per SM the reduction splits aim at, and the fewest K steps (of 64) a slice keeps
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_MIN_STEPS = 4


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (4 for CPU tensors under the interpreter, so tests see splits)."""
    device = torch.device(device)
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
            else 4
    return _SMS[device]


def slices(programs: int, steps: int, sms: int) -> int:
    """Slices of a reduction of ``steps`` steps run by ``programs`` programs each, so that programs x slices
    is about SPLIT_PROGRAMS_PER_SM per SM, each slice at least SPLIT_MIN_STEPS steps."""
    return max(1, min(triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, max(programs, 1)), steps // SPLIT_MIN_STEPS))


def reduction_splits(m: int, cols: int, length: int, sms: int) -> int:
    """Slices of a 4-bit in-loop GEMM's reduction (K for the forward, N for dX) at few tokens on ``sms``
    SMs: tiles counted at the smallest config (32 tokens x 64 columns), steps of 64. Few tokens leave most
    SMs idle otherwise: M <= 32 on a 4096-wide layer is 64 tiles for 132 SMs."""
    return slices(triton.cdiv(m, 32) * triton.cdiv(cols, 64), length // 64, sms)


def split_tickets(role: str, dense: bool, aligned: bool, rows: int, cols: int, device) -> torch.Tensor:
    """``split_sum`` counters for a sliced fused GEMM over [rows, cols] outputs: one per output tile, then
    one per row tile (the forward's xa), for the config with the smallest tiles the autotuner may pick
    (``role`` "fwd": BLOCK_M x BLOCK_N tiles, "dx": BLOCK_M x BLOCK_K)."""
    col_key = "BLOCK_N" if role == "fwd" else "BLOCK_K"
    return tickets(device, max(triton.cdiv(rows, c["BLOCK_M"]) * (triton.cdiv(cols, c[col_key]) + 1)
                               for c in gemm_configs(role, dense, aligned or dense)))


# The forward takes xa = x·Aᵀ into its own K loop (FUSED_XA) without dropout, for ranks of one slice: one
# launch instead of two where launches are most of the time. Every column tile repeats the r-row product
# (r / BLOCK_N more tensor work), which is free only while the loop is bound by issuing its decode, not by
# the tensor cores. The static report (sm_90, Llama-3-8B projections) has the single launch faster up to
# 64 tokens everywhere, and up to 128 where 64-row tiles over N (the widest the fused forward keeps:
# NOT_FUSED_XA) fit in one wave: 0.78-0.98x the two launches' time on 4096 -> 4096 and 14336 -> 4096 at
# M = 65-128, but 1.07x on 4096 -> 14336, whose plain 128 x 128 tiles fill the chip in one wave.
FUSED_XA_MAX_M = 128
FUSED_XA_ANY_N_MAX_M = 64
FUSED_XA_TILE_N = 64


def fuses_xa(m: int, n: int, r: int, p: float, aligned: bool, sms: int, hopper: bool = True) -> bool:
    """Whether the 4-bit in-loop forward over M tokens and N weight rows makes xa itself on a GPU of ``sms``
    SMs (``FUSED_XA_MAX_M``); sm_90+ only (``hopper``): before it the 64 x 128 config then spills (sm_80
    build)."""
    if not (hopper and aligned and p == 0.0 and 0 < r <= RANK_SLICE):
        return False
    return m <= FUSED_XA_ANY_N_MAX_M or (m <= FUSED_XA_MAX_M and triton.cdiv(n, FUSED_XA_TILE_N) <= sms)


# ---------------------------------------------------------------------------------------------------------
# launchers

def readable(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t``, or for an empty ``t`` (rank 0: a GEMM with no low-rank term, whose kernels never read it) a
    one-element tensor of ``like`` (default: fp32) on its device, so that every pointer argument is valid."""
    if t.numel():
        return t
    return torch.empty(1, dtype=torch.float32, device=t.device) if like is None else like.new_empty(1)


def decode_absmax(qa: torch.Tensor, nested_code: torch.Tensor, nested_absmax: torch.Tensor,
                  offset: float, nested_block: int = 256) -> torch.Tensor:
    """fp32 absmax of double-quantized NF4: nested_code[qa[i]] · nested_absmax[i // 256] + offset."""
    out = torch.empty(qa.numel(), dtype=torch.float32, device=qa.device)
    block = 1024
    _decode_absmax_kernel[(triton.cdiv(qa.numel(), block),)](
        qa, nested_code.float().contiguous(), nested_absmax.float().contiguous(), out, qa.numel(),
        float(offset), NESTED_BLOCK=nested_block, BLOCK=block, num_warps=4,
    )
    return out


def lowrank(x: torch.Tensor, lora_A: torch.Tensor, p: float = 0.0,
            seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [M, r] = drop(x)·Aᵀ, uint8 keep bits [M, ceil(K/8)] or [0] without dropout) for A [r, K]."""
    m, k = x.shape
    r = lora_A.shape[0]
    out = torch.empty((m, r), dtype=torch.float32, device=x.device)
    dropout = p > 0.0
    bits = torch.empty((m, triton.cdiv(k, 8)) if dropout else (0,), dtype=torch.uint8, device=x.device)
    if m == 0 or (r == 0 and not dropout):
        return out, bits
    sms = sm_count(x.device)
    cfg = lowrank_config(m, sms)
    br = block_r(r)
    m_tiles = triton.cdiv(m, cfg["BLOCK_M"])
    # few rows: slices of K so that the stream of x still occupies the GPU
    splits = lowrank_splits(m_tiles, k // cfg["BLOCK_K"], sms)
    part = out if splits == 1 else torch.empty((splits, m, r), dtype=torch.float32, device=x.device)
    rank_slices = triton.cdiv(r, br)
    tix = tickets(x.device, m_tiles * rank_slices) if splits > 1 else out
    _lowrank_kernel[(m_tiles, splits, rank_slices)](
        x, lora_A, seed if dropout else out, part, bits, out, tix, m, k, r, x.stride(0), lora_A.stride(0),
        lora_A.stride(1),
        threshold(p), 1.0 / (1.0 - p), DROPOUT=dropout, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=br, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, bits


def lora_forward(
    x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor | None, w_zeros: torch.Tensor | None,
    fmt: str, n: int, block: int, lora_A: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None,
    scale: float, p: float, seed: torch.Tensor | None, nested: tuple | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [M, N] in x's dtype, xa [M, r] fp32, dropout keep bits [M, ceil(K/8)] uint8 or [0]). x [M, K] with
    unit column stride; all else contiguous.

    ``fmt`` is "dense" (w [N, K]), "nf4" (w the packed bytes, w_scales fp32 absmax, or with ``nested`` =
    (nested_absmax, nested_code, offset) the uint8 absmax codes, for a K that is a multiple of the block
    size) or "int4" (w bytes [N, K/2], w_scales fp32 [N, K/block], w_zeros uint8); ``seed`` a 1-element
    int64 tensor when p > 0; ``residual`` [M, N] (unit column stride), added to y in the GEMM's epilogue.
    """
    m, k = x.shape
    r = lora_A.shape[0]
    wfmt = FORMATS[fmt]
    aligned = wfmt != 0 and k % block == 0
    hopper = x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] >= 9
    fused_xa = m > 0 and n > 0 and fuses_xa(m, n, r, p, aligned, sm_count(x.device), hopper)
    if fused_xa:  # written by the GEMM below
        xa = torch.empty((m, r), dtype=torch.float32, device=x.device)
        bits = torch.empty((0,), dtype=torch.uint8, device=x.device)
    else:
        xa, bits = lowrank(x, lora_A, p, seed)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y, xa, bits
    xa_in, b_in = readable(xa), readable(lora_B, x)
    dummy = xa_in
    na, nc, noff = nested if nested is not None else (dummy, dummy, 0.0)
    splits = reduction_splits(m, n, k, sm_count(x.device)) if aligned else 1
    out = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    tix = split_tickets("fwd", wfmt == 0, aligned, m, n, x.device) if splits > 1 else dummy
    xa_ws = torch.empty((splits, m, r), dtype=torch.float32, device=x.device) if fused_xa and splits > 1 else dummy
    kernel = gemm_kernel(_lora_fwd_kernel, "fwd", wfmt == 0, x.device, aligned or wfmt == 0, fused_xa)
    kernel[_grid_2d(m, n, "BLOCK_M", "BLOCK_N", splits)](
        x, w, w_scales if w_scales is not None else dummy, w_zeros if w_zeros is not None else dummy,
        table_tensor(wfmt, x.dtype, x.device), na, nc, xa_in, b_in, bias if bias is not None else dummy, out,
        residual if residual is not None else dummy, y, tix, lora_A.contiguous() if fused_xa else b_in, xa_ws,
        m, n, k, r, m_bucket(m), x.stride(0), y.stride(0), residual.stride(0) if residual is not None else 0,
        float(scale), float(noff),
        WFMT=wfmt, QBLOCK=block if wfmt else 64, DQ=nested is not None, ROWS_ALIGNED=aligned,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, USE_ASM=not interpreted(), SPLIT=splits > 1,
        FUSED_XA=fused_xa,
        BLOCK_R=block_r(r),
    )
    return y, xa, bits


# ---------------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs

DTYPES = {"fp16": "*fp16", "bf16": "*bf16"}
# (format name, WFMT, QBLOCK, ROWS_ALIGNED): the aligned path for every config; the per-element scale
# gather (NF4 with K % blocksize != 0) for one config per dtype.
SPEC_FORMATS = [("dense", 0, 64, False), ("nf4", 1, 64, True), ("nf4-dq", 1, 64, True), ("int4", 2, 128, True)]
AOT_R = 16


def weight_signature(fmt_id: int, dtype_ptr: str, dq: bool = False) -> dict:
    """Signature entries of (w_ptr, ws_ptr, wz_ptr) for a weight format (NF4 with ``dq``: uint8 absmax)."""
    if fmt_id == 0:
        return {"w_ptr": dtype_ptr, "ws_ptr": "*fp32", "wz_ptr": "*fp32"}
    return {"w_ptr": "*u8", "ws_ptr": "*u8" if dq else "*fp32", "wz_ptr": "*u8" if fmt_id == 2 else "*fp32"}


# Integer arguments that real layers pass as multiples of 16 (K, N, row strides, split lengths). The JIT specializes on
# that at launch (and on 16-byte aligned pointers, which torch allocations are); the AOT builds declare the
# same, so they compile the code that runs: without it no load is provably 16-byte aligned and the
# pipeliner leaves the GEMM main loops without asynchronous copies.
DIVISIBLE_INTS = ("K", "N", "C", "stride_xm", "stride_ym", "stride_dym", "stride_dxm", "stride_bm", "stride_vj",
                  "rows_per_split", "cols_per_split")


def spec(name, fn, signature, constexprs, num_warps, num_stages, large_m_gemm=False, targets=(80, 90)) -> dict:
    """One AOT spec; ``divisible_by_16`` lists the arguments the build may assume are multiples of 16,
    ``targets`` the compute capabilities whose launches can pick it."""
    sig = dict(signature)
    for c in constexprs:
        sig[c] = "constexpr"
    divisible = [a for a, t in signature.items() if t.startswith("*") or a in DIVISIBLE_INTS]
    return {"name": name, "fn": fn, "signature": sig, "constexprs": dict(constexprs), "num_warps": num_warps,
            "num_stages": num_stages, "large_m_gemm": large_m_gemm, "divisible_by_16": divisible,
            "targets": tuple(targets)}


# rank slices compiled besides AOT_R's (16): every width a rank can take, so spills or shared-memory
# overflow at any r fail the AOT build rather than a user's launch
RANK_GRID = (RANK_SLICE,)


def gemm_spec_variants(role: str):
    """(dtype name, pointer type, format name, WFMT, QBLOCK, ROWS_ALIGNED, config) to compile for ``role``
    ("fwd" or "dx"): every config a launch can pick."""
    for dname, dptr in DTYPES.items():
        for fname, fid, qblock, aligned in SPEC_FORMATS:
            for cfg in gemm_configs(role, fid == 0):
                yield dname, dptr, fname, fid, qblock, aligned, cfg
        yield dname, dptr, "nf4-unaligned", 1, 64, False, gemm_configs(role, False, aligned=False)[0]


def rank_variants():
    """(name suffix, BLOCK_R): the default slice, then the rank grid on one config per kernel."""
    yield "", block_r(AOT_R)
    for br in RANK_GRID:
        yield f"_r{br}", br


def aot_specs() -> list[dict]:
    specs = [spec("decode_absmax", _decode_absmax_kernel,
                  {"qa_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "out_ptr": "*fp32",
                   "n_blocks": "i32", "offset": "fp32"},
                  {"NESTED_BLOCK": 256, "BLOCK": 1024}, 4, 1)]
    for dname, dptr in DTYPES.items():
        for cname, cfg in (("small_m", LOWRANK_SMALL_M_CONFIG), ("large_m", LOWRANK_CONFIG)):
            for dropout in (False, True):
                grid = (cname, dropout, dname) == ("large_m", True, "bf16")
                for suffix, br in rank_variants() if grid else [("", block_r(AOT_R))]:
                    specs.append(spec(
                        f"lowrank_{dname}_{cname}{'_dropout' if dropout else ''}{suffix}", _lowrank_kernel,
                        {"x_ptr": dptr, "v_ptr": dptr, "seed_ptr": "*i64", "out_ptr": "*fp32", "bits_ptr": "*u8",
                         "sum_ptr": "*fp32", "ticket_ptr": "*i32", "M": "i32",
                         "K": "i32", "R": "i32", "stride_xm": "i32", "stride_vj": "i32",
                         "thresh": "i32", "inv_keep": "fp32"},
                        # a contiguous A: the JIT specializes the unit stride as a constant (16-byte loads)
                        {"stride_vk": 1, "DROPOUT": dropout, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_K": cfg["BLOCK_K"],
                         "BLOCK_R": br},
                        cfg["num_warps"], cfg["num_stages"]))
    gemms = gemm_specs("fwd", _lora_fwd_kernel, lambda dptr, fid, dq: {
        "x_ptr": dptr, **weight_signature(fid, dptr, dq), "tab_ptr": "*i32", "na_ptr": "*fp32", "nc_ptr": "*fp32",
        "xa_ptr": "*fp32", "b_ptr": dptr, "bias_ptr": dptr, "y_ptr": dptr, "res_ptr": dptr, "sum_ptr": dptr,
        "ticket_ptr": "*i32", "a_ptr": dptr, "xa_ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
        "R": "i32", "M_BUCKET": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_rm": "i32", "scale": "fp32",
        "noff": "fp32"},
        {"HAS_BIAS": True, "HAS_RES": False, "USE_ASM": True, "SPLIT": False, "FUSED_XA": False})
    # xa from the GEMM's own loop (FUSED_XA_MAX_M): every config the autotuner may try there, with the K
    # slices they run in; none of them serves large M, so none must keep a wgmma in flight
    fused_tiles = {(c["BLOCK_M"], c["BLOCK_N"]) for c in gemm_configs("fwd", False, fused_xa=True)}
    fused = [dict(base, name=base["name"] + "_fused_xa", targets=(90,), large_m_gemm=False,
                  constexprs={**base["constexprs"], "SPLIT": True, "FUSED_XA": True})
             for base in gemms if re.fullmatch(r"lora_fwd_(bf16|fp16)_(nf4|nf4-dq|int4)_\d+x\d+x64", base["name"])
             and (base["constexprs"]["BLOCK_M"], base["constexprs"]["BLOCK_N"]) in fused_tiles]
    # a residual added in the epilogue (DoRA with dropout: the second base product adds the first's output), on
    # the bf16 configs the large-M forward picks from
    res = [dict(base, name=base["name"] + "_res", constexprs={**base["constexprs"], "HAS_RES": True})
           for base in gemms if re.fullmatch(r"lora_fwd_bf16_(dense|nf4-dq)_(128x128|256x128|128x64)x64", base["name"])]
    return specs + gemms + fused + res


def gemm_specs(role: str, fn, signature, constexprs: dict) -> list[dict]:
    """AOT specs of the fused GEMM ``fn`` (``role`` "fwd" or "dx") for every format and config a launch can
    pick, plus the rank grid on the first config of each format in bf16. ``signature(dtype_ptr, WFMT, dq)``
    gives the argument types (``dq``: NF4 with double quantization); the name carries the tile as
    BLOCK_M x BLOCK_N x BLOCK_K."""
    specs = []
    for dname, dptr, fname, fid, qblock, aligned, cfg in gemm_spec_variants(role):
        meta = {k: v for k, v in cfg.items() if not k.startswith("num_")}
        first = cfg is gemm_configs(role, fid == 0)[0] and fname != "nf4-unaligned" and dname == "bf16"
        for suffix, br in rank_variants() if first else [("", block_r(AOT_R))]:
            dq = fname == "nf4-dq"
            specs.append(spec(
                f"lora_{role}_{dname}_{fname}_{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}{suffix}", fn,
                signature(dptr, fid, dq), {"WFMT": fid, "QBLOCK": qblock, "DQ": dq, "ROWS_ALIGNED": aligned,
                                           **constexprs, **meta, "BLOCK_R": br},
                # the configs that serve large M (128+ tokens per tile) must keep a wgmma in flight; the rank
                # grid is there for spills and shared memory, its speed is judged at the default rank
                cfg["num_warps"], cfg["num_stages"], large_m_gemm=cfg["BLOCK_M"] >= 128 and not suffix,
                targets=(90,) if hopper_only(cfg, fid == 0) else (80, 90)))
    return specs
