"""QuantizedWeight: the user-facing container of a 4-bit weight (a plain object, not a tensor subclass)."""

from __future__ import annotations

import torch

from .formats.packed import Packed4bit


class QuantizedWeight:
    """A 4-bit weight W[N, K]: its tensors (a ``Packed4bit``) plus the dtype it was quantized from."""

    def __init__(self, packed: Packed4bit, dtype: torch.dtype = torch.bfloat16):
        self.packed = packed
        self.dtype = dtype

    @property
    def scheme(self) -> str:
        return self.packed.scheme

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.packed.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def __repr__(self) -> str:
        dq = ", double_quant" if self.packed.double_quant else ""
        return (
            f"QuantizedWeight(scheme={self.scheme!r}, shape={tuple(self.shape)}, block={self.packed.block}"
            f"{dq}, dtype={self.dtype}, device={self.device})"
        )


def quantize(w: torch.Tensor, scheme: str = "nf4", **kwargs) -> QuantizedWeight:
    """Quantize a 2-D weight to ``scheme`` ("nf4": blocksize, double_quant; "int4": group_size)."""
    raise NotImplementedError("quantize: the NF4/INT4 formats are not implemented yet")
