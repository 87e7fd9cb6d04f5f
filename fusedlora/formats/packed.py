"""The tensors of a 4-bit weight, bundled the way ops take them (no behaviour beyond checks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("nf4", "int4")


@dataclass(frozen=True)
class Packed4bit:
    """A 4-bit weight W[N, K] as tensors plus the metadata needed to decode them.

    scheme "nf4" (bitsandbytes layout, see ``formats.nf4``):
        data           uint8 [ceil(N*K/2), 1]  two codes per byte, first element in the HIGH nibble
        absmax         float32 [n_blocks], or uint8 [n_blocks] codes when double-quantized
        nested_absmax  float32 [ceil(n_blocks/256)]   (double quantization only)
        nested_code    float32 [256]                  (double quantization only)
        nested_offset  float                          (double quantization only)
    scheme "int4" (group-wise asymmetric, see ``formats.int4``):
        data           uint8, layout of ``formats.int4``
        scales, zeros  [N, K // block]
    ``block`` is the NF4 blocksize or the INT4 group size.
    """

    scheme: str
    data: torch.Tensor
    shape: tuple[int, int]
    block: int
    absmax: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: float = 0.0
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]
