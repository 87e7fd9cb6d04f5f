"""QuantizedWeight: the user-facing container of a 4-bit weight (a plain object, not a tensor subclass).

It holds a ``Packed4bit`` (the tensors the ops take) and the dtype the weight was quantized from. It
converts to and from bitsandbytes without importing it: ``from_bnb`` reads a Params4bit (or its data
and QuantState) by their attributes, and the state-dict methods use bitsandbytes' exact keys.
"""

from __future__ import annotations

import dataclasses

import torch

from . import ops
from .formats import bnb as _bnb
from .formats.int4 import quantize_int4
from .formats.nf4 import NESTED_BLOCKSIZE
from .formats.packed import SCHEMES, Packed4bit

_TENSOR_FIELDS = ("data", "absmax", "nested_absmax", "nested_code", "scales", "zeros")


class QuantizedWeight:
    """A 4-bit weight W[N, K]: its tensors (a ``Packed4bit``) plus the dtype it was quantized from."""

    def __init__(self, packed: Packed4bit, dtype: torch.dtype = torch.bfloat16):
        if not isinstance(packed, Packed4bit):
            raise TypeError(f"packed: expected a Packed4bit, got {type(packed).__name__}")
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

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W[N, K] in ``dtype`` (default: the original dtype), computed by the backend of its device."""
        return ops.dequantize(self.packed, dtype or self.dtype)

    def to(self, device) -> QuantizedWeight:
        """A copy on ``device`` (the 4-bit tensors keep their dtypes)."""
        moved = {f: getattr(self.packed, f).to(device) for f in _TENSOR_FIELDS if getattr(self.packed, f) is not None}
        return QuantizedWeight(dataclasses.replace(self.packed, **moved), self.dtype)

    # ---- bitsandbytes -------------------------------------------------------------------------------

    @classmethod
    def from_bnb(cls, param_or_data, quant_state=None) -> QuantizedWeight:
        """From a bitsandbytes ``Params4bit``, or its packed ``data`` and ``QuantState`` (read by attribute,
        bitsandbytes not needed). The tensors are shared, not copied."""
        if quant_state is None:
            quant_state = getattr(param_or_data, "quant_state", None)
            if quant_state is None:
                raise ValueError(
                    f"param_or_data: expected a Params4bit with a quant_state (or pass quant_state=), got a "
                    f"{type(param_or_data).__name__} without one (not quantized yet?)"
                )
        data = param_or_data.data if isinstance(param_or_data, torch.nn.Parameter) else param_or_data
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"param_or_data: expected a tensor of packed bytes, got {type(data).__name__}")
        qtype = getattr(quant_state, "quant_type", None)
        if qtype != "nf4":
            raise ValueError(f"quant_state.quant_type: expected 'nf4', got {qtype!r}")
        shape = tuple(getattr(quant_state, "shape", ()))
        blocksize = getattr(quant_state, "blocksize", None)
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape: expected [N, K], got {shape}")
        absmax = getattr(quant_state, "absmax", None)
        if not isinstance(absmax, torch.Tensor) or absmax.dtype not in (torch.float32, torch.uint8) or (
            data.dim() == 2 and data.shape[1] != 1
        ):
            got = f"absmax {getattr(absmax, 'dtype', None)}, data shape {tuple(data.shape)}"
            raise ValueError(
                f"quant_state: expected bitsandbytes' stored layout (data [bytes, 1], absmax float32 or uint8 "
                f"codes), got {got}. bitsandbytes rewrites a Linear4bit's weight in place for its CPU kernel at "
                "the first eval-mode forward on CPU; read the weight (or its state dict) before any forward"
            )
        if data.dtype != torch.uint8:  # another quant_storage dtype holds the same bytes
            data = data.contiguous().view(torch.uint8)
        data = data.reshape(-1, 1)
        state2 = getattr(quant_state, "state2", None)
        if state2 is None:
            packed = Packed4bit("nf4", data, (int(shape[0]), int(shape[1])), int(blocksize),
                                absmax=quant_state.absmax)
        else:
            if getattr(state2, "blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
                raise ValueError(f"quant_state.state2.blocksize: expected {NESTED_BLOCKSIZE}, got {state2.blocksize}")
            offset = quant_state.offset
            packed = Packed4bit(
                "nf4", data, (int(shape[0]), int(shape[1])), int(blocksize), absmax=quant_state.absmax,
                nested_absmax=state2.absmax, nested_code=state2.code,
                nested_offset=float(offset.item() if isinstance(offset, torch.Tensor) else offset),
            )
        # validate through the state-dict path: one set of checks (errors name the keys of module "param")
        dtype = getattr(quant_state, "dtype", torch.float32)
        packed, dtype = _bnb.from_state_dict(_bnb.to_state_dict(packed, dtype, "param"), "param")
        return cls(packed, dtype)

    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """bitsandbytes' keys for module ``prefix`` (``p.weight``, ``p.weight.absmax``, ...; NF4 only)."""
        return _bnb.to_state_dict(self.packed, self.dtype, prefix)

    @classmethod
    def from_bnb_state_dict(cls, sd, prefix: str = "") -> QuantizedWeight:
        """From bitsandbytes' keys for module ``prefix`` in ``sd``; a missing or mis-shaped tensor, an unknown
        quant_type or an inconsistent quant_state JSON raises an error naming the key."""
        packed, dtype = _bnb.from_state_dict(sd, prefix)
        return cls(packed, dtype)


def quantize(
    w: torch.Tensor,
    scheme: str = "nf4",
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    group_size: int = 128,
) -> QuantizedWeight:
    """Quantize a 2-D weight W[N, K] (bf16/fp16/fp32).

    ``scheme="nf4"``: bitsandbytes' NF4 (byte for byte), ``blocksize`` 64/128/256, ``double_quant``
    8-bit absmax; any shape. ``scheme="int4"``: group-wise asymmetric, ``group_size`` 64/128 along K
    (K must be a multiple of it). The result remembers w's dtype as the default dequantize dtype.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    w = w.detach()
    if scheme == "nf4":
        packed = ops.dequant.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    elif scheme == "int4":
        packed = quantize_int4(w, group_size=group_size)
    else:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    return QuantizedWeight(packed, w.dtype)
