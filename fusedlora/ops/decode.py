"""The ``cuda`` family's LoRA linear: the hand-written decode kernel where it applies, Triton elsewhere.

The decode kernel (csrc/decode_lora.cu) is a memory-bound 4-bit GEMV fused with the LoRA products. It
runs when all of these hold, and the Triton kernels run otherwise (training always uses Triton, so the
forward that saved tensors and the backward agree on dropout and layout):
- the weight is 4-bit (a ``Packed4bit``) and x is bf16 or fp16;
- no gradient is needed (inference, or torch.no_grad) and dropout is off;
- 1 <= M = x.numel() / K <= ``decode_max_m(K, N)`` (``ops.lora`` answers M = 0 itself), and above
  DECODE_GEMV_MAX_M only where the tensor-core kernel runs (K and the block size multiples of 64); K is a
  multiple of 32 (16-byte loads never straddle rows) and the packed weight starts on a 16-byte boundary (x
  is copied to an aligned buffer when it does not).
The weight's metadata was validated by ``ops.lora`` (``formats.check_packed``), and the binding checks
the same sizes again in C++ before the kernel indexes anything.
``decode_max_m`` is the cut-over to the Triton path (below, from the prediction), to be replaced by the
one measured by bench/bench_decode.py on each GPU generation.
"""

from __future__ import annotations

import torch

from .._ext import extension_loaded
from ..formats.nf4 import nf4_code
from ..formats.packed import Packed4bit
from .registry import implementation, register

# The cut-over to the Triton path (the low-rank pre-kernel + the fused forward GEMM with in-loop decode),
# from bench/sass_loops.py's prediction (H100 and H200, Llama-3-8B projections, NF4 double quant, bf16):
# the tensor-core decode streams W once at any M, so it costs about the weight's bytes at the copy rate
# plus a launch, 5-14 µs up to M = 16, growing with M above as its tensor work and issue grow, while the
# Triton forward is issue-bound on its decode and costs 9-23 µs from M = 17 to 65. One cost the model
# leaves out grows with M: the re-reads of x from L2. The 16-row kernel (decode_lora_mma.cu) reads all of
# x again per 16 rows of W, M·K·2 bytes, M / 4 times the weight's bytes; the 128-row kernel
# (decode_lora_wide.cu) shares x through shared memory over 128 rows, 8 times less. L2 is not in the chip
# table (no measured rate here), so the rule caps that traffic: each M runs the 16-row kernel while its
# re-reads stay within X_REREAD_BUDGET (up to DECODE_GEMV_MAX_M), the 128-row kernel above, and the
# decode while the 128-row kernel's re-reads fit too, up to DECODE_KERNEL_MAX_M. With 64 MiB the
# Llama-3-8B projections run the decode up to M = 64 (the 128-row kernel's re-reads there: 17 MB on
# 4096 -> 4096, 59 MB on the 14336-wide ones) and switch to the 128-row kernel at M = 10 on the
# 14336-wide ones (the 16-row kernel would re-read 73 MB there). bench/bench_decode.py times the paths
# on a GPU, and its measurement replaces this rule.
DECODE_KERNEL_MAX_M = 64  # csrc/decode_lora.h kDecodeMaxM; the binding refuses more
X_REREAD_BUDGET = 64 << 20
# the CUDA-core GEMV (K or the block size not a multiple of 64) is built up to this M (csrc/decode_lora.h)
DECODE_GEMV_MAX_M = 16
MMA_STEP = 64  # the tensor-core kernels need K and the block size multiples of this (kMmaStep)
WIDE_ROWS = 128  # rows of W per block of the 128-row kernel (kDecodeWideRows)
# From this M on (with K and the block size multiples of 64) the tensor-core kernels run instead of the
# CUDA-core GEMV. Both are limited by issuing instructions about as much as by HBM, and their sm_90 main
# loops, per 2 KB of weight per warp (bf16, NF4 with double quantization; bench/sass_loops.py), take: GEMV
# 582 instructions at M = 1 (one FMA per code and token, so more above), tensor cores 481 for any M <= 8
# and 491 up to 16. So every M runs on the tensor cores. These are instruction counts, not timings:
# bench/bench_decode.py times both paths per M, and the measured cut-over replaces this on each GPU.
DECODE_MMA_MIN_M = 1
_SCHEME_ID = {"nf4": 0, "int4": 1}


def decode_max_m(k: int, n: int, tensor_cores: bool = True) -> int:
    """The largest M the decode runs for an [n, k] weight (the rule above): the GEMV's build limit, or the
    largest M up to DECODE_KERNEL_MAX_M whose tensor-core kernel keeps its re-reads of x within
    X_REREAD_BUDGET. Closed form (re-reads grow linearly in M): it runs on every inference call."""
    if not tensor_cores:
        return DECODE_GEMV_MAX_M
    wide_from = wide_min_m(k, n)  # every M below it fits in the 16-row kernel
    wide_fit = min(DECODE_KERNEL_MAX_M, X_REREAD_BUDGET // rows_reread_bytes(1, k, n, WIDE_ROWS))
    return max(DECODE_GEMV_MAX_M, wide_from - 1, wide_fit if wide_fit >= wide_from else 0)


def wide_min_m(k: int, n: int) -> int:
    """The first M that runs the 128-row kernel: past DECODE_GEMV_MAX_M, or where the 16-row kernel's
    re-reads of x would pass X_REREAD_BUDGET."""
    return min(DECODE_GEMV_MAX_M + 1, X_REREAD_BUDGET // rows_reread_bytes(1, k, n, 16) + 1)


def rows_reread_bytes(m: int, k: int, n: int, rows: int) -> int:
    """Bytes of x [m, k] (16-bit) read from L2 by a kernel whose blocks of ``rows`` rows of an [n, k] weight
    each read all of x."""
    return m * 2 * k * -(-n // rows)


def x_reread_bytes(m: int, k: int, n: int) -> int:
    """The re-reads of x by the tensor-core kernel that runs M = ``m`` (``wide_min_m``)."""
    return rows_reread_bytes(m, k, n, WIDE_ROWS if m >= wide_min_m(k, n) else 16)


def wide_splits(n: int, k: int, sms: int) -> int:
    """Blocks the 128-row kernel splits K over: as many as fit in one block per SM (it holds one per SM), each
    with at least 4 steps of 64 codes. One more would start a second wave of blocks on few SMs: on 4096 rows
    (32 row blocks, 132 SMs) 5 splits run 160 blocks of K / 5 in two waves, 4 run 128 of K / 4 in one."""
    return max(1, min(k // (4 * MMA_STEP), sms // -(-n // WIDE_ROWS)))


def decode_applies(x, weight, lora_A, lora_B, bias, dropout_p, training) -> bool:
    if not isinstance(weight, Packed4bit) or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if training and dropout_p > 0:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias)):
        return False
    n, k = weight.shape
    m = x.numel() // k
    tensor_cores = m >= DECODE_MMA_MIN_M and k % MMA_STEP == 0 and weight.block % MMA_STEP == 0
    # (the codes' alignment is checked where the call runs: ``_decode_or_triton``)
    return k % 32 == 0 and 1 <= m <= decode_max_m(k, n, tensor_cores)


_CODE_CACHE: dict[torch.device, torch.Tensor] = {}


def _code_on(device: torch.device) -> torch.Tensor:
    if device not in _CODE_CACHE:
        _CODE_CACHE[device] = nf4_code(device)
    return _CODE_CACHE[device]


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a 16-byte boundary (the kernels read x and A with 16-byte loads): a
    view starting mid-vector is copied."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def decode_lora_linear(x, weight: Packed4bit, lora_A, lora_B, scale, bias):
    from ..kernels import split_sum
    from ..kernels.lora_fwd import sm_count

    n, k = weight.shape
    x2 = _aligned16(x.reshape(-1, k))
    a = _aligned16(lora_A)
    dq = weight.double_quant
    m = x2.shape[0]
    # the 128-row kernel's K split (it runs from wide_min_m on where the tensor-core kernels do)
    wide = m >= wide_min_m(k, n) and k % MMA_STEP == 0 and weight.block % MMA_STEP == 0
    splits = wide_splits(n, k, sm_count(x.device)) if wide else 1
    tickets = split_sum.tickets(x.device, -(-n // WIDE_ROWS)) if splits > 1 else None
    y = torch.ops.fusedlora.decode_lora_cuda(
        x2, weight.data,
        None if dq else weight.absmax, weight.absmax if dq else None,
        weight.nested_absmax, weight.nested_code, float(weight.nested_offset),
        _code_on(x.device) if weight.scheme == "nf4" else None,
        weight.scales, weight.zeros, _SCHEME_ID[weight.scheme], weight.block, n, k,
        a, lora_B.contiguous(), bias, float(scale), DECODE_MMA_MIN_M, tickets, splits, wide_min_m(k, n),
    )
    return y.reshape(*x.shape[:-1], n)


def _triton(x, weight, lora_A, lora_B, scale, bias, dropout_p=0.0, training=False, dropout_mask=None):
    return implementation("lora_linear", "triton")(x, weight, lora_A, lora_B, scale, bias, dropout_p, training,
                                                   dropout_mask)


def _decode_or_triton(x, weight: Packed4bit, lora_A, lora_B, scale, bias):
    """The decode kernels where the weight's codes start on a 16-byte boundary (their loads), else the Triton
    path (codes viewed from inside a larger buffer)."""
    if weight.data.data_ptr() % 16:
        return _triton(x, weight, lora_A, lora_B, scale, bias)
    return decode_lora_linear(x, weight, lora_A, lora_B, scale, bias)


@torch.library.custom_op("fusedlora::decode_lora", mutates_args=())
def decode_lora_op(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor | None,
                   nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, nested_offset: float,
                   scales: torch.Tensor | None, zeros: torch.Tensor | None, scheme: str, block: int, n: int, k: int,
                   lora_A: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """``_decode_or_triton`` as one op, for torch.compile: the pointer checks (the codes', x's and A's
    alignment) and the launch sizes are taken when the call runs, which a traced graph cannot do."""
    weight = Packed4bit(scheme, data, (n, k), block, absmax, nested_absmax, nested_code, nested_offset, scales,
                        zeros)
    return _decode_or_triton(x, weight, lora_A, lora_B, scale, bias)


@decode_lora_op.register_fake
def _(x, data, absmax, nested_absmax, nested_code, nested_offset, scales, zeros, scheme, block, n, k, lora_A,
      lora_B, bias, scale):
    return x.new_empty((*x.shape[:-1], n))


@register("lora_linear", "cuda")
def lora_linear_cuda(x, weight, lora_A, lora_B, scale, bias, dropout_p, training, dropout_mask):
    if not decode_applies(x, weight, lora_A, lora_B, bias, dropout_p, training):
        return _triton(x, weight, lora_A, lora_B, scale, bias, dropout_p, training, dropout_mask)
    if torch.compiler.is_compiling():
        w = weight
        return decode_lora_op(x, w.data, w.absmax, w.nested_absmax, w.nested_code, float(w.nested_offset), w.scales,
                              w.zeros, w.scheme, w.block, *w.shape, lora_A, lora_B, bias, float(scale))
    # eagerly without the op's dispatch: at one token a layer's decode takes a few microseconds
    return _decode_or_triton(x, weight, lora_A, lora_B, scale, bias)


if extension_loaded() and hasattr(torch.ops.fusedlora, "decode_lora_cuda"):
    # Shape function of the extension's op, for torch.compile and meta tensors.
    @torch.library.register_fake("fusedlora::decode_lora_cuda")
    def _(x, w, absmax, absmax_q, nested_absmax, nested_code, nested_offset, code, scales, zeros, scheme, block,
          n, k, lora_A, lora_B, bias, scale, mma_min_m, tickets=None, splits=1, wide_min_m=17):
        return x.new_empty(x.shape[0], n)

