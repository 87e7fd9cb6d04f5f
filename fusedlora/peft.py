"""PEFT models to fused layers: every LoRA Linear of the active adapter becomes a LoRALinear.

The base may be an ``nn.Linear`` or a bitsandbytes 4-bit linear; a 4-bit base is carried over as it is
(its packed bytes and quant state become a ``QuantizedWeight``; nothing is requantized, and bitsandbytes is
not imported here). The adapter's A and B Parameters are moved over as the same objects, so an optimizer
built on the PEFT model keeps updating them.

A DoRA adapter becomes a DoRA LoRALinear, its ``lora_magnitude_vector`` weight moved over as the same
Parameter too.

What cannot be converted without changing the model's function is never changed silently: a LoRA variant
other than DoRA, a LoRA bias, a merged adapter, a LoRA layer over something other than a linear layer,
PEFT's trainable ``modules_to_save`` copies. With ``strict=True`` (default) such a model raises ValueError
naming the modules; with ``strict=False`` they stay in place, are reported by a warning, and their names
are in ``model.fusedlora_unconverted``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .inject import record_adapter_config, set_submodule
from .modules import LoRALinear, linear_base

logger = logging.getLogger("fusedlora")
UNCONVERTED_ATTR = "fusedlora_unconverted"


def _tuner_of(peft_model):
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(peft_model, BaseTuner):
        return peft_model
    tuner = getattr(peft_model, "base_model", None)
    if isinstance(tuner, BaseTuner):
        return tuner
    raise TypeError(f"peft_model: expected a peft PeftModel (or its LoraModel), got {type(peft_model).__name__}")


def _dropout_p(module: nn.Module) -> float:
    if isinstance(module, nn.Dropout):
        return float(module.p)
    if isinstance(module, nn.Identity):
        return 0.0
    raise ValueError(f"unsupported LoRA dropout module {type(module).__name__}")


def is_dora(layer, adapter: str) -> bool:
    """Whether ``adapter`` of the PEFT LoRA layer is PEFT's DoRA of a Linear layer (its DoRA variant and
    magnitude module), which ``fusedlora.dora_linear`` computes."""
    if not getattr(layer, "use_dora", {}).get(adapter, False):
        return False
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not _peft_class(variant, "DoraLinearVariant"):
        return False
    magnitude = getattr(layer, "lora_magnitude_vector", {})
    return (adapter in magnitude and _peft_class(magnitude[adapter], "DoraLinearLayer")
            and isinstance(getattr(magnitude[adapter], "weight", None), torch.Tensor))


def _peft_class(obj, name: str) -> bool:
    # the exact class: a subclass (DoRA of embeddings, another library's) may compute otherwise
    return type(obj).__name__ == name and type(obj).__module__.startswith("peft.")


def _why_not(layer, adapter: str) -> str | None:
    """None when the PEFT LoRA layer converts exactly, else the reason it does not."""
    if getattr(layer, "merged_adapters", None):
        return f"adapter(s) {layer.merged_adapters} are merged into its base (unmerge them first)"
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    plain = variant is None or _peft_class(variant, "MiCALinearVariant")  # MiCA: LoRA's forward, B frozen
    if (layer.use_dora.get(adapter, False) or not plain) and not is_dora(layer, adapter):
        what = type(variant).__name__ if variant is not None else "use_dora without PEFT's DoRA magnitude module"
        return f"it uses a LoRA variant other than DoRA ({what})"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "its lora_B has a bias (lora_bias=True)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (a Conv1D base)"
    if adapter not in layer.lora_A or not isinstance(layer.lora_A[adapter], nn.Linear):
        return f"it is a {type(layer).__name__} LoRA layer, not a Linear one"
    if not isinstance(layer.get_base_layer(), nn.Linear):
        return f"its base is a {type(layer.get_base_layer()).__name__}, not a linear layer"
    return None


def from_peft(peft_model, strict: bool = True) -> nn.Module:
    """The PEFT model's underlying base model (e.g. the transformers model) with each LoRA Linear of the
    active adapter replaced by an equal LoRALinear. The PEFT wrapper is consumed: its modules are changed
    in place and it should not be used afterwards. Other parameters keep their ``requires_grad``."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    tuner = _tuner_of(peft_model)
    active = list(tuner.active_adapters)
    if len(active) != 1:
        raise ValueError(f"from_peft: expected exactly one active adapter, got {active}")
    adapter = active[0]
    config = tuner.peft_config[adapter]
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"from_peft: expected a LoRA adapter, got peft_type {config.peft_type}")
    model = tuner.model

    problems: dict[str, str] = {}
    convert: list[tuple[str, nn.Module]] = []
    inactive: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            problems[name] = "a trainable modules_to_save copy (not a LoRA layer)"
        elif isinstance(module, BaseTunerLayer):
            if adapter not in getattr(module, "lora_A", {}) and adapter not in getattr(module, "lora_embedding_A", {}):
                if not getattr(module, "merged_adapters", None):
                    inactive.append((name, module))  # only inactive adapters: computes its base alone
                continue
            reason = _why_not(module, adapter) if hasattr(module, "use_dora") else "not a LoRA layer"
            if reason is None:
                convert.append((name, module))
            else:
                problems[name] = reason
    if problems and strict:
        lines = "; ".join(f"{n}: {why}" for n, why in problems.items())
        raise ValueError(f"from_peft: cannot convert without changing the model: {lines}")

    dropped = set()
    for name, layer in convert:
        dropped |= set(layer.lora_A) - {adapter}
        weight, bias = linear_base(layer.get_base_layer())
        new = LoRALinear(weight, bias, r=0)
        new.adopt_adapter(
            layer.lora_A[adapter].weight,
            layer.lora_B[adapter].weight,
            alpha=layer.lora_alpha[adapter],
            dropout=_dropout_p(layer.lora_dropout[adapter]),
            use_rslora=bool(layer.use_rslora.get(adapter, False)),
            magnitude=layer.lora_magnitude_vector[adapter].weight if is_dora(layer, adapter) else None,
        )
        new.scaling = float(layer.scaling[adapter])  # kept even if PEFT's scale was changed after creation
        new.train(layer.training)
        set_submodule(model, name, new)
    for name, layer in inactive:
        dropped |= set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))
        set_submodule(model, name, layer.get_base_layer())
    if dropped:
        logger.warning("from_peft: inactive adapters %s were dropped", sorted(dropped))
    if problems:
        logger.warning("from_peft: left in place, not converted: %s", problems)
    setattr(model, UNCONVERTED_ATTR, dict(problems))
    target = config.target_modules
    record_adapter_config(model, {
        "target_modules": target if isinstance(target, str) else sorted(target or []),
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "use_rslora": bool(config.use_rslora), "use_dora": bool(getattr(config, "use_dora", False)),
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}), "exclude_modules": config.exclude_modules,
        "base_model_name_or_path": config.base_model_name_or_path,
        "task_type": str(getattr(config.task_type, "value", config.task_type)) if config.task_type else None,
    })
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
