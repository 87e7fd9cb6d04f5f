"""A PEFT model kept as it is, its LoRA Linear layers running the fused op: ``fusedlora.accelerate``.

``accelerate(peft_model)`` changes one thing: the ``forward`` of each PEFT LoRA layer whose base is a
dense ``nn.Linear`` or a bitsandbytes NF4 ``Linear4bit`` becomes a function that calls
``fusedlora.lora_linear`` on PEFT's own tensors — the base weight (a 4-bit one read through
``QuantizedWeight.from_bnb``, its bytes shared, never copied or requantized), the active adapter's
``lora_A`` / ``lora_B`` weights, its ``scaling`` and its dropout probability. A DoRA adapter runs
``fusedlora.dora_linear`` on the same tensors and its ``lora_magnitude_vector`` weight, keeping what our own
DoRA layer keeps (``fusedlora.dora.DoRAKept``): ‖W_n‖² of the base, the norm of the current adapter, and
g's fold for calls without gradients, each again when a tensor it came from or the compute dtype changes.
Modules, parameters, their names, the state dict, ``save_pretrained`` / ``from_pretrained``,
``set_adapter``, ``disable_adapter()``, ``merge_and_unload()`` and ``modules_to_save`` are PEFT's, untouched.

The choice is made again at every call, from the layer's state then: whenever PEFT's forward would do
something the fused op does not (adapters disabled or merged, several adapters active at once, a LoRA
variant other than DoRA, ``lora_bias``, ``adapter_names`` for mixed batches, a forward hook on the base,
a 4-bit state bitsandbytes has repacked for its CPU kernel, mismatched dtypes), the layer runs PEFT's own
forward for that call. Layers whose base the op cannot read (FP4 or 8-bit bitsandbytes, Conv1D with
``fan_in_fan_out``, embeddings, convolutions, an offloading hook) are not touched. Each layer that keeps
PEFT's forward is logged once with its reason (logger "fusedlora"), and one summary line counts them.

``accelerate(peft_model, enable=False)`` restores PEFT's forward everywhere. Layers PEFT adds later (a new
adapter on new target modules) are picked up by calling ``accelerate`` again.

Numerics: the op computes in x's dtype with fp32 accumulation. PEFT casts x to the adapter's dtype (fp32
adapters over a 16-bit base) for the update; here A and B are cast to x's dtype instead (as
``LoRALinear`` does), which moves the update by the rounding of x's dtype. Under autocast every operand
is cast to the autocast dtype, as autocast casts ``F.linear``'s. DoRA's row norms ‖W + s·B·A‖ are taken
in fp32 from ‖W_n‖² (PEFT forms W + s·B·A and its norms in the adapter's dtype); with fp32 adapters over
an fp32 base the two differ by the order of fp32 additions only.

DoRA's dropout follows PEFT's DoRA forward: only while the layer is in training mode and its dropout is an
``nn.Dropout`` (then the base product sees x, the DoRA terms see drop(x)); in eval mode nothing is dropped,
whatever the dropout module's own mode.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import Counter

import torch
from torch import nn

from .dora import DoRAKept
from .functional import dora_linear, lora_linear
from .peft import _tuner_of, is_dora
from .quantized import QuantizedWeight

logger = logging.getLogger("fusedlora")

# Set on every layer whose forward this module replaced.
MARK = "_fusedlora_accelerated"
# Set on the PEFT model: {layer name: reason} of the LoRA layers that keep PEFT's forward.
NOT_ACCELERATED_ATTR = "fusedlora_not_accelerated"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Attribute of a bitsandbytes QuantState holding (data_ptr of its packed bytes, the QuantizedWeight over
# them): the view goes with the state (a moved or repacked weight gets a new state or a changed pointer).
_VIEW_ATTR = "_fusedlora_view"
# Attribute of a PEFT DoRA magnitude module holding what its layer keeps between calls (a DoRAKept).
_KEPT_ATTR = "_fusedlora_kept"


def _bnb_linear_classes():
    """(Linear4bit, Linear8bitLt) when bitsandbytes is imported (no bitsandbytes layer can exist otherwise)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None, None
    return getattr(bnb.nn, "Linear4bit", None), getattr(bnb.nn, "Linear8bitLt", None)


def _base_kind(layer) -> tuple[str | None, str | None]:
    """("dense" | "nf4", None) for a base the op reads, else (None, why not)."""
    if getattr(layer, "fan_in_fan_out", False):
        return None, "fan_in_fan_out=True (a Conv1D base)"
    lora_a = next(iter(getattr(layer, "lora_A", {}).values()), None)
    if lora_a is not None and not isinstance(lora_a, nn.Linear):
        return None, f"it is a {type(layer).__name__} LoRA layer, not a Linear one"
    base = layer.get_base_layer()
    if getattr(base, "_hf_hook", None) is not None or getattr(layer, "_hf_hook", None) is not None:
        return None, "an accelerate hook (device_map offloading) moves its weights"
    if type(base) is nn.Linear:
        return "dense", None
    linear4, linear8 = _bnb_linear_classes()
    if linear4 is not None and isinstance(base, linear4) and type(base).forward is linear4.forward:
        qtype = getattr(base.weight, "quant_type", None) or getattr(base.weight.quant_state, "quant_type", None)
        if qtype != "nf4":
            return None, f"its base is a bitsandbytes 4-bit layer with quant_type {qtype!r} (only NF4 is fused)"
        return "nf4", None
    if linear8 is not None and isinstance(base, linear8):
        return None, "its base is a bitsandbytes 8-bit layer (Linear8bitLt)"
    return None, f"its base is {type(base).__name__}, not nn.Linear or a bitsandbytes NF4 Linear4bit"


def _adapter(layer) -> tuple[str | None, str | None]:
    """(the one active adapter this layer has, None), (None, None) when none is active here (PEFT then
    computes the base alone), or (None, why PEFT's forward runs) for adapter settings the op lacks."""
    if layer.disable_adapters or layer.merged:
        return None, None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return None, None
    if len(active) > 1:
        return None, f"{len(active)} adapters are active at once ({', '.join(active)})"
    adapter = active[0]
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if (variant is not None or layer.use_dora.get(adapter, False)) and not is_dora(layer, adapter):
        what = type(variant).__name__ if variant is not None else "use_dora without PEFT's DoRA magnitude module"
        return None, f"adapter {adapter!r} is a LoRA variant other than DoRA ({what})"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return None, f"adapter {adapter!r} has lora_bias=True"
    drop = layer.lora_dropout[adapter]
    if not (type(drop) is nn.Identity or (type(drop) is nn.Dropout and 0.0 <= drop.p < 1.0)):
        return None, f"adapter {adapter!r} has a {type(drop).__name__} dropout module"
    if not isinstance(layer.scaling.get(adapter), (int, float)):
        return None, f"adapter {adapter!r} has a scaling that is not a number"
    return adapter, None


def _nf4_view(param) -> QuantizedWeight | None:
    """A QuantizedWeight over the Params4bit's own tensors (cached while they stay the same), or None when
    bitsandbytes holds no NF4 state the op can read (not quantized yet, or repacked for its CPU kernel)."""
    state = getattr(param, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    hit = getattr(state, _VIEW_ATTR, None)
    if torch.compiler.is_compiling():
        # a traced graph can neither compare data pointers nor build a view (its checks go through
        # bitsandbytes' JSON state): it takes the one built eagerly, by fl.accelerate or a forward
        if hit is None:
            raise RuntimeError(
                "fusedlora.accelerate: a 4-bit base has no view of its NF4 state to compile with (its "
                "weight was replaced or quantized after fl.accelerate); call fl.accelerate again, or run one "
                "forward without torch.compile, before compiling")
        return hit[1]
    if hit is not None and hit[0] == param.data_ptr():
        return hit[1]
    with torch.inference_mode(False):  # kept: normal tensors, which a later call with gradients may save
        view = QuantizedWeight.from_bnb(param)
    setattr(state, _VIEW_ATTR, (param.data_ptr(), view))
    return view


def _log_once(layer, reason: str) -> None:
    seen = layer.__dict__.setdefault("_fusedlora_logged", set())
    if reason not in seen:
        seen.add(reason)
        logger.warning("fusedlora.accelerate: %s runs PEFT's forward: %s", type(layer).__name__, reason)


def _fused_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward, computed by ``lora_linear`` when the layer's state allows it."""
    def peft_forward():
        return type(layer).forward(layer, x, *args, **kwargs)

    if args or any(v is not None for v in kwargs.values()):
        return peft_forward()  # adapter_names (mixed batches), variant or base-layer arguments
    adapter, reason = _adapter(layer)
    if adapter is None:
        if reason is not None:
            _log_once(layer, reason)
        return peft_forward()
    base = layer.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks:
        return peft_forward()  # hooks PEFT's call of the base would run
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    if layer.__dict__.get(MARK) == "nf4":
        weight = _nf4_view(base.weight)
        if weight is None:
            _log_once(layer, "bitsandbytes holds no NF4 state the op can read (not quantized yet, or repacked "
                             "in place for its CPU kernel by an eval-mode CPU forward)")
            return peft_forward()
    else:
        weight = base.weight
        if not autocast and weight.dtype != dtype:
            return peft_forward()  # PEFT's own handling (or error) of a dtype mismatch
        weight = weight if weight.dtype == dtype else weight.to(dtype)  # what autocast does for F.linear
    if dtype not in _FLOAT or not x.is_floating_point():
        return peft_forward()
    drop = layer.lora_dropout[adapter]
    p = drop.p if type(drop) is nn.Dropout else 0.0

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        x, lora_a, lora_b = cast(x), cast(layer.lora_A[adapter].weight), cast(layer.lora_B[adapter].weight)
        scale, bias = float(layer.scaling[adapter]), cast(base.bias)
        if is_dora(layer, adapter):
            magnitude = layer.lora_magnitude_vector[adapter]
            kept = _kept(magnitude)
            sq = _base_sq_norm(kept, base, weight, dtype)
            params = (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
            # PEFT's DoRA forward drops x only in training mode (both the layer's and the dropout's)
            return dora_linear(x, weight, lora_a, lora_b, scale, magnitude.weight, sq, bias, dropout_p=float(p),
                               training=layer.training and drop.training,
                               **kept.call_args(sq, params, weight, lora_a, lora_b, scale, magnitude.weight, dtype))
        return lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p=float(p), training=drop.training)


def _kept(magnitude: nn.Module) -> DoRAKept:
    """The DoRAKept held on PEFT's magnitude module (made at its layer's first call)."""
    kept = magnitude.__dict__.get(_KEPT_ATTR)
    if kept is None:
        kept = magnitude.__dict__[_KEPT_ATTR] = DoRAKept()
    return kept


def _base_sq_norm(kept: DoRAKept, base: nn.Module, weight, dtype: torch.dtype) -> torch.Tensor:
    """‖W_n‖² of the base as the op decodes it in ``dtype``, kept until the base's tensors change
    (``weight``: the dense weight, or the QuantizedWeight over the 4-bit one)."""
    cache = kept.sq
    if isinstance(weight, QuantizedWeight):
        p = weight.packed
        return cache.get([base.weight, p.data, p.absmax, p.nested_absmax, p.nested_code], dtype, lambda: p)
    # the norms of the weight as stored, rounded to ``dtype`` inside (what an autocast cast gives the op)
    return cache.get([base.weight], dtype, lambda: base.weight.detach())


def _lora_layers(tuner) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in tuner.model.named_modules() if isinstance(m, LoraLayer)}


def accelerate(peft_model, enable: bool = True):
    """Run the fused op under each supported LoRA layer of ``peft_model`` (a ``PeftModel`` or its
    ``LoraModel``), in place; returns ``peft_model``. ``enable=False`` restores PEFT's forward.

    The PEFT model stays what it is (see the module docstring); ``peft_model.fusedlora_not_accelerated``
    maps each LoRA layer that keeps PEFT's forward, now, to the reason.
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable: expected True or False, got {enable!r}")
    tuner = _tuner_of(peft_model)
    layers = _lora_layers(tuner)
    if not enable:
        restored = 0
        for layer in layers.values():
            if layer.__dict__.pop(MARK, None) is not None:
                layer.__dict__.pop("forward", None)
                layer.__dict__.pop("_fusedlora_logged", None)
                restored += 1
            for magnitude in getattr(layer, "lora_magnitude_vector", {}).values():
                magnitude.__dict__.pop(_KEPT_ATTR, None)
        if hasattr(peft_model, NOT_ACCELERATED_ATTR):
            delattr(peft_model, NOT_ACCELERATED_ATTR)
        logger.info("fusedlora.accelerate: PEFT's forward restored in %d LoRA layers", restored)
        return peft_model

    left: dict[str, str] = {}
    fused = dora = 0
    for name, layer in layers.items():
        kind, reason = _base_kind(layer)
        adapter = None
        if kind is not None:
            if MARK not in layer.__dict__ and "forward" in layer.__dict__:
                kind, reason = None, "its forward is already replaced by another library"
            else:
                layer.__dict__[MARK] = kind
                layer.forward = _fused_forward.__get__(layer)
                adapter, reason = _adapter(layer)
                if kind == "nf4":
                    _nf4_view(layer.get_base_layer().weight)  # built now, for a torch.compile to take
        if reason is None:
            fused += 1
            dora += adapter is not None and is_dora(layer, adapter)
            continue
        left[name] = reason
        logger.warning("fusedlora.accelerate: %s keeps PEFT's forward: %s", name, reason)
    why = Counter(left.values())
    detail = "; ".join(f"{count} because {reason}" for reason, count in why.most_common())
    summary = f"fusedlora.accelerate: {fused} of {len(layers)} LoRA layers run the fused op"
    if dora:
        summary += f" ({dora} of them DoRA)"
    if left:
        logger.warning("%s; %d keep PEFT's forward: %s", summary, len(left), detail)
    else:
        logger.info("%s", summary)
    setattr(peft_model, NOT_ACCELERATED_ATTR, left)
    return peft_model
