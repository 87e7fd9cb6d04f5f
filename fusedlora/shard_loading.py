"""Low-memory loading for FSDP2: ``load_sharded`` builds a model with a 4-bit base from a safetensors
checkpoint (dense, quantized as it loads, or a bitsandbytes 4-bit one, its bytes read as they are) so
that a process never holds more than its shard of the model plus one layer.

The model is built on the meta device (shapes only), fused layers are injected there (no weights, no random
draws), then it is materialized unit by unit in module order:

- each fused linear: its weight (and bias) read alone from the safetensors file, quantized, wrapped in a
  ``LoRALinear`` with a fresh adapter, and sharded at once with FSDP2 (``fully_shard``'s per-layer unit,
  whole quantization blocks per shard); the whole weight and its whole 4-bit form are dropped there, so
  at most one linear is held whole;
- then the rest of each decoder layer (norms), read and sharded as that layer's unit;
- then the input embeddings and the output head (dense linears outside the decoder layers), each a unit of
  its own (``fully_shard`` leaves them to the root unit: here a large vocabulary is not held whole twice);
  tied ones are one tensor, read once as the embedding's and shared with the head: both stay in the root
  unit, as ``fully_shard`` leaves them (FSDP2 shards a parameter in one unit only);
- then the rest of the model (final norm, rotary tables), the root unit.

The adapters are drawn in the order ``fusedlora.inject`` draws them (one ``lora_A`` per fused linear, in
module order, on ``device``), so after ``torch.manual_seed(s)`` the model equals ``from_pretrained`` +
``inject(..., quantize=...)`` + ``fully_shard`` under the same seed. Each tensor is read through its own
short-lived ``safe_open``, so the file's mapped pages are released after each read.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .inject import CONFIG_ATTR, inject, record_adapter_config, set_submodule
from .loading import QUANT_STATE_SUFFIX
from .modules import LoRALinear, quantize_weight
from .quantized import QuantizedWeight
from .sharding import _unit_kwargs, decoder_layers, hold_as_parameters

__all__ = ["has_safetensors", "load_sharded", "weight_files"]


def has_safetensors(path: str) -> bool:
    """Whether ``path`` holds its weights as ``model.safetensors`` or an index of safetensors files."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def weight_files(path: str) -> dict[str, str]:
    """Tensor name → the safetensors file holding it, from ``model.safetensors`` or its index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path}: no model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _read(files: dict[str, str], key: str, device, dtype=None) -> torch.Tensor:
    from safetensors import safe_open

    if key not in files:
        raise KeyError(f"the checkpoint has no tensor {key}")
    with safe_open(files[key], "pt") as f:
        t = f.get_tensor(key)
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def _materialize_rest(module: nn.Module, prefix: str, files, device, config) -> None:
    """Gives the meta tensors of ``module`` outside its fused linears real values: parameters and persistent
    buffers from the checkpoint, other buffers (rotary tables) from a fresh instance of their module."""
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, LoRALinear):
            continue
        for pname, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                t = _read(files, f"{name}.{pname}" if name else pname, device, p.dtype)
                sub._parameters[pname] = nn.Parameter(t, requires_grad=p.requires_grad)
        meta = [b for b, t in sub._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        fresh = None
        for b in meta:
            key = f"{name}.{b}" if name else b
            if b not in sub._non_persistent_buffers_set and key in files:
                sub._buffers[b] = _read(files, key, device, sub._buffers[b].dtype)
                continue
            if fresh is None:
                with torch.device(device):
                    fresh = type(sub)(config=config)
            sub._buffers[b] = fresh._buffers[b].to(sub._buffers[b].dtype)
        for attr, value in vars(fresh or sub).items():  # e.g. a rotary module's original_inv_freq
            if isinstance(value, torch.Tensor) and getattr(sub, attr, None) is not None and getattr(sub, attr).is_meta:
                setattr(sub, attr, value)


def _build_linear(meta_layer: nn.Module, name: str, files, device, dtype, quantize, init,
                  use_dora: bool = False) -> LoRALinear:
    """The fused layer at ``name``: a bitsandbytes 4-bit weight's tensors read as they are (no requantization,
    as ``fusedlora.load_quantized`` keeps them), a dense weight read and quantized; then its adapter."""
    bias = _read(files, f"{name}.bias", device, dtype) if meta_layer.bias is not None else None
    if f"{name}{QUANT_STATE_SUFFIX}nf4" in files:
        keys = [k for k in files if k == f"{name}.weight" or k.startswith(f"{name}.weight.")]
        qw = QuantizedWeight.from_bnb_state_dict({k: _read(files, k, device) for k in keys}, name)
        layer = LoRALinear(qw, bias, r=0).to(device=device, dtype=dtype)  # the compute dtype, as .to() sets it
    else:
        weight = _read(files, f"{name}.weight", device, dtype)  # kept dense when quantize is None
        layer = LoRALinear(weight if quantize is None else quantize_weight(weight, quantize), bias, r=0)
        del weight
    if isinstance(meta_layer, LoRALinear):
        layer.reset_adapter(meta_layer.r, meta_layer.alpha, meta_layer.dropout, meta_layer.use_rslora, init,
                            meta_layer.lora_A.dtype, device, use_dora)
    return layer


def load_sharded(path: str, *, quantize, dtype: torch.dtype = torch.float32, device=None, units=None,
                 fsdp_kwargs: dict | None = None, **inject_kwargs) -> nn.Module:
    """A transformers causal LM from the safetensors checkpoint in ``path``, its targeted linears quantized
    (``quantize``: "nf4", "int4" or a mapping of ``fusedlora.quantize`` arguments; None keeps dense ones dense)
    or, in a bitsandbytes 4-bit checkpoint, their NF4 tensors read as they are, and given adapters
    (``inject_kwargs``: those of ``fusedlora.inject``), sharded with FSDP2 as ``fusedlora.fully_shard``
    shards it (``units``, ``fsdp_kwargs`` likewise), materialized layer by layer
    (see the module docstring). A process group must be initialized. Build the optimizer afterwards."""
    from torch.distributed.fsdp import fully_shard as fsdp_fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device or "cpu")
    fsdp_kwargs = dict(fsdp_kwargs or {})
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:  # a bitsandbytes 4-bit checkpoint: its 4-bit layers are read as they are
        from .loading import QUANT_CONFIG_ATTR

        qc = qc if isinstance(qc, dict) else qc.to_dict()
        if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
            raise ValueError(f"load_sharded: {path} has a quantization_config that is not bitsandbytes 4-bit")
        del config.quantization_config
    elif quantize is None:
        raise ValueError("load_sharded: quantize is required (a dense base loads with from_pretrained + "
                         "fully_shard as it is)")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # structure only: meta tensors, no random draws; DoRA's magnitudes (norms of the real weights, no draws
    # either) are made when each layer is built
    use_dora = bool(inject_kwargs.pop("use_dora", False))
    inject(model, quantize=None, **inject_kwargs)
    if use_dora:
        record_adapter_config(model, {**getattr(model, CONFIG_ATTR), "use_dora": True})
    init = inject_kwargs.get("init_lora_weights", True)
    files = weight_files(path)
    names = {m: n for n, m in model.named_modules()}
    unit_kwargs = _unit_kwargs(fsdp_kwargs)

    def pending(m: nn.Module) -> bool:  # a fused linear, or a 4-bit one without an adapter, not yet built
        if isinstance(m, LoRALinear):
            return m.lora_A is not None and m.lora_A.is_meta
        return isinstance(m, nn.Linear) and f"{names[m]}{QUANT_STATE_SUFFIX}nf4" in files

    def shard_linears(scope: nn.Module) -> None:
        for sub in [m for m in scope.modules() if pending(m)]:
            name = names[sub]
            layer = _build_linear(sub, name, files, device, dtype, quantize, init, use_dora)
            set_submodule(model, name, layer)
            if layer.quantized:  # a dense one is sharded with the unit around it, as fully_shard does
                hold_as_parameters(layer)
                fsdp_fully_shard(layer, **unit_kwargs)

    for unit in decoder_layers(model, units):
        shard_linears(unit)
        _materialize_rest(unit, names[unit], files, device, config)
        fsdp_fully_shard(unit, **fsdp_kwargs)
    shard_linears(model)
    head = model.get_output_embeddings()
    for name, sub in model.named_modules():  # embeddings, output head: a unit each, so one is whole at a time
        if type(sub) in (nn.Embedding, nn.Linear) and any(p.is_meta for p in sub.parameters(recurse=False)):
            if tied and sub is head:
                continue  # the embedding's tensor (a tied checkpoint has no head weight of its own)
            _materialize_rest(sub, name, files, device, config)
            if not tied:
                fsdp_fully_shard(sub, **fsdp_kwargs)
    if tied:
        model.tie_weights()
    _materialize_rest(model, "", files, device, config)
    fsdp_fully_shard(model, **fsdp_kwargs)
    if qc is not None:
        setattr(model, QUANT_CONFIG_ATTR, qc)
    return model
