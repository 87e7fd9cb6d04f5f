"""The baselines ours is measured against. Each returns y for the same inputs as ``fl.lora_linear``.

All but the two speed-of-light baselines compute exactly our function (tests/test_bench.py checks it):
- ``dequant_cublas_lora``: dequantize W into a temporary, cuBLAS matmul, then separate LoRA matmuls added
  with addmm; the backward dequantizes again instead of keeping the weight (the Unsloth technique).
- ``peft_bf16`` / ``peft_bnb``: PEFT LoRA over a dense nn.Linear / a bitsandbytes Linear4bit;
  ``peft_bnb_dora``: PEFT's DoRA over the Linear4bit (``peft_lora_layer`` with a magnitude).
- ``torch_compile``: the reference op under torch.compile.
- ``cublas_bf16`` (forward) and ``cublas_bf16_dense`` (forward + dX): F.linear on the dense weight, no LoRA.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..ops.lora import draw_dropout_mask_reference, lora_linear_reference
from ..quantized import QuantizedWeight


class _DequantMatmul(torch.autograd.Function):
    """x·deq(W)ᵀ with the dequantized weight dropped after use and rebuilt for dX."""

    @staticmethod
    def forward(ctx, x, qw):
        ctx.qw = qw
        return x @ qw.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.qw.dequantize(dy.dtype), None


def dequant_cublas_lora(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, training=False,
                        dropout_mask=None):
    y = _DequantMatmul.apply(x, weight) if isinstance(weight, QuantizedWeight) else x @ weight.t()
    xd = x
    if training and dropout_p > 0:
        mask = dropout_mask if dropout_mask is not None else draw_dropout_mask_reference(x, dropout_p)
        xd = x * mask.to(x.dtype) / (1.0 - dropout_p)
    xa = xd @ lora_A.t()
    y2 = y.reshape(-1, y.shape[-1])
    y2 = torch.addmm(y2, xa.reshape(-1, xa.shape[-1]), lora_B.t(), alpha=scale)
    y = y2.reshape(y.shape)
    return y if bias is None else y + bias


def bnb_quant_state(bnbf, p, dtype):
    """bitsandbytes' QuantState over the tensors of an NF4 ``Packed4bit`` (the formats are identical, so
    bitsandbytes reads the very bytes ours does). ``bnbf`` is ``bitsandbytes.functional``."""
    code = bnbf.get_4bit_type("nf4", device=p.data.device)
    if not p.double_quant:
        return bnbf.QuantState(absmax=p.absmax, shape=torch.Size(p.shape), code=code, blocksize=p.block,
                               quant_type="nf4", dtype=dtype)
    state2 = bnbf.QuantState(absmax=p.nested_absmax, code=p.nested_code, blocksize=256, dtype=torch.float32)
    return bnbf.QuantState(absmax=p.absmax, shape=torch.Size(p.shape), code=code, blocksize=p.block,
                           quant_type="nf4", dtype=dtype,
                           offset=torch.tensor(p.nested_offset, device=p.data.device), state2=state2)


def bnb_lora(bnb, x, data, state, lora_A, lora_B, scale):
    """bitsandbytes' 4-bit matmul (its GEMV at small M) plus the LoRA term in torch: the ``bnb`` decode
    baseline (bitsandbytes has no LoRA of its own)."""
    return bnb.matmul_4bit(x, data.t(), quant_state=state) + scale * (x @ lora_A.t()) @ lora_B.t()


def cublas_dense(x, dense_weight):
    return F.linear(x, dense_weight)


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def bitsandbytes():
    """The bitsandbytes module (its ``functional`` loaded too), or None where it does not import."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401  (bnb.functional below)

        return bnb
    except Exception:  # not installed, or its GPU library does not load
        return None


def peft_lora_layer(base: torch.nn.Module, lora_A, lora_B, alpha: float, dropout_p: float, magnitude=None):
    """A PEFT LoRA wrapper around ``base`` (nn.Linear or bnb Linear4bit) holding our A and B; with
    ``magnitude`` [N], PEFT's DoRA (use_dora) holding it as well."""
    from peft import LoraConfig, get_peft_model

    class _Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    r = lora_A.shape[0]
    model = get_peft_model(_Holder(), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout_p,
                                                 target_modules=["proj"], bias="none",
                                                 use_dora=magnitude is not None))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
        if magnitude is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    model.train()
    return model


def compiled_reference():
    return torch.compile(lora_linear_reference, dynamic=False)
