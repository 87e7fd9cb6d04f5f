"""4-bit weight layouts as functions: packing, reference quantize/dequantize, bitsandbytes key names.

``nf4`` (bitsandbytes' format, with double quantization), ``int4`` (group-wise asymmetric), ``bnb`` (the
state-dict keys and quant_state JSON), ``nibbles`` (two codes per byte). The reference functions here
are plain torch: the CPU path and the oracle of every kernel.
"""

from __future__ import annotations

import torch

from .int4 import GROUP_SIZES, dequantize_int4, quantize_int4
from .nf4 import BLOCKSIZES, NF4_CODE, decode_absmax, dequantize_nf4, dynamic_map, nf4_code, quantize_nf4
from .packed import SCHEMES, Packed4bit, check_packed


def dequantize_reference(packed: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """W[N, K] in ``dtype`` from a ``Packed4bit`` (fp32 products, one rounding into ``dtype``)."""
    check_packed(packed)
    if packed.scheme == "nf4":
        return dequantize_nf4(packed, dtype)
    if packed.scheme == "int4":
        return dequantize_int4(packed, dtype)
    raise ValueError(f"packed.scheme: expected one of {SCHEMES}, got {packed.scheme!r}")


__all__ = [
    "BLOCKSIZES",
    "GROUP_SIZES",
    "NF4_CODE",
    "SCHEMES",
    "Packed4bit",
    "check_packed",
    "decode_absmax",
    "dequantize_int4",
    "dequantize_nf4",
    "dequantize_reference",
    "dynamic_map",
    "nf4_code",
    "quantize_int4",
    "quantize_nf4",
]
