"""The fused LoRA linear op: y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias), W dense or 4-bit.

Shapes: x [..., K], W [N, K] (or a ``Packed4bit`` of that shape), A [r, K], B [N, r], bias [N], y [..., N].
Dropout follows PEFT: applied to x before A only, kept elements scaled by 1/(1-p), active only when
``training`` and p > 0. ``dropout_mask`` (bool, x's shape) replaces the random draw, so a kernel and the
reference can be compared exactly with dropout on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.packed import Packed4bit, check_packed, field_names
from .checks import FLOAT_DTYPES, check_same_dtype, check_tensor
from .registry import register, select

# The largest LoRA rank the ops run (the kernels loop over rank slices, so this is a tested bound, not a
# register limit: ranks up to it are compiled and checked for spills in CI).
MAX_RANK = 512


def _weight_shape_dtype(weight) -> tuple[tuple[int, int], torch.dtype | None, torch.device]:
    if isinstance(weight, Packed4bit):
        check_packed(weight, _WEIGHT_NAMES)  # every backend indexes its tensors from shape and block size
        return weight.shape, None, weight.device
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    return tuple(weight.shape), weight.dtype, weight.device


_WEIGHT_NAMES = field_names("weight.")


def check_lora_args(x, weight, lora_A, lora_B, scale, bias, dropout_p, dropout_mask) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension [..., K], got shape {tuple(x.shape)}")
    (n, k), w_dtype, w_device = _weight_shape_dtype(weight)
    if w_device != x.device:
        raise ValueError(f"weight: expected a tensor on {x.device} (where x is), got one on {w_device}")
    if w_dtype is not None:
        check_same_dtype("weight", weight, x.dtype)
    if x.shape[-1] != k:
        raise ValueError(f"x: expected last dimension K={k} (weight is [{n}, {k}]), got shape {tuple(x.shape)}")
    check_tensor("lora_A", lora_A, ndim=2, device=x.device)
    check_same_dtype("lora_A", lora_A, x.dtype)
    r = lora_A.shape[0]
    if r < 1 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A: expected shape [r, K={k}] with r >= 1, got {tuple(lora_A.shape)}")
    if r > MAX_RANK:
        raise ValueError(f"lora_A: rank r={r} is above the largest supported rank, {MAX_RANK}")
    check_tensor("lora_B", lora_B, shape=(n, r), device=x.device)
    check_same_dtype("lora_B", lora_B, x.dtype)
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), device=x.device)
        check_same_dtype("bias", bias, x.dtype)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a Python float, got {type(scale).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if dropout_mask is not None:
        check_tensor("dropout_mask", dropout_mask, dtypes=(torch.bool,), shape=x.shape, device=x.device)


def lora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Autograd-aware fused LoRA linear; ``weight`` is a dense tensor or a ``Packed4bit``."""
    check_lora_args(x, weight, lora_A, lora_B, scale, bias, dropout_p, dropout_mask)
    if dropout_mask is not None and not (training and dropout_p > 0):
        raise ValueError("dropout_mask: given, but dropout is off (needs training=True and dropout_p > 0)")
    if x.numel() == 0:
        return _no_tokens(x, weight, lora_A, lora_B, float(scale), bias)
    _, impl = select("lora_linear", x.device, x.dtype)
    return impl(x, weight, lora_A, lora_B, float(scale), bias, float(dropout_p), bool(training), dropout_mask)


def _no_tokens(x, weight, lora_A, lora_B, scale, bias):
    """M = 0 (an expert that got no tokens): the empty [..., N] output of every backend, computed by plain
    torch so that autograd gives zero gradients to A, B, bias (and a dense W) and an empty one to x."""
    y = scale * F.linear(F.linear(x, lora_A), lora_B)
    if not isinstance(weight, Packed4bit):
        y = y + F.linear(x, weight)
    return y if bias is None else y + bias


def draw_dropout_mask_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bernoulli(1-p) keep-mask drawn from torch's default generator of x's device (PEFT's statistics)."""
    return torch.empty(x.shape, device=x.device, dtype=torch.float32).bernoulli_(1.0 - p).bool()


@register("lora_linear", "reference")
def lora_linear_reference(x, weight, lora_A, lora_B, scale, bias, dropout_p, training, dropout_mask):
    """Plain torch, fp32 accumulation for 16-bit inputs (fp64 stays fp64); autograd does the backward."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(weight, Packed4bit):
        from ..formats import dequantize_reference

        w = dequantize_reference(weight, acc)
    else:
        w = weight.to(acc)
    xf = x.to(acc)
    y = F.linear(xf, w, None if bias is None else bias.to(acc))
    xd = xf
    if training and dropout_p > 0:
        mask = dropout_mask if dropout_mask is not None else draw_dropout_mask_reference(x, dropout_p)
        xd = xf * mask.to(acc) / (1.0 - dropout_p)
    y = y + scale * F.linear(F.linear(xd, lora_A.to(acc)), lora_B.to(acc))
    return y.to(x.dtype)
