"""Adapters on disk in PEFT's format, both ways: what PEFT saves loads here, what is saved here loads in PEFT.

    <dir>/adapter_config.json        PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha, lora_dropout,
                                     target_modules, use_rslora, use_dora, rank_pattern, alpha_pattern,
                                     task_type, base_model_name_or_path, ...)
    <dir>/adapter_model.safetensors  base_model.model.<module name>.lora_A.weight  [r, K]
                                     base_model.model.<module name>.lora_B.weight  [N, r]
                                     base_model.model.<module name>.lora_magnitude_vector  [N]  (DoRA only)

Both files are written to a temporary name in the target folder and renamed into place (the config last),
so a reader never sees half a file. Only JSON and safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .inject import (
    CONFIG_ATTR,
    PatternMatcher,
    find_saved_modules,
    find_targets,
    freeze_all_but_adapters,
    inject,
    layer_settings,
    lora_layers,
    record_adapter_config,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# Config fields with no fused equivalent: loading an adapter that sets them would change its function.
_UNSUPPORTED = {
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None, []),
    "target_parameters": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
}


def adapter_keys(name: str) -> tuple[str, str]:
    """PEFT's safetensors keys of the A and B of module ``name``."""
    return f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"


def magnitude_key(name: str) -> str:
    """PEFT's safetensors key of the DoRA magnitude m [N] of module ``name`` (no ``.weight`` suffix)."""
    return f"{KEY_PREFIX}{name}.lora_magnitude_vector"


def saved_module_tensors(model: nn.Module, modules_to_save) -> dict[str, torch.Tensor]:
    """PEFT's safetensors keys of the modules ``modules_to_save`` names, with the model's tensors."""
    return {f"{KEY_PREFIX}{name}.{key}": t for name in find_saved_modules(model, modules_to_save, strict=False)
            for key, t in model.get_submodule(name).state_dict().items()}


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _settings_hold(stored: dict, model: nn.Module, layers: dict) -> bool:
    """Whether the settings inject()/from_peft recorded still describe the model's adapters exactly."""
    try:
        chosen = find_targets(model, stored["target_modules"], stored.get("exclude_modules"))
    except (ValueError, TypeError):
        return False
    if set(chosen) != set(layers):
        return False
    for name, layer in layers.items():
        r, alpha = layer_settings(name, stored["r"], stored["lora_alpha"], stored["rank_pattern"],
                                  stored["alpha_pattern"])
        if (r, alpha) != (layer.r, layer.alpha) or layer.dropout != stored["lora_dropout"]:
            return False
        if layer.use_rslora != stored["use_rslora"]:
            return False
    return True


def adapter_config(model: nn.Module) -> dict:
    """The adapter_config.json that describes ``model``'s adapters (PEFT's field names)."""
    layers = {n: m for n, m in lora_layers(model).items() if m.r}
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear layer with an adapter (inject first)")
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("save_adapter: layers mix use_rslora True and False; PEFT's config has one flag")
    dora = {m.dora for m in layers.values()}
    if len(dora) > 1:
        kinds = {flag: sorted(n for n, m in layers.items() if m.dora == flag) for flag in (True, False)}
        raise ValueError(f"save_adapter: layers mix DoRA ({', '.join(kinds[True])}) and plain LoRA adapters "
                         f"({', '.join(kinds[False])}); PEFT's config has one use_dora flag for all of them")
    stored = getattr(model, CONFIG_ATTR, None) or {}
    if stored and _settings_hold(stored, model, layers):
        target, exclude = stored["target_modules"], stored.get("exclude_modules")
        r, alpha, dropout = stored["r"], stored["lora_alpha"], stored["lora_dropout"]
        rank_pattern, alpha_pattern = dict(stored["rank_pattern"]), dict(stored["alpha_pattern"])
        if isinstance(target, str) and target.lower() == "all-linear":
            target = sorted(layers)  # what PEFT itself writes for "all-linear"
    else:
        # Described from the layers themselves: full names, the most common r / alpha, exact-name patterns.
        dropouts = {m.dropout for m in layers.values()}
        if len(dropouts) > 1:
            raise ValueError(f"save_adapter: layers use different dropouts {sorted(dropouts)}; PEFT's config has one")
        target, exclude, dropout = sorted(layers), None, dropouts.pop()
        r = _most_common(m.r for m in layers.values())
        alpha = _most_common(m.alpha for m in layers.values())
        rank_pattern = {re.escape(n): m.r for n, m in layers.items() if m.r != r}
        alpha_pattern = {re.escape(n): m.alpha for n, m in layers.items() if m.alpha != alpha}
    name_or_path = stored.get("base_model_name_or_path")
    if name_or_path is None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": stored.get("task_type"),
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target,
        "exclude_modules": exclude,
        "use_rslora": rslora.pop(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": dora.pop(),
        "lora_bias": False,
        "modules_to_save": stored.get("modules_to_save"),
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_adapter(model: nn.Module, out_dir, task_type: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapters to ``out_dir`` in PEFT's format; returns the folder."""
    layers = {n: m for n, m in lora_layers(model).items() if m.r}
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"save_adapter: adapters merged into their bases cannot be saved: {', '.join(merged)}")
    config = adapter_config(model)
    if task_type is not None:
        config["task_type"] = task_type
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    tensors = {}
    for name, layer in layers.items():
        key_a, key_b = adapter_keys(name)
        tensors[key_a] = layer.lora_A.detach().to("cpu", copy=True).contiguous()
        tensors[key_b] = layer.lora_B.detach().to("cpu", copy=True).contiguous()
        if layer.dora:
            tensors[magnitude_key(name)] = layer.lora_magnitude_vector.weight.detach().to("cpu", copy=True)
    for key, t in saved_module_tensors(model, config["modules_to_save"]).items():
        tensors[key] = t.detach().to("cpu", copy=True).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(text))
    return out


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _names(v, allow_none: bool) -> bool:
    """A regex string, or a list of non-empty name strings (or None where allowed)."""
    if v is None:
        return allow_none
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) and t for t in v))


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json of ``adapter_dir``, checked for what a fused LoRA can represent and for the types
    and ranges of every field it uses (it may come from anywhere: nothing is allocated from it before)."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapter: {path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"load_adapter: {path}: the field {key!r} is missing")

    def refuse(key: str, expected: str, value):
        shown = key if "[" in key else repr(key)  # rank_pattern['q_proj'] as it is
        raise ValueError(f"load_adapter: {path}: {shown} must be {expected}, got {value!r}")

    if not _positive_int(config["r"]):
        refuse("r", "a positive int", config["r"])
    if not _positive_finite(config["lora_alpha"]):
        refuse("lora_alpha", "a finite number > 0", config["lora_alpha"])
    dropout = config.get("lora_dropout")
    if dropout is not None and not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
                                    and 0.0 <= dropout < 1.0):
        refuse("lora_dropout", "a number in [0, 1)", dropout)
    for key in ("use_rslora", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            refuse(key, "true or false", config[key])
    if not _names(config["target_modules"], allow_none=False):
        refuse("target_modules", "a regular expression or a list of module names", config["target_modules"])
    if not _names(config.get("exclude_modules"), allow_none=True):
        refuse("exclude_modules", "null, a regular expression or a list of module names", config["exclude_modules"])
    for key, neutral in _UNSUPPORTED.items():
        value = config.get(key, neutral[0])
        if not any(type(value) is type(n) and value == n for n in neutral):  # 0 is not False here
            raise ValueError(f"load_adapter: {path}: {key}={config[key]!r} is not supported by fused layers")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(t, str) and t for t in saved)):
        refuse("modules_to_save", "null or a list of module names", saved)
    if config.get("bias", "none") != "none":
        raise ValueError(f"load_adapter: {path}: bias={config['bias']!r} is not supported (only 'none')")
    for key, valid, expected in (("rank_pattern", _positive_int, "a positive int"),
                                 ("alpha_pattern", _positive_finite, "a finite number > 0")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            refuse(key, "an object", config[key])
        for k, v in pattern.items():
            if not valid(v):
                refuse(f"{key}[{k!r}]", expected, v)
    return config


def _check_against_file(model: nn.Module, config: dict, tensors: dict, weights_path: Path,
                        saved: dict) -> dict[str, tuple]:
    """{layer name: (r, alpha)} of every layer the config targets, after checking, before anything is
    allocated, that the file holds exactly their A [r, K] and B [N, r] (floating point), with use_dora
    their magnitudes m [N] (floating point, finite), the tensors of the modules to save (``saved``: key ->
    the model's tensor, same shape) and nothing else."""
    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    names = find_targets(model, config["target_modules"], config.get("exclude_modules"))
    matcher = PatternMatcher()
    settings, used = {}, set()
    for name in names:
        module = model.get_submodule(name)
        r_i, alpha_i = layer_settings(name, r, alpha, rank_pattern, alpha_pattern, matcher)
        settings[name] = (r_i, alpha_i)
        want = ((r_i, module.in_features), (module.out_features, r_i))
        for key, shape in zip(adapter_keys(name), want, strict=True):
            if key not in tensors:
                raise KeyError(f"load_adapter: {weights_path} has no tensor {key!r} (needed by layer {name})")
            t = tensors[key]
            if tuple(t.shape) != shape or not t.is_floating_point():
                raise ValueError(
                    f"load_adapter: {weights_path}: {key!r} is {t.dtype} of shape {tuple(t.shape)}, expected a "
                    f"floating-point tensor of shape {shape} (r={r_i} from {CONFIG_NAME}, layer {name} is "
                    f"[{module.out_features}, {module.in_features}])"
                )
            used.add(key)
        if config.get("use_dora", False):
            used.add(_check_magnitude(tensors, name, module.out_features, weights_path))
    for key, current in saved.items():
        t = tensors.get(key)
        if t is None:
            raise KeyError(f"load_adapter: {weights_path} has no tensor {key!r} (modules_to_save)")
        if tuple(t.shape) != tuple(current.shape) or t.is_floating_point() != current.is_floating_point():
            raise ValueError(f"load_adapter: {weights_path}: {key!r} is {t.dtype} of shape {tuple(t.shape)}, the "
                             f"model's is {current.dtype} of shape {tuple(current.shape)} (modules_to_save)")
        used.add(key)
    unused = sorted(set(tensors) - used)
    stray = [k for k in unused if k.endswith(".lora_magnitude_vector")]
    if stray and not config.get("use_dora", False):
        raise ValueError(f"load_adapter: {weights_path} holds DoRA magnitudes ({stray[:4]}"
                         f"{' ...' if len(stray) > 4 else ''}) but {CONFIG_NAME} does not set use_dora")
    if unused:
        raise ValueError(f"load_adapter: {weights_path} has tensors no layer takes: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    return settings


def _check_magnitude(tensors: dict, name: str, n: int, weights_path: Path) -> str:
    """The key of layer ``name``'s DoRA magnitude, checked: present, floating point [N], finite."""
    key = magnitude_key(name)
    if key not in tensors:
        raise KeyError(f"load_adapter: {weights_path} has no tensor {key!r} (the DoRA magnitude of layer {name}; "
                       f"{CONFIG_NAME} sets use_dora)")
    t = tensors[key]
    if tuple(t.shape) != (n,) or not t.is_floating_point():
        raise ValueError(f"load_adapter: {weights_path}: {key!r} is {t.dtype} of shape {tuple(t.shape)}, expected "
                         f"a floating-point tensor of shape ({n},) (the DoRA magnitude of layer {name}, which has "
                         f"{n} outputs)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"load_adapter: {weights_path}: {key!r} (the DoRA magnitude of layer {name}) holds "
                         f"{int((~torch.isfinite(t)).sum())} non-finite values")
    return key


def _read_tensors(adapter_dir) -> tuple[Path, dict[str, torch.Tensor]]:
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        other = [p.name for p in Path(adapter_dir).glob("adapter_model.*")]
        hint = f" (found {other}; only safetensors is read)" if other else ""
        raise FileNotFoundError(f"load_adapter: {path} does not exist{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return path, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"load_adapter: {path} is not a readable safetensors file ({exc})") from exc


def _trained_on(config: dict, model: nn.Module) -> str:
    """A sentence naming the base model the adapter was trained on, when the config names one that is not
    this model's (or '' when it names none)."""
    trained = config.get("base_model_name_or_path")
    ours = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if not isinstance(trained, str) or not trained or trained == ours:
        return ""
    return f"; this adapter was trained on base model {trained!r}" + (f", this model is {ours!r}" if ours else "")


_LAYER_STATE = ("r", "alpha", "use_rslora", "scaling", "dropout", "lora_A", "lora_B", "lora_magnitude_vector")


def _adapter_tensors(layer) -> tuple[torch.Tensor, ...]:
    """A, B and, for DoRA, the magnitude's Parameter of ``layer`` (the objects, not copies)."""
    if layer.lora_A is None:
        return ()
    mag = layer.lora_magnitude_vector
    return (layer.lora_A, layer.lora_B) + (() if mag is None else (mag.weight,))


def _snapshot(model: nn.Module):
    """What ``load_adapter`` may change in ``model``; ``_restore`` puts it back (the module and Parameter
    objects, and their values)."""
    layers = {n: ({k: getattr(m, k) for k in _LAYER_STATE}, [t.detach().clone() for t in _adapter_tensors(m)])
              for n, m in lora_layers(model).items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return dict(model.named_modules(remove_duplicate=False)), getattr(model, CONFIG_ATTR, None), layers, grads


@torch.no_grad()
def _restore(model: nn.Module, snapshot) -> None:
    from .inject import set_submodule

    modules, config, layers, grads = snapshot
    now = dict(model.named_modules(remove_duplicate=False))
    for name, module in modules.items():
        if name and now.get(name) is not module:
            set_submodule(model, name, module)
    record_adapter_config(model, config)
    current = lora_layers(model)
    for name, (state, values) in layers.items():
        for key, value in state.items():
            setattr(current[name], key, value)
        for param, value in zip(_adapter_tensors(current[name]), values, strict=True):
            param.copy_(value)
    for name, p in model.named_parameters():
        if name in grads:
            p.requires_grad_(grads[name])


def load_adapter(model: nn.Module, adapter_dir, quantize=None) -> nn.Module:
    """Load a PEFT LoRA adapter into ``model``, in place; returns ``model``.

    A model without adapters first gets LoRALinear layers where the config's target_modules say
    (``fusedlora.inject`` with its r, lora_alpha, lora_dropout, use_rslora, use_dora, rank_pattern,
    alpha_pattern, and ``quantize``: None keeps dense bases dense, "nf4" / "int4" or a mapping of
    ``fusedlora.quantize`` arguments quantizes them, e.g. to run a QLoRA adapter over a 4-bit base); an
    injected model must have exactly those layers with those ranks, and takes the config's alpha, rsLoRA,
    dropout and DoRA (a layer gains or loses its magnitude vector; A and B stay the same Parameters, as
    does a magnitude that stays). Every key of the file must be used and every layer must find its keys.
    All or nothing: on an error the model is left as it was (modules, adapters, DoRA magnitudes, settings),
    and an adapter that does not fit says which base model it was trained on.
    """
    config = read_adapter_config(adapter_dir)
    weights_path, tensors = _read_tensors(adapter_dir)
    snapshot = _snapshot(model)
    try:
        return _load_adapter(model, config, weights_path, tensors, quantize)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        _restore(model, snapshot)
        hint = _trained_on(config, model)
        if hint and hint not in str(exc):
            raise type(exc)(f"{exc.args[0] if exc.args else exc}{hint}") from exc
        raise


def _load_adapter(model, config, weights_path, tensors, quantize) -> nn.Module:
    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    dropout, rslora = float(config.get("lora_dropout") or 0.0), config.get("use_rslora", False)
    use_dora = config.get("use_dora", False)
    targets, exclude = config["target_modules"], config.get("exclude_modules")
    to_save = config.get("modules_to_save")
    layers = {n: m for n, m in lora_layers(model).items() if m.r}
    saved = saved_module_tensors(model, to_save)
    settings = _check_against_file(model, config, tensors, weights_path, saved)
    if layers:
        if set(settings) != set(layers):
            extra, missing = sorted(set(layers) - set(settings)), sorted(set(settings) - set(layers))
            raise ValueError(
                f"load_adapter: the model's adapter layers differ from those {CONFIG_NAME} targets "
                f"(adapters the config does not name: {extra}; named layers without an adapter: {missing})"
            )
        for name, layer in layers.items():
            if layer.r != settings[name][0]:
                raise ValueError(f"load_adapter: layer {name} has r={layer.r}, {CONFIG_NAME} gives "
                                 f"r={settings[name][0]}")
        for name, layer in layers.items():
            layer.set_scaling(settings[name][1], rslora)
            layer.dropout = dropout
            if layer.dora != use_dora:
                a = layer.lora_A
                mag = torch.empty(layer.out_features, dtype=a.dtype, device=a.device) if use_dora else None
                layer.adopt_adapter(a, layer.lora_B, layer.alpha, dropout, layer.use_rslora, magnitude=mag)
    else:
        inject(model, targets, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora, quantize=quantize,
               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, exclude_modules=exclude, use_dora=use_dora)
        layers = {n: m for n, m in lora_layers(model).items() if m.r}
    freeze_all_but_adapters(model, to_save)
    saved = saved_module_tensors(model, to_save)  # again: refused if a saved module now holds LoRA layers
    with torch.no_grad():
        for name, layer in layers.items():
            keys = adapter_keys(name) + ((magnitude_key(name),) if use_dora else ())
            for key, param in zip(keys, _adapter_tensors(layer), strict=True):
                param.copy_(tensors[key])
        for key, current in saved.items():
            current.copy_(tensors[key])
    record_adapter_config(model, {
        "target_modules": targets, "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
        "use_dora": use_dora, "rank_pattern": dict(rank_pattern), "alpha_pattern": dict(alpha_pattern),
        "exclude_modules": exclude,
        "base_model_name_or_path": config.get("base_model_name_or_path"), "task_type": config.get("task_type"),
        "modules_to_save": to_save,
    })
    return model
