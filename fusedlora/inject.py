"""Model surgery: put LoRALinear layers into any torch model (PEFT's target words), and fold them back out.

``target_modules`` means what it means in PEFT:
- a list of names: a module is targeted when its full name equals one or ends with "." + one;
- a string: a regular expression that must match the full module name (``re.fullmatch``);
- "all-linear": every linear layer except the output head (``model.get_output_embeddings()`` where the
  model has it, else a top-level ``lm_head``).
``rank_pattern`` / ``alpha_pattern`` map a pattern to a rank / alpha: the first key ``k`` for which
``re.match(rf"(.*\\.)?({k})$", name)`` holds applies (PEFT's rule); other layers get ``r`` / ``alpha``.

Patterns may come from untrusted adapter configs, so they are matched by the ``regex`` package (``re``'s
syntax and semantics) under one time budget per call (``PATTERN_TIME_LIMIT_S``): a pattern that
backtracks without end is an error naming it, not a hang.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import time
from collections.abc import Iterable, Mapping

import regex
import torch
from torch import nn

from .modules import LoRALinear, linear_base, quantize_weight

logger = logging.getLogger("fusedlora")

ALL_LINEAR = "all-linear"
# Settings of the adapter inject() made, kept on the model for save_adapter (PEFT's config field names).
CONFIG_ATTR = "fusedlora_adapter_config"
# The same settings in a transformers model's config (config.json after save_pretrained): what
# fusedlora.load_quantized reads to rebuild the adapters' alpha, rsLoRA and dropout.
HF_CONFIG_KEY = "fusedlora_adapter"


def record_adapter_config(model: nn.Module, config: Mapping | None) -> None:
    """Keep ``config`` (the adapter settings, PEFT's field names) on ``model`` and, for a transformers
    model, in ``model.config`` so that ``save_pretrained`` writes it; None removes both."""
    hf_config = getattr(model, "config", None)
    has_hf = hf_config is not None and hasattr(hf_config, "to_json_string")
    if config is None:
        for holder, attr in ((model, CONFIG_ATTR), (hf_config, HF_CONFIG_KEY)):
            if holder is not None and hasattr(holder, attr):
                delattr(holder, attr)
        return
    setattr(model, CONFIG_ATTR, dict(config))
    if has_hf:
        setattr(hf_config, HF_CONFIG_KEY, dict(config))


# Seconds that all the pattern matching of one call (find_targets, layer_settings) may take together.
PATTERN_TIME_LIMIT_S = 2.0


class PatternMatcher:
    """Regular-expression matching with one time budget for every match it makes."""

    def __init__(self, limit_s: float | None = None):
        self.limit_s = PATTERN_TIME_LIMIT_S if limit_s is None else limit_s
        self.deadline = time.monotonic() + self.limit_s

    def _run(self, what: str, pattern: str, text: str, wrapped: str, full: bool) -> bool:
        if not isinstance(pattern, str):
            raise TypeError(f"{what}: expected a regular expression string, got {type(pattern).__name__}")
        try:
            rx = regex.compile(wrapped)
        except regex.error as exc:
            raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({exc})") from None
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            found = (rx.fullmatch if full else rx.match)(text, timeout=left)
        except TimeoutError:
            raise ValueError(
                f"{what}: matching {pattern!r} against the module names took more than {self.limit_s:g} s "
                "(a pattern that backtracks without end, such as nested repetition?)"
            ) from None
        return found is not None

    def fullmatch(self, what: str, pattern: str, name: str) -> bool:
        """``re.fullmatch(pattern, name)``: PEFT's rule for a target_modules / exclude_modules string."""
        return self._run(what, pattern, name, pattern, True)

    def suffix_match(self, what: str, pattern: str, name: str) -> bool:
        r"""``re.match(rf"(.*\.)?({pattern})$", name)``: PEFT's rule for rank_pattern / alpha_pattern keys."""
        return self._run(what, pattern, name, rf"(.*\.)?({pattern})$", False)


def pattern_key(patterns: Iterable[str], name: str, matcher: PatternMatcher | None = None,
                what: str = "rank_pattern") -> str | None:
    """The first pattern of ``rank_pattern`` / ``alpha_pattern`` that applies to module ``name``."""
    matcher = matcher or PatternMatcher()
    for key in patterns:
        if matcher.suffix_match(what, key, name):
            return key
    return None


def layer_settings(name: str, r: int, alpha: float, rank_pattern: Mapping | None, alpha_pattern: Mapping | None,
                   matcher: PatternMatcher | None = None):
    """(r, alpha) of the layer called ``name`` under PEFT's pattern rules (``matcher``: the time budget to
    share with other calls)."""
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    matcher = matcher or PatternMatcher()
    rk = pattern_key(rank_pattern, name, matcher, "rank_pattern")
    ak = pattern_key(alpha_pattern, name, matcher, "alpha_pattern")
    return (rank_pattern[rk] if rk is not None else r), (alpha_pattern[ak] if ak is not None else alpha)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoRALinear))


def _output_head_names(model: nn.Module) -> set[str]:
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
    if head is None:
        head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        return set()
    return {name for name, m in model.named_modules() if m is head}


def _close_matches(word: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names} | set(names))
    close = difflib.get_close_matches(word, leaves, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _excluded(name: str, exclude_modules, matcher: PatternMatcher) -> bool:
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return matcher.fullmatch("exclude_modules", exclude_modules, name)
    return any(name == e or name.endswith("." + e) for e in exclude_modules)


def find_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Names of the modules ``target_modules`` selects, in ``named_modules()`` order.

    Raises ValueError for a name in a list that matches no module (with close matches), a regex that
    matches nothing, or a selected module that is not a linear layer.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    names = [n for n in modules if n]
    matcher = PatternMatcher()
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = _output_head_names(model)
        chosen = [n for n in names if _is_linear(modules[n]) and n not in heads]
    elif isinstance(target_modules, str):
        chosen = [n for n in names if matcher.fullmatch("target_modules", target_modules, n)]
        if not chosen:
            raise ValueError(
                f"target_modules: the regular expression {target_modules!r} matches no module name "
                f"(it must match a full name such as {names[-1]!r})"
            )
    elif isinstance(target_modules, Iterable) and not isinstance(target_modules, (bytes, Mapping)):
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules: expected non-empty module names, got {target_modules!r}")
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            msgs = [f"{t!r}{_close_matches(t, names)}" for t in unknown]
            raise ValueError(f"target_modules: no module is named {'; no module is named '.join(msgs)}")
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    else:
        raise TypeError(
            f"target_modules: expected a list of names, a regex string or {ALL_LINEAR!r}, "
            f"got {type(target_modules).__name__}"
        )
    chosen = [n for n in chosen if not _excluded(n, exclude_modules, matcher)]
    bad = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not _is_linear(modules[n])]
    if bad:
        raise ValueError(f"target_modules: only linear layers can take a LoRA adapter, but it selects {', '.join(bad)}")
    if not chosen:
        raise ValueError(f"target_modules: {target_modules!r} selects no linear layer (after exclude_modules)")
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of ``model`` by module name."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRALinear)}


def find_saved_modules(model: nn.Module, modules_to_save, strict: bool = True) -> list[str]:
    """Names of the modules ``modules_to_save`` selects (PEFT's rule: a full name or a "."-suffix), each
    trained and saved whole beside the adapters (e.g. a classification head). ``strict``: a name that
    matches no module is an error (PEFT's configs list "classifier" and "score" for any model, so a loaded
    config is read with ``strict=False``)."""
    if not modules_to_save:
        return []
    wanted = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    if not all(isinstance(t, str) and t for t in wanted):
        raise ValueError(f"modules_to_save: expected module names, got {modules_to_save!r}")
    modules = dict(model.named_modules(remove_duplicate=False))
    names = [n for n in modules if n and any(n == t or n.endswith("." + t) for t in wanted)]
    unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if strict and unknown:
        raise ValueError(f"modules_to_save: no module is named {', '.join(map(repr, unknown))}")
    lora = [n for n in names if any(isinstance(m, LoRALinear) for m in modules[n].modules())]
    if lora:
        raise ValueError(f"modules_to_save: {', '.join(lora)} holds LoRA layers; a saved module is trained whole")
    return names


def freeze_all_but_adapters(model: nn.Module, modules_to_save=None) -> None:
    """Only the adapters (and the modules ``modules_to_save`` names, whole) stay trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in set(lora_layers(model).values()):
        if layer.r:
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
            if layer.dora:
                layer.lora_magnitude_vector.weight.requires_grad_(True)
    for name in find_saved_modules(model, modules_to_save, strict=False):
        model.get_submodule(name).requires_grad_(True)


def inject(
    model: nn.Module,
    target_modules="all-linear",
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    quantize=None,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    init_lora_weights: bool | str = True,
    exclude_modules=None,
    lora_dtype: torch.dtype | None = None,
    modules_to_save=None,
    use_dora: bool = False,
) -> nn.Module:
    """Replace the targeted linear layers of ``model`` by LoRALinear layers (in place) and freeze every
    other parameter; returns ``model``. Trainable / total parameter counts are logged (logger
    "fusedlora"; ``print_trainable_parameters`` prints them).

    ``quantize``: None keeps each base as it is; "nf4" / "int4" (or a mapping of ``fusedlora.quantize``
    arguments) quantizes dense bases. bitsandbytes 4-bit layers keep their 4-bit tensors as they are.
    ``modules_to_save``: names of other modules (e.g. a classification head) trained whole, kept
    trainable, and written by ``save_adapter`` beside the adapters (PEFT's field); they are trained in
    place (no copy), so ``disable_adapter`` does not turn them back.
    ``use_dora``: DoRA adapters (a trained magnitude per output row, PEFT's ``use_dora``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names = find_targets(model, target_modules, exclude_modules)
    saved = find_saved_modules(model, modules_to_save)
    overlap = [n for n in names if any(n == s or n.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"inject: modules_to_save covers target layers {', '.join(overlap)}")
    modules = dict(model.named_modules(remove_duplicate=False))
    already = [n for n in names if isinstance(modules[n], LoRALinear) and modules[n].r]
    if already:
        raise ValueError(f"inject: these layers already have an adapter: {', '.join(already)}")
    done: dict[int, LoRALinear] = {}  # a module reachable under two names stays one module
    matcher = PatternMatcher()
    for name in names:
        old = modules[name]
        r_i, alpha_i = layer_settings(name, r, alpha, rank_pattern, alpha_pattern, matcher)
        if isinstance(r_i, bool) or not isinstance(r_i, int) or r_i < 1:
            raise ValueError(f"inject: {name}: expected a rank r >= 1 (r or rank_pattern), got {r_i!r}")
        adapter = dict(r=r_i, alpha=alpha_i, dropout=dropout, use_rslora=use_rslora,
                       init_lora_weights=init_lora_weights, lora_dtype=lora_dtype, use_dora=use_dora)
        if id(old) in done:
            new = done[id(old)]
        elif isinstance(old, LoRALinear) and (old.quantized or quantize is None):
            old.reset_adapter(**adapter)
            new = old
        else:
            weight, bias = linear_base(old)
            if quantize is not None and isinstance(weight, torch.Tensor):
                try:
                    weight = quantize_weight(weight, quantize)
                except ValueError as exc:
                    raise ValueError(f"inject: quantizing {name}: {exc}") from exc
            new = LoRALinear(weight, bias, **adapter)
        done[id(old)] = new
        if new is not old:
            set_submodule(model, name, new)
    freeze_all_but_adapters(model, modules_to_save)
    stored = target_modules if isinstance(target_modules, str) else sorted(set(target_modules))
    record_adapter_config(model, {
        "target_modules": stored, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "use_rslora": bool(use_rslora), "use_dora": bool(use_dora), "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}), "exclude_modules": exclude_modules,
        "modules_to_save": None if not modules_to_save else
        ([modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)),
    })
    trainable, total = trainable_parameters(model)
    logger.info("fusedlora.inject: %d LoRA layers; %s", len(names), _param_line(trainable, total))
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit base counts its N·K weights (held as buffers)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in set(lora_layers(model).values()) if m.quantized)
    return trainable, total


def _param_line(trainable: int, total: int) -> str:
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    print(_param_line(*trainable_parameters(model)))


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base: each LoRALinear becomes a plain frozen ``nn.Linear`` (4-bit bases
    dequantized to their compute dtype, the sum formed in fp32). In place; returns ``model``."""
    if isinstance(model, LoRALinear):
        return model.to_linear()
    layers = lora_layers(model)
    done: dict[int, nn.Linear] = {}
    for name, layer in layers.items():
        if id(layer) not in done:
            done[id(layer)] = layer.to_linear()
        set_submodule(model, name, done[id(layer)])
    record_adapter_config(model, None)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block, every LoRALinear of ``model`` computes its base alone (e.g. the reference model of
    a DPO run); the adapters come back on exit, also on an exception. The layers keep running the fused op
    with the update's scale set to 0 (x·Wᵀ + 0·(...) is the base exactly for finite adapters; DoRA's
    magnitude is not applied), so nothing weight-sized is decoded. Merged adapters are refused: their
    update is inside the base."""
    layers = {m for m in lora_layers(model).values() if m.r}
    merged = sorted(n for n, m in lora_layers(model).items() if m.merged)
    if merged:
        raise ValueError(f"disable_adapter: adapters merged into their bases cannot be disabled: {', '.join(merged)}"
                         " (unmerge() them first)")
    saved = {layer: layer.adapter_disabled for layer in layers}
    for layer in saved:
        layer.adapter_disabled = True
    try:
        yield model
    finally:
        for layer, was in saved.items():
            layer.adapter_disabled = was
