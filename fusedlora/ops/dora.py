"""DoRA over the fused LoRA op: y = W·x + b + (g − 1) ⊙ W·drop(x) + g ⊙ s·B·A·drop(x), g = m / ‖W + s·B·A‖.

PEFT's semantics (its DoRA linear variant): the row norms ‖W + s·B·A‖_n are detached (no gradient), the
magnitude m [N] is trained, and with dropout on the base sees x while the DoRA terms see drop(x). Shapes as
``ops.lora``; magnitude [N].

The norm needs no [N, K] temporary. Per output row n,

    ‖W_n + s·(B·A)_n‖² = ‖W_n‖² + 2s·Σ_j B[n,j]·(W·Aᵀ)[n,j] + s²·Σ_j B[n,j]·(B·(A·Aᵀ))[n,j]

‖W_n‖² is a constant of the frozen base (the caller keeps it: ``weight_row_sq_norms``), W·Aᵀ [N, r] is the
fused GEMM run with A as its r input rows (it reads a 4-bit W once, decoded in the loop), A·Aᵀ is r × r.

The fast path (``dora_linear_fused``) is then the fused LoRA op plus one stream over [M, N] each way
(``kernels.dora``):
- dropout off: z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (one fused GEMM), y = g ⊙ z + b;
- dropout on (xd = drop(x) and x − xd made in one pass, the mask drawn from a seed as the LoRA kernels
  draw theirs and kept as bits): W·x + (g − 1) ⊙ W·xd = W·(x − xd) + g ⊙ W·xd, so
  z = xd·Wᵀ + s·(xd·Aᵀ)·Bᵀ and u = (x − xd)·Wᵀ (the fused GEMM at rank 0: no low-rank launches),
  y = g ⊙ z + u + b: two base products, as the formula has two.
The magnitude's gradient is dm = Σ_rows dy ⊙ z / ‖·‖ and z's is g ⊙ dy; autograd carries the rest through
the fused op's own backward.

A 4-bit weight whose blocks follow its rows (K a multiple of the block size) takes g into the GEMM instead
(bf16, fp32): g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) = x·(g ⊙ W)ᵀ + s·(x·Aᵀ)·(g ⊙ B)ᵀ, and g ⊙ W is the same 4-bit codes
with each row's block scales times g[n] (fp32 [N, K / block], a double-quantized absmax decoded; one
launch makes them, g ⊙ B and 1 / m). The fused op then returns v = g ⊙ z itself, its backward gives dx, dA
and dB with g applied (no dz = g ⊙ dy pass), and dm = Σ_rows dy ⊙ v / m needs only column sums. Without
dropout or bias no stream runs at all; with dropout, the GEMM of u = (x − xd)·Wᵀ adds v and the bias in its
epilogue, so y = v + u + b costs no stream either, and (drawn in the kernels: ``_FoldedDropout``) u's dX GEMM
turns the two inputs' gradients into x's in its epilogue, so dx costs none. The op saves the fp32 scales
for its backward: at most 1/8 of the 4-bit weight's bytes per layer. A magnitude that is exactly 0 is
folded as 2^-64 (its outputs are then 2^-64·z/‖·‖, not 0), so that z stays recoverable from v for its
gradient; fp16's range cannot hold that, so fp16 keeps the z-and-streams route.

``dora_linear_reference`` computes PEFT's formula literally (the dense weight, the full W + s·B·A) and is
the oracle of the tests.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..formats.packed import Packed4bit
from . import dora_triton  # noqa: F401  (registers the torch.ops.fusedlora DoRA ops)
from .backend import backend
from .checks import check_tensor
from .lora import check_lora_args, draw_dropout_mask_reference, lora_linear
from .registry import register, select

# rows of W squared per step when taking its row norms (bounds the fp32 temporary to 16 Mi elements)
_ROW_CHUNK_ELEMENTS = 1 << 24


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def weight_row_sq_norms(weight, dtype: torch.dtype) -> torch.Tensor:
    """‖W_n‖² [N] of the base as the layer computes with it (decoded to ``dtype``), summed in fp32 (fp64
    for fp64). On the Triton backends a 4-bit weight's norms come from its codes
    (``kernels.dora.row_sq_norms_4bit``, one pass over the 4-bit bytes): no weight-sized tensor."""
    if not isinstance(weight, Packed4bit):
        return row_sq_norms(weight, dtype)
    if backend(weight.device) == "reference" or dtype == torch.float64:
        from .dequant import dequantize

        return row_sq_norms(dequantize(weight, dtype), dtype)
    from .lora_triton import weight_args

    w, w_scales, w_zeros, nested_absmax, nested_code, fmt, block, nested_offset = weight_args(weight)
    return torch.ops.fusedlora.row_sq_norms_4bit(w, w_scales, w_zeros, nested_absmax, nested_code, fmt,
                                                   *weight.shape, block, nested_offset, dtype)


def row_sq_norms(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖W_n‖² [N] of a dense [N, K] weight rounded to ``dtype``, summed in fp32 (fp64 for fp64) over bands of
    rows."""
    acc = _acc(dtype)
    n, k = w.shape
    step = max(1, _ROW_CHUNK_ELEMENTS // max(k, 1))
    out = torch.empty(n, dtype=acc, device=w.device)
    for i in range(0, n, step):
        band = w[i:i + step].to(dtype).to(acc)  # a dense base is rounded to the compute dtype first, as used
        out[i:i + step] = (band * band).sum(1)
    return out


@torch.no_grad()
def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                     base_sq_norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, fp32 (fp64 for fp64 adapters) [N], W as decoded to ``dtype``, without an
    [N, K] temporary (the expansion in the module docstring). Detached, as PEFT's DoRA."""
    acc = _acc(dtype)
    a = lora_A.detach()
    b = lora_B.detach()
    a_c = a.to(dtype)
    # W·Aᵀ by the fused op: A as r rows of input, its own low-rank term scaled by 0
    wa = lora_linear(a_c, weight, a_c, b.to(dtype), 0.0).to(acc).t()  # [N, r]
    af, bf = a.to(acc), b.to(acc)
    cross = (bf * wa).sum(1)
    quad = ((bf @ (af @ af.t())) * bf).sum(1)
    sq = base_sq_norm.to(acc) + (2.0 * scale) * cross + (scale * scale) * quad
    return sq.clamp_min(0).sqrt()


def check_dora_args(x, weight, magnitude, base_sq_norm) -> None:
    n = weight.shape[0]
    check_tensor("magnitude", magnitude, shape=(n,), device=x.device)
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude: expected a floating-point tensor, got {magnitude.dtype}")
    check_tensor("base_sq_norm", base_sq_norm, shape=(n,), device=x.device)
    if not base_sq_norm.is_floating_point():
        raise TypeError(f"base_sq_norm: expected a floating-point tensor, got {base_sq_norm.dtype}")


def dora_linear(x, weight, lora_A, lora_B, scale, magnitude, base_sq_norm, bias=None, dropout_p=0.0,
                training=False, dropout_mask=None, weight_norm=None, fold=None) -> torch.Tensor:
    """Autograd-aware DoRA linear; ``weight`` dense or ``Packed4bit``; ``base_sq_norm`` = ‖W_n‖² [N] of W
    decoded to x's dtype (``weight_row_sq_norms``); ``dropout_mask`` (bool, x's shape) fixes the draw;
    ``weight_norm``: ‖W + s·B·A‖ [N] of these tensors when the caller kept it (``dora_row_norm``), else
    computed here; ``fold``: ``dora_fold`` of these tensors and that norm when the caller kept it, for a call
    without gradients on the folded route (``folds``)."""
    check_lora_args(x, weight, lora_A, lora_B, scale, bias, dropout_p, dropout_mask)
    check_dora_args(x, weight, magnitude, base_sq_norm)
    if weight_norm is not None:
        check_tensor("weight_norm", weight_norm, shape=(weight.shape[0],), device=x.device)
    if fold is not None:
        _check_fold(fold, x, weight, lora_B, weight_norm)
    if dropout_mask is not None and not (training and dropout_p > 0):
        raise ValueError("dropout_mask: given, but dropout is off (needs training=True and dropout_p > 0)")
    _, impl = select("dora_linear", x.device, x.dtype)
    return impl(x, weight, lora_A, lora_B, float(scale), magnitude, base_sq_norm, bias, float(dropout_p),
                bool(training), dropout_mask, weight_norm, fold)


def _check_fold(fold, x, weight, lora_B, weight_norm) -> None:
    if not folds(weight, x.dtype):
        raise ValueError("fold: only the folded route takes one (a 4-bit base with K a multiple of its block "
                         f"size, in bf16 or fp32), got a {type(weight).__name__} base and {x.dtype}")
    if weight_norm is None:
        raise ValueError("fold: given without the weight_norm it was folded from")
    if torch.is_grad_enabled() and lora_B.requires_grad:
        raise ValueError("fold: serves calls without gradients (B's gradient goes through the fold), got a "
                         "lora_B that requires grad with grad mode on")
    if not (isinstance(fold, tuple) and len(fold) == 3):
        raise TypeError(f"fold: expected dora_fold's (g ⊙ B, 1 / m, block scales), got {type(fold).__name__}")
    n, k = weight.shape
    b_fold, inv_m, scales = fold
    check_tensor("fold[0]", b_fold, shape=tuple(lora_B.shape), device=x.device)
    check_tensor("fold[1]", inv_m, shape=(n,), device=x.device)
    check_tensor("fold[2]", scales, shape=(n, k // weight.block), device=x.device)


class _DropSplit(torch.autograd.Function):
    """(drop(x), x − drop(x)) in one pass (``kernels.dora.drop_split``), the mask drawn from a seed taken from
    torch's default generator of x's device and kept as bits for the backward."""

    @staticmethod
    def forward(ctx, x, p):
        from .lora_triton import draw_seed

        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        xd, c, bits = torch.ops.fusedlora.dora_drop_split(x2, draw_seed(x.device), p)
        ctx.save_for_backward(bits)
        ctx.p = p
        return xd.view(shape), c.view(shape)

    @staticmethod
    def backward(ctx, dxd, dc):
        (bits,) = ctx.saved_tensors
        ref = dxd if dxd is not None else dc
        shape = ref.shape
        flat = lambda t: (torch.zeros_like(ref) if t is None else t).reshape(-1, shape[-1]).contiguous()  # noqa: E731
        return torch.ops.fusedlora.dora_drop_split_bwd(flat(dxd), flat(dc), bits, ctx.p).view(shape), None


@register("dora_linear", "reference")
def dora_linear_reference(x, weight, lora_A, lora_B, scale, magnitude, base_sq_norm, bias, dropout_p, training,
                          dropout_mask, weight_norm=None, fold=None):
    """PEFT's DoRA formula on the dense weight, in fp32 (fp64 for fp64), autograd for the backward; the norm
    from the whole W + s·B·A unless ``weight_norm`` is given."""
    acc = _acc(x.dtype)
    if isinstance(weight, Packed4bit):
        from ..formats import dequantize_reference

        w = dequantize_reference(weight, x.dtype).to(acc)
    else:
        w = weight.to(acc)
    a, b = lora_A.to(acc), lora_B.to(acc)
    with torch.no_grad():
        norm = (torch.linalg.vector_norm(w + scale * (b @ a), dim=1) if weight_norm is None
                else weight_norm.to(acc))
    g = magnitude.to(acc) / norm
    xf = x.to(acc)
    if training and dropout_p > 0:
        mask = dropout_mask if dropout_mask is not None else draw_dropout_mask_reference(x, dropout_p)
        xd = xf * mask.to(acc) / (1.0 - dropout_p)
    else:
        xd = xf
    y = F.linear(xf, w, None if bias is None else bias.to(acc))
    y = y + (g - 1) * F.linear(xd, w) + g * (scale * F.linear(F.linear(xd, a), b))
    return y.to(x.dtype)


def _norm_and_scale_triton(weight, lora_A, lora_B, scale, base_sq_norm, magnitude):
    """(norm, g) of ``dora_weight_norm`` and g = m / norm (None without ``magnitude``) in three launches: the
    fused GEMM with A as its r rows (W·Aᵀ, and A·Aᵀ from its low-rank pre-kernel) and ``kernels.dora``'s
    norm kernel."""
    from .lora_triton import weight_args

    a, b = lora_A.detach().contiguous(), lora_B.detach().contiguous()
    w, w_scales, w_zeros, nested_absmax, nested_code, fmt, block, nested_offset = weight_args(weight)
    n = weight.shape[0]
    with torch.no_grad():
        wa, aat, _ = torch.ops.fusedlora.lora_fwd(a, w, w_scales, w_zeros, nested_absmax, nested_code, a, b, None,
                                                  None, 0.0, 0.0, fmt, n, block, nested_offset)
        m = None if magnitude is None else magnitude.detach().float()
        norm, g = torch.ops.fusedlora.dora_norm(wa, b, aat, base_sq_norm.float().contiguous(), m, scale)
        return norm, None if m is None else g


def dora_row_norm(weight, lora_A, lora_B, scale: float, base_sq_norm, dtype: torch.dtype) -> torch.Tensor:
    """``dora_weight_norm`` by the backend of the weight's device (the Triton kernels where they run: the
    fused GEMM at M = r and the norm kernel), fp32 (fp64 for fp64) [N], detached. A and B in ``dtype``."""
    if dtype == torch.float64 or backend(lora_A.device) == "reference":
        return dora_weight_norm(weight, lora_A, lora_B, scale, base_sq_norm, dtype)
    return _norm_and_scale_triton(weight, lora_A, lora_B, scale, base_sq_norm, None)[0]


class _DoraScale(torch.autograd.Function):
    """y = g ⊙ z (+ u) (+ bias) with g = m / norm (norm detached); ``kernels.dora``'s streams both ways."""

    @staticmethod
    def forward(ctx, z, magnitude, norm, g, bias, u):
        shape = z.shape
        z2 = z.reshape(-1, shape[-1]).contiguous()
        u2 = None if u is None else u.reshape(-1, shape[-1]).contiguous()
        y = torch.ops.fusedlora.dora_scale_fwd(z2, g, u2, bias)
        ctx.save_for_backward(z2, g, norm)
        ctx.m_dtype, ctx.has_u = magnitude.dtype, u is not None
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        z2, g, norm = ctx.saved_tensors
        shape = dy.shape
        dy2 = dy.reshape(-1, shape[-1]).contiguous()
        dz, zsum = torch.ops.fusedlora.dora_scale_bwd(dy2, z2, g, None)
        need_z, need_m, _, _, need_b, need_u = ctx.needs_input_grad
        dm = (zsum.to(norm.dtype) / norm).to(ctx.m_dtype) if need_m else None
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_b else None
        du = dy if (need_u and ctx.has_u) else None
        return (dz.reshape(shape) if need_z else None), dm, None, None, db, du


# stands in for a zero magnitude in the folded route (small enough to leave outputs unchanged in bf16/fp32)
_ZERO_MAGNITUDE = 2.0**-64


def folds(weight, dtype: torch.dtype) -> bool:
    """Whether g goes into the weight's row scales: a 4-bit weight with K a multiple of its block size
    (every block inside one row), in bf16 or fp32."""
    return (isinstance(weight, Packed4bit) and weight.shape[1] % weight.block == 0
            and dtype in (torch.bfloat16, torch.float32))


def _scales(weight: Packed4bit) -> tuple[torch.Tensor, tuple | None]:
    """The weight's block scales as ``kernels.dora.dora_gain`` reads them: (fp32 absmax or INT4 scales, None),
    or (uint8 absmax codes, (nested_absmax, nested_code, offset)) for double quantization."""
    if weight.scheme == "int4":
        return weight.scales.contiguous(), None
    if not weight.double_quant:
        return weight.absmax.contiguous(), None
    return weight.absmax.contiguous(), (weight.nested_absmax.float().contiguous(),
                                        weight.nested_code.float().contiguous(), float(weight.nested_offset))


def with_scales(weight: Packed4bit, scales: torch.Tensor) -> Packed4bit:
    """The same codes with fp32 block scales ``scales`` [N, K / block] (an NF4 absmax no longer nested)."""
    if weight.scheme == "int4":
        return replace(weight, scales=scales)
    return replace(weight, absmax=scales.view(-1), nested_absmax=None, nested_code=None, nested_offset=0.0)


class _RowGain(torch.autograd.Function):
    """(g ⊙ B, g, 1 / m, the weight's block scales times g) from one ``kernels.dora.dora_gain`` launch; B's
    gradient is g ⊙ that of g ⊙ B, nothing else gets one (g detached, as PEFT's norm)."""

    @staticmethod
    def forward(ctx, lora_B, magnitude, norm, scales, nested):
        na, nc, off = nested if nested is not None else (None, None, 0.0)
        g, inv_m, b_fold, folded = torch.ops.fusedlora.dora_gain(magnitude.detach(), norm,
                                                                 lora_B.detach().contiguous(), scales, na, nc,
                                                                 off, _ZERO_MAGNITUDE)
        ctx.save_for_backward(g)
        ctx.mark_non_differentiable(g, inv_m, folded)
        ctx.set_materialize_grads(False)  # no zero tensors made for the outputs without gradients
        return b_fold, g, inv_m, folded

    @staticmethod
    def backward(ctx, d_b_fold, _dg, _dinv, _dfolded):
        (g,) = ctx.saved_tensors
        db = None if d_b_fold is None else torch.mul(d_b_fold, g[:, None]).to(d_b_fold.dtype)
        return db, None, None, None, None


def dora_fold(weight: Packed4bit, lora_B, magnitude, norm) -> tuple:
    """(g ⊙ B, 1 / m fp32 [N], the weight's block scales times g fp32 [N, K / block]) for g = m / ``norm``, by
    one gain launch (a zero m folded as 2^-64): the folded route's inputs. Kept by the caller, it serves only
    calls without gradients (B's gradient goes through it otherwise)."""
    b_fold, _, inv_m, folded = _RowGain.apply(lora_B, magnitude, norm, *_scales(weight))
    return b_fold, inv_m, folded


class _FoldedScale(torch.autograd.Function):
    """y = v (+ u) (+ bias) for v = g ⊙ z from the fused op on the folded tensors; gives the magnitude its
    gradient dm = Σ_rows dy ⊙ v / m (= Σ dy ⊙ z / ‖·‖; ``inv_m`` = 1 / m as folded)."""

    @staticmethod
    def forward(ctx, v, magnitude, inv_m, bias, u):
        shape = v.shape
        if u is None and bias is None:
            # v is the output: taken over (not a view of it, so the caller may still modify it in place;
            # autograd then reports that v, saved here, changed)
            ctx.mark_dirty(v)
            y = v
        else:
            y = torch.ops.fusedlora.dora_scale_fwd(v.reshape(-1, shape[-1]), None,
                               None if u is None else u.reshape(-1, shape[-1]).contiguous(), bias).view(shape)
        ctx.save_for_backward(v, inv_m)
        ctx.m_dtype, ctx.has_u = magnitude.dtype, u is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        v, inv_m = ctx.saved_tensors
        v2 = v.reshape(-1, v.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        _, need_m, _, need_b, need_u = ctx.needs_input_grad
        dm = torch.ops.fusedlora.dora_scale_bwd(dy2, v2, None, inv_m)[1].to(ctx.m_dtype) if need_m else None
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_b else None
        return dy, dm, None, db, (dy if need_u and ctx.has_u else None)


class _FoldedDropout(torch.autograd.Function):
    """The folded route with dropout drawn in the kernels, as one node, so that its backward runs in the order
    that lets x's gradient come out of a GEMM epilogue. Forward as ``_dora_folded``: drop(x), c = x − drop(x)
    and the keep bits from one pass; v = the fused op on drop(x) and the folded tensors; y = c·Wᵀ + v + b from
    the rank-0 GEMM. Backward: dm from the column sums of dy ⊙ v; drop(x)'s gradient, dA and g ⊙ B's from the
    fused op's backward; then c's from the rank-0 dX GEMM, whose epilogue mixes the two by the bits into x's
    gradient (``kernels.lora_bwd.blend_dropped``: no pass over [M, K] of its own)."""

    @staticmethod
    def forward(ctx, x, lora_A, b_fold, magnitude, inv_m, folded, bias, weight, scale, p):
        from .lora_triton import draw_seed, no_adapter, weight_args

        n, k = weight.shape
        x2 = x.reshape(-1, k).contiguous()
        xd, c, bits = torch.ops.fusedlora.dora_drop_split(x2, draw_seed(x.device), p)
        a, bf = lora_A.contiguous(), b_fold.contiguous()
        wf = weight_args(with_scales(weight, folded))
        v, xa, _ = torch.ops.fusedlora.lora_fwd(xd, *wf[:5], a, bf, None, None, scale, 0.0, wf[5], n, *wf[6:])
        w = weight_args(weight)
        y, _, _ = torch.ops.fusedlora.lora_fwd(c, *w[:5], *no_adapter(c, n, k),
                                               None if bias is None else bias.contiguous(), None, 0.0, 0.0, w[5], n,
                                               *w[6:], v)
        ctx.save_for_backward(xd, xa, bits, v, inv_m, a, bf, folded)
        ctx.weight, ctx.scale, ctx.p, ctx.m_dtype = weight, scale, p, magnitude.dtype
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        from .lora_triton import no_adapter, weight_args

        xd, xa, bits, v, inv_m, a, bf, folded = ctx.saved_tensors
        weight = ctx.weight
        n, k = weight.shape
        need_x, need_a, need_b, need_m, _, _, need_bias = ctx.needs_input_grad[:7]
        dy2 = dy.reshape(-1, n).contiguous()
        dm = torch.ops.fusedlora.dora_scale_bwd(dy2, v, None, inv_m)[1].to(ctx.m_dtype) if need_m else None
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_bias else None
        dx = da = dbf = None
        if need_x or need_a or need_b:
            wf = weight_args(with_scales(weight, folded))
            dxd, da, dbf = torch.ops.fusedlora.lora_bwd(dy2, xd, xa, bits.new_empty((0,)), *wf[:5], a, bf,
                                                        ctx.scale, 0.0, wf[5], *wf[6:], need_x, need_a, need_b)
        if need_x:
            w = weight_args(weight)
            m = dy2.shape[0]
            dx, _, _ = torch.ops.fusedlora.lora_bwd(dy2, xd, xa.new_empty((m, 0)), bits, *w[:5], *no_adapter(xd, n, k),
                                                    0.0, 0.0, w[5], *w[6:], True, False, False, dxd, ctx.p)
            dx = dx.view(dy.shape[:-1] + (k,))
        return (dx, da if need_a else None, dbf if need_b else None, dm, None, None, db, None, None, None)


def _dora_folded(xd, c, weight, lora_A, lora_B, scale, magnitude, norm, bias, drawn_p=0.0, fold=None):
    """``dora_linear_fused`` with g in the weight's row scales and in B (``folds``): ``xd`` the input of the
    DoRA terms (drop(x), or x), ``c`` = x − drop(x) (None without dropout), whose base product's GEMM adds
    v and the bias in its epilogue (no stream over [M, N] for y = v + u + b). With ``drawn_p`` > 0, ``xd``
    is x and the dropout of that probability is drawn in the kernels (``_FoldedDropout``). ``fold``: a kept
    ``dora_fold`` of these tensors (calls without gradients), else folded here."""
    b_fold, inv_m, folded = fold if fold is not None else dora_fold(weight, lora_B, magnitude, norm)
    if drawn_p:
        return _FoldedDropout.apply(xd, lora_A, b_fold, magnitude, inv_m, folded, bias, weight, float(scale), drawn_p)
    v = lora_linear(xd, with_scales(weight, folded), lora_A, b_fold, scale)
    if c is None:
        return _FoldedScale.apply(v, magnitude, inv_m, bias, None)
    from .lora_triton import base_linear

    return base_linear(c, weight, residual=_FoldedScale.apply(v, magnitude, inv_m, None, None), bias=bias)


@register("dora_linear", "triton")
def dora_linear_fused(x, weight, lora_A, lora_B, scale, magnitude, base_sq_norm, bias, dropout_p, training,
                      dropout_mask, weight_norm=None, fold=None):
    """The fused LoRA op for the GEMMs, ``kernels.dora`` for the norm, the dropout split and the column scaling
    (fp64 never comes here: the op table gives it the reference)."""
    folded = folds(weight, x.dtype)
    if weight_norm is not None:
        norm = weight_norm.detach()
        g = None if folded else magnitude.detach().to(norm.dtype) / norm
    else:
        norm, g = _norm_and_scale_triton(weight, lora_A, lora_B, scale, base_sq_norm, None if folded else magnitude)
    xd, c = x, None
    if folded and training and dropout_p > 0 and dropout_mask is None:
        return _dora_folded(x, None, weight, lora_A, lora_B, scale, magnitude, norm, bias, float(dropout_p), fold)
    if training and dropout_p > 0:
        if dropout_mask is None:
            xd, c = _DropSplit.apply(x, dropout_p)
        else:
            xd = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
            c = x - xd
    if folded:
        return _dora_folded(xd, c, weight, lora_A, lora_B, scale, magnitude, norm, bias, fold=fold)
    from .lora_triton import base_linear

    z = lora_linear(xd, weight, lora_A, lora_B, scale)
    return _DoraScale.apply(z, magnitude, norm, g, bias, None if c is None else base_linear(c, weight))
