"""The tensors of a 4-bit weight, bundled the way ops take them, and the one check of their metadata.

``check_packed`` is the single validation of a 4-bit weight: every path that reads one (each backend of
the ops, state-dict loading, ``from_bnb``, the checkpoint loader) runs it before any kernel indexes the
tensors, and the CUDA binding repeats the same rules in C++ (csrc/bindings.cpp).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

SCHEMES = ("nf4", "int4")
BLOCKSIZES = (64, 128, 256)  # NF4 blocksizes
NESTED_BLOCKSIZE = 256  # NF4 double quantization: absmax codes per nested_absmax entry
GROUP_SIZES = (64, 128)  # INT4 group sizes along K
MAX_DIM = 2**31 - 1  # N and K each (the kernels take them as 32-bit ints; offsets are 64-bit)


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


def field_names(prefix: str) -> dict[str, str]:
    """``check_packed``'s ``names`` for a weight reported as ``prefix`` + field (``"weight."``)."""
    fields = ("scheme", "data", "shape", "block", "absmax", "nested_absmax", "nested_code", "nested_offset",
              "scales", "zeros")
    return {f: prefix + f for f in fields}


def n_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Checker:
    """Raises errors that name a field by ``names`` (a state-dict key, say) or by the field itself."""

    def __init__(self, packed: Packed4bit, names: Mapping[str, str] | None):
        self.p, self.names = packed, dict(names or {})

    def name(self, field: str) -> str:
        return self.names.get(field, field)

    def tensor(self, field: str, dtype: torch.dtype, shape: tuple | None = None, numel: int | None = None,
               why: str = "") -> None:
        """``why``: what the size means, appended to the message."""
        t, name = getattr(self.p, field), self.name(field)
        why = f" ({why})" if why else ""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a {dtype_name(dtype)} tensor, got {type(t).__name__}{why}")
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype_name(dtype)}, got {dtype_name(t.dtype)}{why}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}{why}")
        if numel is not None and t.numel() != numel:
            unit = "bytes" if field == "data" else "elements"
            raise ValueError(f"{name}: expected {numel} {unit}, got shape {tuple(t.shape)}{why}")
        if field != "data" and t.device != self.p.data.device:
            raise ValueError(f"{name}: expected a tensor on {self.p.data.device} (where {self.name('data')} is), "
                             f"got one on {t.device}")

    def absent(self, fields, scheme: str) -> None:
        for field in fields:
            if getattr(self.p, field) is not None:
                raise ValueError(f"{self.name(field)}: expected None for a {scheme} weight, got a tensor")


def check_packed(packed, names: Mapping[str, str] | None = None) -> Packed4bit:
    """Validate a 4-bit weight's metadata against its tensors; returns ``packed``.

    Checked: the scheme; the shape (two ints in 1..2**31-1); the block size (NF4: 64/128/256; INT4: 64/128
    dividing K); each tensor's presence, dtype, size (codes, absmax, nested absmax and code, scales,
    zeros, against the shape and block size) and device (that of ``data``); a finite ``nested_offset``.
    Errors are ValueError/TypeError naming the field (``names`` maps a field to the name to report, e.g.
    its state-dict key; "shape", "block" and "nested_offset" may be mapped too).
    """
    if not isinstance(packed, Packed4bit):
        raise TypeError(f"weight: expected a Packed4bit, got {type(packed).__name__}")
    c = _Checker(packed, names)
    if packed.scheme not in SCHEMES:
        raise ValueError(f"{c.name('scheme')}: expected one of {SCHEMES}, got {packed.scheme!r}")
    shape = packed.shape
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2
            and all(_is_int(s) and 1 <= s <= MAX_DIM for s in shape)):
        raise ValueError(f"{c.name('shape')}: expected [N, K] with ints 1 <= N, K <= {MAX_DIM}, got {shape!r}")
    n, k = shape
    block = packed.block
    sizes = BLOCKSIZES if packed.scheme == "nf4" else GROUP_SIZES
    if not _is_int(block) or block not in sizes:
        raise ValueError(f"{c.name('block')}: expected one of {sizes} for {packed.scheme}, got {block!r}")
    offset = packed.nested_offset
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
        raise ValueError(f"{c.name('nested_offset')}: expected a finite number, got {offset!r}")
    if packed.scheme == "int4":
        if k % block:
            raise ValueError(f"{c.name('block')}: expected a group size dividing K={k}, got {block}")
        c.absent(("absmax", "nested_absmax", "nested_code"), "int4")
        c.tensor("data", torch.uint8, shape=(n, k // 2), why=f"an INT4 [{n}, {k}] weight")
        groups = (n, k // block)
        c.tensor("scales", torch.float32, shape=groups, why=f"[N, K / {block}]")
        c.tensor("zeros", torch.uint8, shape=groups, why=f"[N, K / {block}]")
        return packed
    c.absent(("scales", "zeros"), "nf4")
    c.tensor("data", torch.uint8, numel=(n * k + 1) // 2, why=f"two codes per byte of [{n}, {k}]")
    nb = n_blocks(n * k, block)
    dq = packed.nested_absmax is not None
    if dq != (packed.nested_code is not None):
        given, missing = ("nested_absmax", "nested_code") if dq else ("nested_code", "nested_absmax")
        raise ValueError(f"{c.name(missing)}: expected with {c.name(given)} (double quantization), got None")
    blocks = f"one per {block} elements of [{n}, {k}]"
    c.tensor("absmax", torch.uint8 if dq else torch.float32, shape=(nb,),
             why=blocks + (", 8-bit codes with double quantization" if dq else ""))
    if dq:
        c.tensor("nested_absmax", torch.float32, shape=(n_blocks(nb, NESTED_BLOCKSIZE),),
                 why=f"one per {NESTED_BLOCKSIZE} of the {nb} blocks")
        c.tensor("nested_code", torch.float32, shape=(256,))
    return packed


def check_finite_weight(w: torch.Tensor, name: str = "w") -> None:
    """A weight to quantize must hold finite values only (an inf or NaN has no block scale)."""
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{name}: expected finite values, got {int(bad.sum())} inf/NaN (the first at "
                         f"{list(first)}: {w[first].item()})")
