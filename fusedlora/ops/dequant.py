"""Dequantize and quantize ops: the tensors of a 4-bit weight in, the dense W[N, K] out, and back.

    torch.ops.fusedlora.dequantize_nf4(data, absmax, nested_absmax?, nested_code?, nested_offset,
                                       blocksize, n, k, dtype) -> W[n, k]
    torch.ops.fusedlora.dequantize_int4(data, scales, zeros, group_size, dtype) -> W[N, K]
    torch.ops.fusedlora.quantize_nf4(w, blocksize) -> (data, absmax)     (bitsandbytes' bytes)

Each is a torch.library custom op with a fake impl (torch.compile traces it) whose body dispatches
through the op registry to the "reference" (plain torch), "triton" or "cuda" implementation; the
"cuda" NF4 implementation is the extension's ``torch.ops.fusedlora.dequantize_nf4_cuda`` (csrc/).
``dequantize(packed, dtype)`` and ``quantize_nf4(w, blocksize, double_quant)`` are the Python entries:
they validate and call the ops (double quantization of the absmax runs in plain torch: a few KB).
"""

from __future__ import annotations

import torch

from .._ext import extension_loaded
from ..formats import dequantize_int4 as _int4_reference
from ..formats import dequantize_nf4 as _nf4_reference
from ..formats.nf4 import assemble_nf4, check_nf4_input, quantize_nf4_bytes
from ..formats.packed import Packed4bit, check_packed, n_blocks
from ..kernels import device_guard
from .checks import check_tensor
from .registry import register, select

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ---- argument checks (shared by every implementation) -------------------------------------------------


def _check_out_dtype(dtype) -> None:
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype: expected one of {OUT_DTYPES}, got {dtype}")


def check_nf4(data, absmax, nested_absmax, nested_code, blocksize: int, n: int, k: int, dtype,
              nested_offset: float = 0.0) -> None:
    """The NF4 tensors and metadata as the ops take them, by ``formats.check_packed``."""
    _check_out_dtype(dtype)
    check_packed(Packed4bit("nf4", data, (n, k), blocksize, absmax=absmax, nested_absmax=nested_absmax,
                            nested_code=nested_code, nested_offset=nested_offset))


def check_int4(data, scales, zeros, group_size: int, dtype) -> None:
    """The INT4 tensors as the ops take them (W [N, K] read from data [N, K/2]), by ``formats.check_packed``."""
    _check_out_dtype(dtype)
    check_tensor("data", data, dtypes=(torch.uint8,), ndim=2)
    check_packed(Packed4bit("int4", data, (data.shape[0], 2 * data.shape[1]), group_size, scales=scales,
                            zeros=zeros))


# ---- the ops ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedlora::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(
    data: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: float,
    blocksize: int,
    n: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    check_nf4(data, absmax, nested_absmax, nested_code, blocksize, n, k, dtype, nested_offset)
    _, impl = select("dequantize_nf4", data.device, dtype)
    with device_guard(data.device):  # Triton launches on the current device, not the tensors'
        return impl(data.contiguous(), absmax.contiguous(), nested_absmax, nested_code, nested_offset, blocksize,
                    n, k, dtype)


@dequantize_nf4_op.register_fake
def _(data, absmax, nested_absmax, nested_code, nested_offset, blocksize, n, k, dtype):
    return data.new_empty((n, k), dtype=dtype)


@torch.library.custom_op("fusedlora::dequantize_int4", mutates_args=())
def dequantize_int4_op(
    data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    check_int4(data, scales, zeros, group_size, dtype)
    _, impl = select("dequantize_int4", data.device, dtype)
    with device_guard(data.device):
        return impl(data.contiguous(), scales.contiguous(), zeros.contiguous(), group_size, dtype)


@dequantize_int4_op.register_fake
def _(data, scales, zeros, group_size, dtype):
    return data.new_empty((data.shape[0], 2 * data.shape[1]), dtype=dtype)


@torch.library.custom_op("fusedlora::quantize_nf4", mutates_args=())
def quantize_nf4_op(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_nf4_input(w, blocksize)
    _, impl = select("quantize_nf4", w.device, w.dtype)
    with device_guard(w.device):
        return impl(w.contiguous(), blocksize)


@quantize_nf4_op.register_fake
def _(w, blocksize):
    numel = w.numel()
    return w.new_empty(((numel + 1) // 2, 1), dtype=torch.uint8), w.new_empty((n_blocks(numel, blocksize),),
                                                                                dtype=torch.float32)


# ---- implementations ----------------------------------------------------------------------------------------


@register("dequantize_nf4", "reference")
def dequantize_nf4_reference(data, absmax, nested_absmax, nested_code, nested_offset, blocksize, n, k, dtype):
    packed = Packed4bit("nf4", data, (n, k), blocksize, absmax=absmax, nested_absmax=nested_absmax,
                        nested_code=nested_code, nested_offset=nested_offset)
    return _nf4_reference(packed, dtype)


@register("dequantize_nf4", "triton")
def _dequantize_nf4_triton(*args):
    from ..kernels.dequant import dequantize_nf4_triton

    return dequantize_nf4_triton(*args)


@register("dequantize_nf4", "cuda")
def dequantize_nf4_cuda(data, absmax, nested_absmax, nested_code, nested_offset, blocksize, n, k, dtype):
    return torch.ops.fusedlora.dequantize_nf4_cuda(
        data, absmax, nested_absmax, nested_code, nested_offset, blocksize, n, k, dtype
    )


@register("dequantize_int4", "reference")
def dequantize_int4_reference(data, scales, zeros, group_size, dtype):
    n, k = data.shape[0], 2 * data.shape[1]
    return _int4_reference(Packed4bit("int4", data, (n, k), group_size, scales=scales, zeros=zeros), dtype)


@register("dequantize_int4", "triton")
def _dequantize_int4_triton(*args):
    from ..kernels.dequant import dequantize_int4_triton

    return dequantize_int4_triton(*args)


@register("quantize_nf4", "reference")
def quantize_nf4_reference(w, blocksize):
    return quantize_nf4_bytes(w, blocksize)


@register("quantize_nf4", "triton")
def _quantize_nf4_triton(w, blocksize):
    from ..kernels.dequant import quantize_nf4_triton

    return quantize_nf4_triton(w, blocksize)


# ---- the extension's op: its fake impl lives here, next to the op that calls it ------------------------------

if extension_loaded() and hasattr(torch.ops.fusedlora, "dequantize_nf4_cuda"):

    @torch.library.register_fake("fusedlora::dequantize_nf4_cuda")
    def _(data, absmax, nested_absmax, nested_code, nested_offset, blocksize, n, k, dtype):
        return data.new_empty((n, k), dtype=dtype)


# ---- the Python entry ---------------------------------------------------------------------------------------


def dequantize(packed: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """W[N, K] in ``dtype`` from a ``Packed4bit``, by the backend of its device (``fl.backend``); the ops
    validate their arguments."""
    check_packed(packed)
    if packed.scheme == "nf4":
        return torch.ops.fusedlora.dequantize_nf4(
            packed.data, packed.absmax, packed.nested_absmax, packed.nested_code, float(packed.nested_offset),
            packed.block, *packed.shape, dtype,
        )
    return torch.ops.fusedlora.dequantize_int4(packed.data, packed.scales, packed.zeros, packed.block, dtype)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> Packed4bit:
    """bitsandbytes-exact NF4 of a 2-D weight, the codes by the backend of its device."""
    check_nf4_input(w, blocksize)
    data, absmax = torch.ops.fusedlora.quantize_nf4(w, blocksize)
    return assemble_nf4(data, absmax, tuple(w.shape), blocksize, double_quant)
