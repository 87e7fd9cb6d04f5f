"""The public functional API: accepts the user-facing containers and hands their tensors to the ops."""

from __future__ import annotations

import torch

from . import ops
from .quantized import QuantizedWeight


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
    """y = x·Wᵀ + scale·(drop(x)·Aᵀ)·Bᵀ (+ bias), autograd-aware.

    ``weight`` is a dense [N, K] tensor in x's dtype or a ``QuantizedWeight`` of shape [N, K].
    Dropout (PEFT's semantics: on x before A) is active when ``training`` and ``dropout_p > 0``;
    ``dropout_mask`` (bool, x's shape) fixes the kept elements instead of drawing them.
    """
    if isinstance(weight, QuantizedWeight):
        weight = weight.packed
    return ops.lora_linear(x, weight, lora_A, lora_B, scale, bias, dropout_p, training, dropout_mask)


def dora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    base_sq_norm: torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,
    weight_norm: torch.Tensor | None = None,
    fold: tuple | None = None,
) -> torch.Tensor:
    """DoRA (PEFT's semantics): y = x·Wᵀ + b + (g − 1) ⊙ drop(x)·Wᵀ + g ⊙ s·(drop(x)·Aᵀ)·Bᵀ,
    g = magnitude / ‖W + s·B·A‖ (row norms, detached), autograd-aware.

    ``base_sq_norm``: ‖W_n‖² [N] of W as decoded to x's dtype (``fusedlora.ops.dora.weight_row_sq_norms``;
    a constant of the frozen base that the caller keeps). ``weight_norm``: ‖W + s·B·A‖ [N] when the caller
    kept it for these tensors (``fusedlora.ops.dora.dora_row_norm``), else computed. ``fold``: what
    ``fusedlora.ops.dora.dora_fold`` gave for these tensors and that norm, when the caller kept it for calls
    without gradients (a 4-bit base in bf16 or fp32: no gain launch per call). Other arguments as
    ``lora_linear``.
    """
    if isinstance(weight, QuantizedWeight):
        weight = weight.packed
    return ops.dora_linear(x, weight, lora_A, lora_B, scale, magnitude, base_sq_norm, bias, dropout_p, training,
                           dropout_mask, weight_norm, fold)
