"""The "triton" implementation of lora_linear: torch.library ops around the fused Triton kernels.

Ops (namespace ``fusedlora``), opaque to torch.compile, with fake impls and a registered autograd formula:
- ``fusedlora::lora_fwd(x2, w, w_scales, w_zeros, nested_absmax, nested_code, lora_A, lora_B, bias, seed,
  scale, dropout_p, fmt, n, block, nested_offset, residual=None) -> (y2 [M, N], xa [M, r] fp32, bits)``, bits
  the dropout keep-mask, uint8 [M, ceil(K / 8)] with 1 bit per element (an empty [0] tensor when dropout is
  off); ``residual`` [M, N], when given, is added to y in the GEMM's epilogue (its gradient is dY)
- ``fusedlora::lora_bwd(dy2, x2, xa, bits, w, ..., need_dx, need_da, need_db) -> (dx2, dA, dB)``; an output
  that is not needed comes back as an empty [0] tensor.

The weight travels as its tensors: ``fmt`` "dense" (w = W [N, K]), "nf4" (w = packed bytes, w_scales =
absmax as fp32, or uint8 codes with nested_absmax/nested_code/nested_offset for double quantization, decoded
to fp32 by one small kernel before each GEMM) or "int4" (w = bytes [N, K/2], w_scales fp32, w_zeros uint8).

Saved for backward: x, xa and the keep bits (M·K/8 bytes, with dropout) plus the weight and LoRA tensors,
which are parameters or buffers; no dropped-out x, no byte mask, no dequantized weight. The backward
returns dX, dA, dB, dbias and, for a dense weight that requires grad, dW = dYᵀ·x (plain torch).

Where a 4-bit weight is decoded depends on the GEMM and M (``ops.paths``): inside the GEMM's loop, or
once per call into the device's scratch buffer (``ops.scratch``) that the dense GEMM then reads; nothing
decoded is kept between the forward and the backward.

Dropout: the seed is one draw from torch's default generator of x's device, kept as a 1-element int64 tensor
on that device (no host sync; torch.manual_seed reproduces a run). The forward draws the mask from it and
saves it as bits for the backward (``fusedlora.kernels.dropout.dropout_mask`` materializes the same
mask). An explicit ``dropout_mask`` is refused with a ValueError: the kernels only draw masks from seeds;
the reference backend is the one that takes masks.

Inputs: leading batch dimensions are flattened into M. x needs a unit stride along K (row strides are
passed to the kernels); otherwise it is copied to a contiguous tensor. W, A, B, bias are made contiguous
(a no-op for parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats.packed import Packed4bit
from ..kernels import device_guard
from .dequant import check_int4, check_nf4
from .paths import training_path
from .registry import register
from .scratch import weight_scratch

_EMPTY = (0,)


def decode_to_scratch(w, w_scales, w_zeros, nested_absmax, nested_code, fmt, n, k, block, nested_offset,
                      dtype) -> Tensor:
    """The 4-bit weight (``weight_args``'s tensors) decoded in ``dtype`` into the device's scratch buffer
    (``ops.scratch``): a [n, k] view, valid until the next decode on that device."""
    from ..kernels.dequant import dequantize_int4_triton, dequantize_nf4_triton

    out = weight_scratch(n, k, dtype, w.device)
    if fmt == "nf4":
        dequantize_nf4_triton(w, w_scales, nested_absmax, nested_code, nested_offset, block, n, k, dtype, out=out)
    else:
        dequantize_int4_triton(w, w_scales, w_zeros, block, dtype, out=out)
    return out


def _gemm_weight(gemm, m, w, w_scales, w_zeros, nested_absmax, nested_code, fmt, n, k, block, nested_offset,
                 dtype):
    """(w, scales, zeros, fmt, nested) that the fused GEMM ``gemm`` ("fwd" | "dx") over M = ``m`` tokens
    reads, by the rule of ``ops.paths``: the 4-bit weight itself ("inloop"; a double-quantized absmax is
    decoded by the GEMM from ``nested`` = (nested_absmax, nested_code, offset), or beforehand to fp32 when
    K is not a multiple of the block size), or its decode in ``dtype`` written into the device's scratch
    buffer, read as a dense weight ("dequant")."""
    path = training_path(m, n, k, fmt, gemm)
    if path == "dense":
        return w, None, None, fmt, None
    if path == "dequant":
        out = decode_to_scratch(w, w_scales, w_zeros, nested_absmax, nested_code, fmt, n, k, block, nested_offset,
                                dtype)
        return out, None, None, "dense", None
    if nested_absmax is None:
        return w, w_scales, w_zeros, fmt, None
    if k % block == 0:
        return w, w_scales, w_zeros, fmt, (nested_absmax, nested_code.float(), nested_offset)
    from ..kernels.lora_fwd import decode_absmax

    return w, decode_absmax(w_scales, nested_code, nested_absmax, nested_offset), w_zeros, fmt, None


@torch.library.custom_op("fusedlora::lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor, w: Tensor, w_scales: Tensor | None, w_zeros: Tensor | None, nested_absmax: Tensor | None,
    nested_code: Tensor | None, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None, seed: Tensor | None,
    scale: float, dropout_p: float, fmt: str, n: int, block: int, nested_offset: float,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.lora_fwd import lora_forward

    with device_guard(x.device):
        w, scales, zeros, fmt, nested = _gemm_weight("fwd", x.shape[0], w, w_scales, w_zeros, nested_absmax,
                                                     nested_code, fmt, n, x.shape[1], block, nested_offset, x.dtype)
        return lora_forward(x, w, scales, zeros, fmt, n, block, lora_A, lora_B, bias, scale, dropout_p, seed,
                            nested, residual)


@lora_fwd.register_fake
def _(x, w, w_scales, w_zeros, nested_absmax, nested_code, lora_A, lora_B, bias, seed, scale, dropout_p, fmt,
      n, block, nested_offset, residual=None):
    m, k = x.shape
    bits = (m, (k + 7) // 8) if dropout_p > 0 else _EMPTY
    return (x.new_empty((m, n)), x.new_empty((m, lora_A.shape[0]), dtype=torch.float32),
            x.new_empty(bits, dtype=torch.uint8))


@torch.library.custom_op("fusedlora::lora_bwd", mutates_args=())
def lora_bwd(
    dy: Tensor, x: Tensor, xa: Tensor, bits: Tensor, w: Tensor, w_scales: Tensor | None,
    w_zeros: Tensor | None, nested_absmax: Tensor | None, nested_code: Tensor | None, lora_A: Tensor,
    lora_B: Tensor, scale: float, dropout_p: float, fmt: str, block: int, nested_offset: float,
    need_dx: bool, need_da: bool, need_db: bool, blend: Tensor | None = None, blend_p: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    # blend: drop(x)'s gradient, mixed into dX by ``bits`` (kernels.lora_bwd.blend_dropped), where x went in
    # as drop(x) and as x − drop(x) and this op's x is the latter (rank 0, no dropout of its own)
    from ..kernels.lora_bwd import lora_backward

    with device_guard(dy.device):
        nested = None
        if need_dx:
            w, w_scales, w_zeros, fmt, nested = _gemm_weight("dx", dy.shape[0], w, w_scales, w_zeros, nested_absmax,
                                                             nested_code, fmt, dy.shape[1], x.shape[1], block,
                                                             nested_offset, dy.dtype)
        dx, da, db = lora_backward(dy, x, xa, bits, w, w_scales, w_zeros, fmt, block, lora_A, lora_B, scale,
                                   dropout_p, need_dx, need_da, need_db, nested, blend, blend_p)
    empty = dy.new_empty(_EMPTY)
    return (
        dx if dx is not None else empty,
        da.to(lora_A.dtype) if da is not None else lora_A.new_empty(_EMPTY),
        db.to(lora_B.dtype) if db is not None else lora_B.new_empty(_EMPTY),
    )


@lora_bwd.register_fake
def _(dy, x, xa, bits, w, w_scales, w_zeros, nested_absmax, nested_code, lora_A, lora_B, scale, dropout_p,
      fmt, block, nested_offset, need_dx, need_da, need_db, blend=None, blend_p=0.0):
    return (
        dy.new_empty((dy.shape[0], x.shape[1]) if need_dx else _EMPTY),
        lora_A.new_empty(lora_A.shape if need_da else _EMPTY),
        lora_B.new_empty(lora_B.shape if need_db else _EMPTY),
    )


# inputs of lora_fwd, by position
_X, _W, _A, _B, _BIAS, _RES = 0, 1, 6, 7, 8, 16
_N_INPUTS = 17


def _setup_context(ctx, inputs, output):
    (x, w, w_scales, w_zeros, nested_absmax, nested_code, lora_A, lora_B, bias, seed, scale, dropout_p, fmt,
     n, block, nested_offset, residual) = inputs
    _, xa, bits = output
    ctx.save_for_backward(x, xa, bits, w, w_scales, w_zeros, nested_absmax, nested_code, lora_A, lora_B)
    ctx.args = (scale, dropout_p, fmt, block, nested_offset)
    ctx.has_bias = bias is not None
    ctx.has_res = residual is not None


def _backward(ctx, dy, dxa, dbits):
    # xa and bits are internal outputs (saved for backward, never returned to the user): no gradients
    x, xa, bits, w, w_scales, w_zeros, nested_absmax, nested_code, lora_A, lora_B = ctx.saved_tensors
    scale, dropout_p, fmt, block, nested_offset = ctx.args
    need = ctx.needs_input_grad
    dy = dy.contiguous()  # autograd may hand over expanded (stride-0) gradients
    dx, da, db = torch.ops.fusedlora.lora_bwd(
        dy, x, xa, bits, w, w_scales, w_zeros, nested_absmax, nested_code, lora_A, lora_B, scale, dropout_p,
        fmt, block, nested_offset, need[_X], need[_A], need[_B],
    )
    grads = [None] * _N_INPUTS
    grads[_X] = dx if need[_X] else None
    grads[_A] = da if need[_A] else None
    grads[_B] = db if need[_B] else None
    if need[_W] and fmt == "dense":
        grads[_W] = dy.t().mm(x)
    if ctx.has_bias and need[_BIAS]:
        grads[_BIAS] = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    if ctx.has_res and need[_RES]:
        grads[_RES] = dy
    return tuple(grads)


torch.library.register_autograd("fusedlora::lora_fwd", _backward, setup_context=_setup_context)


def weight_args(weight) -> tuple:
    """(w, w_scales, w_zeros, nested_absmax, nested_code, fmt, block, nested_offset) for the ops.

    A 4-bit weight is checked in full first (sizes, dtypes, devices of every tensor): the kernels index
    its tensors from (N, K) and the block size, so a corrupted state must fail here, not read out of bounds.
    """
    if not isinstance(weight, Packed4bit):
        return weight.contiguous(), None, None, None, None, "dense", 0, 0.0
    n, k = weight.shape
    if weight.scheme == "nf4":
        check_nf4(weight.data, weight.absmax, weight.nested_absmax, weight.nested_code, weight.block, n, k,
                  torch.float32)
        return (weight.data.contiguous(), weight.absmax.contiguous(), None,
                None if weight.nested_absmax is None else weight.nested_absmax.contiguous(),
                None if weight.nested_code is None else weight.nested_code.contiguous(), "nf4", weight.block,
                float(weight.nested_offset))
    if weight.scheme == "int4":
        check_int4(weight.data, weight.scales, weight.zeros, weight.block, torch.float32)
        if tuple(weight.data.shape) != (n, k // 2):
            raise ValueError(f"weight.data: expected shape {(n, k // 2)} for an INT4 [{n}, {k}] weight, got "
                             f"{tuple(weight.data.shape)}")
        return (weight.data.contiguous(), weight.scales.contiguous(), weight.zeros.contiguous(), None, None,
                "int4", weight.block, 0.0)
    raise ValueError(f"weight: expected scheme 'nf4' or 'int4', got {weight.scheme!r}")


def draw_seed(device: torch.device) -> Tensor:
    """One draw from torch's default generator of ``device``, as a 1-element int64 tensor there."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def _fused_linear(x: Tensor, weight, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None, scale: float,
                  p: float, residual: Tensor | None = None) -> Tensor:
    """``fusedlora::lora_fwd`` on x [..., K] (leading dimensions flattened into M, a unit stride along K) and
    the weight's tensors, dropout ``p`` drawn from a fresh seed, ``residual`` [..., N] added; y [..., N]."""
    n, k = weight.shape if isinstance(weight, Packed4bit) else tuple(weight.shape)
    lead = x.shape[:-1]
    x2 = _unit_columns(x.reshape(-1, k))
    seed = draw_seed(x.device) if p > 0 else None
    w, w_scales, w_zeros, nested_absmax, nested_code, fmt, block, nested_offset = weight_args(weight)
    y2, _, _ = torch.ops.fusedlora.lora_fwd(
        x2, w, w_scales, w_zeros, nested_absmax, nested_code, lora_A.contiguous(), lora_B.contiguous(),
        None if bias is None else bias.contiguous(), seed, float(scale), p, fmt, n, block, nested_offset,
        None if residual is None else _unit_columns(residual.reshape(-1, n)),
    )
    return y2.reshape(*lead, n)


def _unit_columns(t: Tensor) -> Tensor:
    """``t`` with a unit stride along its last dimension (the kernels' loads need it; row strides pass)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def base_linear(x: Tensor, weight, residual: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x·Wᵀ (+ ``residual`` [..., N]) (+ ``bias``) by the fused GEMMs with no low-rank term (rank 0: no
    low-rank pre-kernel, no g pass in the backward), the residual and bias added in the forward GEMM's
    epilogue, on the 4-bit path of ``ops.paths`` as ``lora_linear``; autograd gives x, the residual and
    the bias their gradients (and a dense W, as there)."""
    n, k = weight.shape if isinstance(weight, Packed4bit) else tuple(weight.shape)
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], n):
        raise ValueError(f"residual: expected shape {(*x.shape[:-1], n)}, got {tuple(residual.shape)}")
    if residual is not None and (residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual: expected {x.dtype} on {x.device} (x's), got {residual.dtype} on "
                         f"{residual.device}")
    return _fused_linear(x, weight, *no_adapter(x, n, k), bias, 0.0, 0.0, residual)


def no_adapter(like: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    """(A [0, K], B [N, 0]) in ``like``'s dtype and device: the rank-0 adapter with which the fused ops compute
    the base product alone (no low-rank pre-kernel, no g pass)."""
    return like.new_empty((0, k)), like.new_empty((n, 0))


@register("lora_linear", "triton")
def lora_linear_triton(x, weight, lora_A, lora_B, scale, bias, dropout_p, training, dropout_mask):
    """Fused Triton forward (and backward through autograd); arguments as ``ops.lora.lora_linear``."""
    if dropout_mask is not None:
        raise ValueError(
            "dropout_mask: the triton backend draws dropout masks from a seed and cannot take an explicit "
            "mask (fusedlora.kernels.dropout.dropout_mask materializes its masks); use the reference backend "
            "to pass a mask")
    return _fused_linear(x, weight, lora_A, lora_B, bias, scale,
                         float(dropout_p) if training and dropout_p > 0 else 0.0)
