"""FSDP2 over models with fused LoRA layers, dense or 4-bit bases: ``fusedlora.fully_shard``.

A dense base is an ordinary frozen parameter and FSDP2 shards it as it is. A 4-bit base is held by
``LoRALinear`` as buffers (``quant_data``, ``quant_absmax``, ...), which FSDP2 would replicate on every
process. ``fully_shard`` turns those buffers into frozen parameters of the same names (so the state-dict
keys stay) and lets FSDP2 shard and all-gather them like any other parameter:

- **Whole quantization blocks per shard.** FSDP2 splits a parameter along its first dimension. An NF4 code
  tensor is held as [blocks, bytes per block] (the same bytes as bitsandbytes' [bytes, 1]; every op reads
  it by its number of bytes), so process p holds whole blocks, and its ``quant_absmax`` shard covers the
  same block range (both have one row per block). INT4 codes, scales and zeros are [N, ...]: a shard holds
  whole rows, each with all of its groups. The small double-quantization state (one fp32 per 256 blocks
  and the 256-entry table) is split the same way. An NF4 weight whose N·K is not a multiple of its block
  size (a partial last block) keeps the [bytes, 1] layout and is split at byte granularity.
- **The op sees a complete, correctly described weight.** FSDP2 gathers a layer's tensors into full ones
  before its forward and again before its backward, and frees them after; the metadata (scheme, shape,
  block size, double-quant offset, compute dtype) lives in Python attributes and the small ``quant_meta`` /
  ``quant_offset`` buffers, which every process holds whole. So at each forward the layer rebuilds a
  ``Packed4bit`` exactly as without sharding, and ``check_packed`` runs on the gathered tensors.
- **One FSDP2 unit per 4-bit layer.** Each 4-bit ``LoRALinear`` (its codes, scales and LoRA factors) is a
  unit of its own, so at most the running layer and the one being prefetched are gathered: a 4-bit base
  costs a process 1/N of its bytes plus about two layers. These units never cast their parameters
  (``mp_policy.param_dtype`` is dropped for them): a cast would turn fp32 block scales into bf16 and
  change the decoded weight. FSDP2 leaves integer parameters alone anyway; the forward casts the LoRA
  factors to the input's dtype, which is what a param_dtype cast would have done.

Why frozen parameters and not a tensor subclass with ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``:
the gathered weight is several tensors of different dtypes (uint8 codes, fp32 or uint8 scales, a nested
fp32 state), which FSDP2 already all-gathers in one collective per unit (as bytes when dtypes differ);
a subclass would have to implement every tensor operation the module, ``state_dict``, ``.to()`` and DTensor
apply to it, and would replace the plain tensors the ops validate with an object they do not know. With
parameters, everything below this module (``QuantizedWeight``, ``Packed4bit``, the ops and kernels) is
unchanged and sees plain tensors only. The cost is that the codes' shape in a sharded state dict is
[blocks, bytes per block] rather than [bytes, 1] (same bytes, same keys).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn
from torch.torch_version import TorchVersion

from .formats.packed import check_packed, field_names
from .modules import _QUANT_FIELDS, LoRALinear

__all__ = ["decoder_layers", "fully_shard", "hold_as_parameters", "quantized_layers"]


def quantized_layers(model: nn.Module) -> list[LoRALinear]:
    """The ``LoRALinear`` layers of ``model`` with a 4-bit base."""
    return [m for m in model.modules() if isinstance(m, LoRALinear) and m.quantized]


def decoder_layers(model: nn.Module, units: Iterable | None = None) -> list[nn.Module]:
    """The submodules to shard as units: instances of ``units`` (classes, or class names), by default the
    classes a transformers model names in ``_no_split_modules`` (its decoder layers)."""
    if units is None:
        units = getattr(model, "_no_split_modules", None) or ()
    names = {u if isinstance(u, str) else u.__name__ for u in units}
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def _storage_shape(layer: LoRALinear, field: str, t: torch.Tensor) -> torch.Tensor:
    """NF4 codes as [blocks, bytes per block] when the weight has whole blocks only (see the module
    docstring); every other tensor as it is."""
    if field != "data" or layer.quant_scheme != "nf4":
        return t
    per_block = layer.quant_block // 2
    n, k = layer._quant_shape
    if (n * k) % layer.quant_block:
        return t
    return t.reshape(-1, per_block)


def _frozen_unless_floating(data=None, requires_grad=True) -> nn.Parameter:
    """``nn.Parameter``, created frozen when ``data`` has an integer dtype (which cannot require grad)."""
    if data is not None and not (data.is_floating_point() or data.is_complex()):
        requires_grad = False
    return nn.Parameter(data, requires_grad)


class _NNForFSDP2:
    """``torch.nn`` as FSDP2's parameter module sees it on torch < 2.12: its ``Parameter`` creates integer
    tensors frozen (``_let_fsdp2_hold_integer_parameters``); everything else is torch.nn's own."""

    Parameter = staticmethod(_frozen_unless_floating)

    def __getattr__(self, name):
        return getattr(nn, name)


def _let_fsdp2_hold_integer_parameters() -> None:
    """FSDP2 before torch 2.12 creates each sharded parameter as ``nn.Parameter(t)`` and sets its
    requires_grad only afterwards; for an integer tensor, such as our uint8 codes, the first step raises
    "only Tensors of floating point dtype can require gradients" (pytorch/pytorch#177844, fixed in 2.12,
    where the parameter is created with the original's requires_grad). On those versions FSDP2's parameter
    module gets a ``torch.nn`` whose ``Parameter`` creates integer tensors frozen, which is what 2.12 does;
    floating tensors are created exactly as before, so no other model's sharding changes. Idempotent."""
    if TorchVersion(torch.__version__) >= "2.12":
        return
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:  # FSDP2 laid out otherwise: left as it is (it raises its own error, if any)
        return
    if not isinstance(getattr(_fsdp_param, "nn", None), _NNForFSDP2):
        _fsdp_param.nn = _NNForFSDP2()


def hold_as_parameters(layer: LoRALinear) -> None:
    """Re-register a 4-bit layer's storage tensors (codes, scales, double-quant state) as frozen parameters
    under the same names, so that FSDP2 shards them (on torch < 2.12, after letting FSDP2 hold integer
    parameters: ``_let_fsdp2_hold_integer_parameters``). The metadata buffers stay buffers. Idempotent."""
    if not layer.quantized:
        raise ValueError("hold_as_parameters: the layer has a dense base (already a parameter)")
    check_packed(layer.base_weight.packed, field_names("weight."))
    _let_fsdp2_hold_integer_parameters()
    for field in _QUANT_FIELDS:
        name = f"quant_{field}"
        t = layer._buffers.get(name)
        if t is None:
            continue
        del layer._buffers[name]
        layer._parameters[name] = nn.Parameter(_storage_shape(layer, field, t), requires_grad=False)


def _unit_kwargs(fsdp_kwargs: dict) -> dict:
    """FSDP2's arguments for a 4-bit layer's unit: the caller's, without casting parameters."""
    mp = fsdp_kwargs.get("mp_policy")
    if mp is None or mp.param_dtype is None:
        return fsdp_kwargs
    return {**fsdp_kwargs, "mp_policy": dataclasses.replace(mp, param_dtype=None)}


def fully_shard(model: nn.Module, *, units: Iterable | None = None, **fsdp_kwargs) -> nn.Module:
    """Apply FSDP2 to ``model`` (a process group must be initialized): each 4-bit ``LoRALinear`` as a unit of
    its own (its 4-bit storage sharded in whole quantization blocks, see the module docstring), then each
    decoder layer (``units``: classes or class names; default the model's ``_no_split_modules``), then the
    whole model. ``fsdp_kwargs`` go to ``torch.distributed.fsdp.fully_shard`` (mesh, reshard_after_forward,
    mp_policy, offload_policy, ...); the 4-bit units drop ``mp_policy.param_dtype``.

    Build the optimizer after this call (the parameters are replaced by sharded ones). State-dict keys are
    those of the unsharded model. Returns ``model``."""
    from torch.distributed.fsdp import fully_shard as fsdp_fully_shard

    four_bit = quantized_layers(model)
    for layer in four_bit:
        hold_as_parameters(layer)
    unit_kwargs = _unit_kwargs(fsdp_kwargs)
    for layer in four_bit:
        fsdp_fully_shard(layer, **unit_kwargs)
    for unit in decoder_layers(model, units):
        fsdp_fully_shard(unit, **fsdp_kwargs)
    if model not in four_bit:
        fsdp_fully_shard(model, **fsdp_kwargs)
    return model
