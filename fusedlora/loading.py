"""Load a transformers checkpoint saved with a bitsandbytes 4-bit quantization_config, without bitsandbytes.

transformers writes such a checkpoint as safetensors in which each 4-bit linear ``p`` has bitsandbytes'
keys (``p.weight`` packed uint8, ``p.weight.absmax``, ``p.weight.quant_map``, the nested double-quant
state, ``p.weight.quant_state.bitsandbytes__nf4``), and every other tensor as usual. Here the model is
built from its config with parameters on the meta device (buffers, such as rotary frequencies, are
computed as usual), each 4-bit linear becomes a ``LoRALinear`` without an adapter holding those 4-bit
tensors as they are, and the remaining tensors are assigned from the files.

It also reloads what ``save_pretrained`` writes for a model that ``fusedlora.inject`` (or
``load_adapter`` / ``from_peft``) changed, dense or 4-bit base: each ``LoRALinear`` is saved under its own
keys (``p.weight`` or ``p.quant_data``, ``p.quant_meta``, ...; ``p.lora_A``, ``p.lora_B``) and the adapter
settings in config.json (``fusedlora_adapter``), from which each layer's alpha, rsLoRA and dropout follow.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .inject import HF_CONFIG_KEY, freeze_all_but_adapters, layer_settings, record_adapter_config, set_submodule
from .modules import LoRALinear, quantized_weight_from_state_dict
from .quantized import QuantizedWeight

QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__"
QUANT_CONFIG_ATTR = "fusedlora_quantization_config"


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside go to the meta device (no memory, no init); buffers stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _inside(root: Path, name, index: Path) -> str:
    """``name`` from the index, refused unless it names a file inside ``root``: a relative path without
    ``..`` (symbolic links inside the folder are followed, as in a Hugging Face cache snapshot)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"load_quantized: {index}: expected file names in weight_map, got {name!r}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts or not parts:
        raise ValueError(f"load_quantized: {index}: weight_map names {name!r}, outside the checkpoint folder "
                         f"{root}; only files inside it are read")
    return name


def _read_safetensors(root: Path) -> dict[str, torch.Tensor]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({_inside(root, name, index) for name in weight_map.values()})
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"load_quantized: {index} is not a valid index ({exc})") from exc
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"load_quantized: {root} has neither model.safetensors nor its index")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = root / name
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"load_quantized: {path} is not a readable safetensors file ({exc})") from exc
    return tensors


def _model_class(config):
    """The transformers model class that ``config.architectures`` names: only classes deriving from
    ``PreTrainedModel`` are taken (the list comes from the checkpoint's config.json)."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            continue
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise ValueError(f"load_quantized: config.architectures {names} names no transformers model class")


def _fused_prefixes(tensors) -> list[str]:
    """Module names that hold a LoRALinear's own keys (an adapter or a fusedlora 4-bit base)."""
    found = {key.rpartition(".")[0] for key in tensors if key.endswith((".lora_A", ".quant_meta"))}
    return sorted(found)


def _fused_layer(tensors: dict, prefix: str, module: nn.Module, settings) -> LoRALinear:
    """The LoRALinear saved under ``prefix`` (its keys taken out of ``tensors``)."""
    if not isinstance(module, nn.Linear):
        got = "nothing" if module is None else type(module).__name__
        raise ValueError(f"load_quantized: {prefix}: expected a linear layer, found {got}")
    shape = (module.out_features, module.in_features)
    if f"{prefix}.quant_meta" in tensors:
        weight = quantized_weight_from_state_dict(tensors, f"{prefix}.", shape)
    else:
        weight = tensors.get(f"{prefix}.weight")
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
            got = None if weight is None else tuple(weight.shape)
            raise ValueError(f"load_quantized: {prefix}.weight: expected shape {shape}, got {got}")
    bias = tensors.get(f"{prefix}.bias")
    if (bias is None) != (module.bias is None):
        raise ValueError(f"load_quantized: {prefix}.bias: present in the layer and the files disagree")
    layer = LoRALinear(weight, bias, r=0)
    lora_a, lora_b = tensors.get(f"{prefix}.lora_A"), tensors.get(f"{prefix}.lora_B")
    mag_key = f"{prefix}.lora_magnitude_vector.weight"  # DoRA's magnitude
    magnitude = tensors.pop(mag_key, None)
    if magnitude is not None and lora_a is None:
        raise ValueError(f"load_quantized: {mag_key}: a DoRA magnitude without lora_A / lora_B")
    if lora_a is not None or lora_b is not None:
        if settings is None:
            raise ValueError(f"load_quantized: {prefix}.lora_A: config.json has no {HF_CONFIG_KEY!r} entry, so the "
                             "adapter's alpha is unknown")
        if lora_a is None or lora_b is None:
            raise ValueError(f"load_quantized: {prefix}: lora_A and lora_B must both be present")
        _, alpha = layer_settings(prefix, settings["r"], settings["lora_alpha"], settings.get("rank_pattern"),
                                  settings.get("alpha_pattern"))
        if bool(settings.get("use_dora", False)) != (magnitude is not None):
            raise ValueError(f"load_quantized: {mag_key}: config.json's {HF_CONFIG_KEY!r} has use_dora="
                             f"{bool(settings.get('use_dora', False))}, the files "
                             f"{'have' if magnitude is not None else 'lack'} this key")
        try:
            layer.adopt_adapter(lora_a, lora_b, alpha, settings.get("lora_dropout", 0.0),
                                bool(settings.get("use_rslora", False)), magnitude=magnitude)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"load_quantized: {prefix}: {exc}") from exc
    for key in [k for k in tensors if k.rpartition(".")[0] == prefix]:
        del tensors[key]
    return layer


def load_quantized(hf_dir, dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers model saved in ``hf_dir`` with a bitsandbytes 4-bit (NF4) quantization_config,
    its 4-bit linears as ``LoRALinear`` layers (no adapter yet: ``fusedlora.inject`` or
    ``fusedlora.load_adapter`` adds one) holding the checkpoint's 4-bit tensors unchanged; or the
    ``save_pretrained`` of an injected model (dense or 4-bit base), rebuilt with its adapters, only the
    adapters trainable as after ``inject``. Other tensors keep the dtype they have in the files; ``dtype``
    (default: the config's) is the default dtype while the model is built. In eval mode, like
    ``from_pretrained``."""
    from transformers import AutoConfig

    root = Path(hf_dir)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"load_quantized: {root / 'config.json'} does not exist")
    config = AutoConfig.from_pretrained(str(root))
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    settings = getattr(config, HF_CONFIG_KEY, None)
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"load_quantized: {root / 'config.json'}: {HF_CONFIG_KEY} must be an object, "
                         f"got {type(settings).__name__}")
    bnb = bool(qc) and qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))
    if qc and not bnb:
        raise ValueError(f"load_quantized: {root / 'config.json'} has a quantization_config that is not "
                         f"bitsandbytes 4-bit (got {qc!r})")
    tensors = _read_safetensors(root)
    fused = _fused_prefixes(tensors)
    if not bnb and not fused:
        raise ValueError(
            f"load_quantized: {root / 'config.json'} has no bitsandbytes 4-bit quantization_config "
            f"(got {qc!r}) and the checkpoint is not a fusedlora-injected model"
        )
    prefixes = {}
    for key in tensors:
        if QUANT_STATE_SUFFIX in key:
            prefix, _, qtype = key.partition(QUANT_STATE_SUFFIX)
            if qtype != "nf4":
                raise ValueError(f"load_quantized: {key}: quant_type {qtype!r} is not supported (only nf4)")
            prefixes[prefix] = key

    cls = _model_class(config)
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _parameters_on_meta():
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    finally:
        torch.set_default_dtype(previous)

    modules = dict(model.named_modules())
    for prefix in sorted(prefixes):
        module = modules.get(prefix)
        if not isinstance(module, nn.Linear):
            got = "nothing" if module is None else type(module).__name__
            raise ValueError(f"load_quantized: {prefixes[prefix]}: expected a linear layer at {prefix!r}, found {got}")
        qw = QuantizedWeight.from_bnb_state_dict(tensors, prefix)
        if tuple(qw.shape) != (module.out_features, module.in_features):
            raise ValueError(
                f"load_quantized: {prefix}.weight: the 4-bit weight has shape {tuple(qw.shape)}, the model's "
                f"layer is ({module.out_features}, {module.in_features})"
            )
        bias = tensors.pop(f"{prefix}.bias", None)
        if (bias is None) != (module.bias is None):
            raise ValueError(f"load_quantized: {prefix}.bias: present in the layer and the files disagree")
        for key in [k for k in tensors if k == f"{prefix}.weight" or k.startswith(f"{prefix}.weight.")]:
            del tensors[key]
        set_submodule(model, prefix, LoRALinear(qw, bias, r=0))
    for prefix in fused:
        set_submodule(model, prefix, _fused_layer(tensors, prefix, modules.get(prefix), settings))

    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"load_quantized: tensors in {root} that the model does not have: {result.unexpected_keys}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"load_quantized: {root} has no tensors for {still_meta}")
    if fused:
        freeze_all_but_adapters(model, (settings or {}).get("modules_to_save"))
        if settings is not None:
            record_adapter_config(model, settings)
    if bnb:
        setattr(model, QUANT_CONFIG_ATTR, qc)
        with contextlib.suppress(AttributeError):
            delattr(model.config, "quantization_config")
    return model.eval()
