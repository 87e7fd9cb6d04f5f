"""torch.library ops around the DoRA kernels (``kernels.dora``), so that torch.compile traces a DoRA layer
as it traces the fused LoRA op: each op runs its launcher, and its fake impl gives the output shapes.

    torch.ops.fusedlora.dora_norm(wa, b, aat, sq, m?, scale) -> (norm, g)      g: [0] without m
    torch.ops.fusedlora.dora_gain(m, norm, b, scales, nested_absmax?, nested_code?, nested_offset, zero_m)
        -> (g, 1 / m, g ⊙ B, folded scales)
    torch.ops.fusedlora.dora_scale_fwd(z, g?, u?, bias?) -> y
    torch.ops.fusedlora.dora_scale_bwd(dy, z, g?, factor?) -> (dz, column sums)   dz: [0] without g
    torch.ops.fusedlora.dora_drop_split(x, seed, p) -> (drop(x), x − drop(x), keep bits)
    torch.ops.fusedlora.dora_drop_split_bwd(dxd, dc, bits, p) -> dx
    torch.ops.fusedlora.row_sq_norms_4bit(w, w_scales?, w_zeros?, nested_absmax?, nested_code?, fmt, n, k,
                                          block, nested_offset, dtype) -> ‖W_n‖² [n]   (a 4-bit W, fp32)

Arguments and outputs as the launchers of ``kernels.dora`` (looked up at call time); an output a launcher
leaves out (None) is an empty tensor here, as an op returns tensors only. The ops have no autograd of their
own: ``ops.dora``'s autograd Functions call them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels


def _kd():
    from ..kernels import dora

    return dora


def _none_as_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t


@torch.library.custom_op("fusedlora::dora_norm", mutates_args=())
def dora_norm(wa: Tensor, b: Tensor, aat: Tensor, sq: Tensor, m: Tensor | None,
              scale: float) -> tuple[Tensor, Tensor]:
    norm, g = _kd().dora_norm(wa, b, aat, sq, m, scale)
    return norm, _none_as_empty(g, norm)


@dora_norm.register_fake
def _(wa, b, aat, sq, m, scale):
    n = wa.shape[1]
    return wa.new_empty((n,), dtype=torch.float32), wa.new_empty((0 if m is None else n,), dtype=torch.float32)


@torch.library.custom_op("fusedlora::dora_gain", mutates_args=())
def dora_gain(m: Tensor, norm: Tensor, b: Tensor, scales: Tensor, nested_absmax: Tensor | None,
              nested_code: Tensor | None, nested_offset: float,
              zero_m: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    nested = None if nested_absmax is None else (nested_absmax, nested_code, nested_offset)
    return _kd().dora_gain(m, norm, b, scales, nested, zero_m)


@dora_gain.register_fake
def _(m, norm, b, scales, nested_absmax, nested_code, nested_offset, zero_m):
    n = b.shape[0]
    kb = scales.numel() // max(n, 1)
    f32 = dict(dtype=torch.float32)
    return b.new_empty((n,), **f32), b.new_empty((n,), **f32), torch.empty_like(b), b.new_empty((n, kb), **f32)


@torch.library.custom_op("fusedlora::dora_scale_fwd", mutates_args=())
def dora_scale_fwd(z: Tensor, g: Tensor | None, u: Tensor | None, bias: Tensor | None) -> Tensor:
    return _kd().dora_scale_fwd(z, g, u, bias)


@dora_scale_fwd.register_fake
def _(z, g, u, bias):
    return torch.empty_like(z)


@torch.library.custom_op("fusedlora::dora_scale_bwd", mutates_args=())
def dora_scale_bwd(dy: Tensor, z: Tensor, g: Tensor | None, factor: Tensor | None) -> tuple[Tensor, Tensor]:
    dz, sums = _kd().dora_scale_bwd(dy, z, g, factor)
    return _none_as_empty(dz, z), sums


@dora_scale_bwd.register_fake
def _(dy, z, g, factor):
    dz = torch.empty_like(z) if g is not None else z.new_empty((0,))
    return dz, z.new_empty((z.shape[1],), dtype=torch.float32)


@torch.library.custom_op("fusedlora::dora_drop_split", mutates_args=())
def dora_drop_split(x: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kd().drop_split(x, seed, p)


@dora_drop_split.register_fake
def _(x, seed, p):
    m, k = x.shape
    return torch.empty_like(x), torch.empty_like(x), x.new_empty((m, (k + 7) // 8), dtype=torch.uint8)


@torch.library.custom_op("fusedlora::dora_drop_split_bwd", mutates_args=())
def dora_drop_split_bwd(dxd: Tensor, dc: Tensor, bits: Tensor, p: float) -> Tensor:
    return _kd().drop_split_bwd(dxd, dc, bits, p)


@dora_drop_split_bwd.register_fake
def _(dxd, dc, bits, p):
    return torch.empty_like(dc)


@torch.library.custom_op("fusedlora::row_sq_norms_4bit", mutates_args=())
def row_sq_norms_4bit(w: Tensor, w_scales: Tensor | None, w_zeros: Tensor | None, nested_absmax: Tensor | None,
                      nested_code: Tensor | None, fmt: str, n: int, k: int, block: int, nested_offset: float,
                      dtype: torch.dtype) -> Tensor:
    from ..kernels.lora_fwd import decode_absmax

    with kernels.device_guard(w.device):
        if nested_absmax is not None:
            w_scales = decode_absmax(w_scales, nested_code, nested_absmax, nested_offset)
        return _kd().row_sq_norms_4bit(w, w_scales, w_zeros, fmt, n, k, block, dtype)


@row_sq_norms_4bit.register_fake
def _(w, w_scales, w_zeros, nested_absmax, nested_code, fmt, n, k, block, nested_offset, dtype):
    return w.new_empty((n,), dtype=torch.float32)
