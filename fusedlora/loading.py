"""Load a transformers checkpoint saved with a bitsandbytes 4-bit quantization_config, without bitsandbytes.

transformers writes such a checkpoint as safetensors in which each 4-bit linear ``p`` has bitsandbytes'
keys (``p.weight`` packed uint8, ``p.weight.absmax``, ``p.weight.quant_map``, the nested double-quant
state, ``p.weight.quant_state.bitsandbytes__nf4``), and every other tensor as usual. Here the model is
built from its config with parameters on the meta device (buffers, such as rotary frequencies, are
computed as usual), each 4-bit linear becomes a ``LoRALinear`` without an adapter holding those 4-bit
tensors as they are, and the remaining tensors are assigned from the files.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .inject import set_submodule
from .modules import LoRALinear
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


def load_quantized(hf_dir, dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers model saved in ``hf_dir`` with a bitsandbytes 4-bit (NF4) quantization_config,
    its 4-bit linears as ``LoRALinear`` layers (no adapter yet: ``fusedlora.inject`` or
    ``fusedlora.load_adapter`` adds one) holding the checkpoint's 4-bit tensors unchanged. Other tensors
    keep the dtype they have in the files; ``dtype`` (default: the config's) is the default dtype while
    the model is built. In eval mode, like ``from_pretrained``."""
    from transformers import AutoConfig

    root = Path(hf_dir)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"load_quantized: {root / 'config.json'} does not exist")
    config = AutoConfig.from_pretrained(str(root))
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not qc or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(
            f"load_quantized: {root / 'config.json'} has no bitsandbytes 4-bit quantization_config "
            f"(got {qc!r})"
        )
    tensors = _read_safetensors(root)
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

    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"load_quantized: tensors in {root} that the model does not have: {result.unexpected_keys}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"load_quantized: {root} has no tensors for {still_meta}")
    setattr(model, QUANT_CONFIG_ATTR, qc)
    with contextlib.suppress(AttributeError):
        delattr(model.config, "quantization_config")
    return model.eval()
