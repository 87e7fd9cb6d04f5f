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
