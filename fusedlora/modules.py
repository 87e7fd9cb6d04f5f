"""LoRALinear: a frozen linear base (dense or 4-bit) plus a trainable low-rank update, run as one op.

    y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias)        W [N, K] frozen, A [r, K], B [N, r] trainable,
                                                 s = alpha / r, or alpha / √r with rsLoRA

The forward is ``fusedlora.functional.lora_linear``, so the fused kernels run wherever the backend has
them. A dense base is a ``weight`` Parameter with ``requires_grad=False`` (the state-dict keys of
``nn.Linear``). A 4-bit base is held as buffers (``quant_data``, ``quant_absmax``, ...): ``.to()``,
``state_dict()`` and DDP move and save them, and the ``Packed4bit`` the op takes is rebuilt from them at
each forward. Casting the module (``.to(torch.bfloat16)``, ``.half()``) moves the 4-bit buffers but never
changes their dtypes (that would change the decoded values); it changes the compute dtype instead.

A layer may also have no adapter (r = 0, e.g. right after ``fusedlora.load_quantized``): it then computes
the base alone until ``reset_adapter`` gives it one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .dora import DoRAMagnitude
from .formats.packed import SCHEMES, Packed4bit, check_packed, field_names
from .functional import dora_linear, lora_linear
from .ops.backend import backend
from .quantized import QuantizedWeight, quantize

# The 4-bit buffers, in Packed4bit field order; absent fields are stored as None (not in the state dict).
_QUANT_FIELDS = ("data", "absmax", "nested_absmax", "nested_code", "scales", "zeros")
# quant_meta = [N, K, block, scheme index, compute-dtype index]: enough to rebuild the Packed4bit.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INIT_CHOICES = (True, False, "gaussian")

# The largest rank the kernels run (DESIGN.md, "Ranks").
MAX_RANK = 512


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale of the low-rank update: alpha / r, or alpha / √r with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _default_lora_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # Adapters of a 16-bit base train in fp32 (as PEFT's autocast_adapter_dtype does); the forward casts
    # them to the input's dtype, so the op still sees one dtype.
    return torch.float64 if base_dtype == torch.float64 else torch.float32


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: expected a float in [0, 1), got {p!r}")
    return float(p)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def quantized_weight_from_state_dict(state_dict: Mapping, prefix: str, shape: tuple | None = None) -> QuantizedWeight:
    """The 4-bit base that a LoRALinear's state dict holds under ``prefix`` (``quant_meta``, ``quant_offset``,
    ``quant_data``, ...), checked (``shape``: the (N, K) it must have); errors name the keys."""
    meta, offset = state_dict.get(prefix + "quant_meta"), state_dict.get(prefix + "quant_offset")
    key = prefix + "quant_meta"
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or tuple(meta.shape) != (5,):
        got = f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise ValueError(f"{key}: expected int64 [N, K, block, scheme index, dtype index], got {got}")
    n, k, block, scheme, dtype = (int(v) for v in meta.tolist())
    if shape is not None and (n, k) != tuple(shape):
        raise ValueError(f"{key}: the loaded 4-bit weight has shape ({n}, {k}), this layer is {tuple(shape)}")
    if not (0 <= scheme < len(SCHEMES) and 0 <= dtype < len(_DTYPES)):
        raise ValueError(f"{key}: expected a scheme index below {len(SCHEMES)} and a dtype index below "
                         f"{len(_DTYPES)}, got {scheme} and {dtype}")
    if not isinstance(offset, torch.Tensor) or offset.numel() != 1:
        raise ValueError(f"{prefix}quant_offset: expected one float32 value, got {offset!r}")
    packed = Packed4bit(SCHEMES[scheme], shape=(n, k), block=block, nested_offset=float(offset.item()),
                        **{f: state_dict.get(f"{prefix}quant_{f}") for f in _QUANT_FIELDS})
    names = {f: f"{prefix}quant_{f}" for f in _QUANT_FIELDS}
    names.update(block=f"{key}[2] (block)", nested_offset=f"{prefix}quant_offset", scheme=f"{key}[3] (scheme)")
    check_packed(packed, names)
    return QuantizedWeight(packed, _DTYPES[dtype])


class LoRALinear(nn.Module):
    """A linear layer with a frozen base (dense ``Tensor`` or ``QuantizedWeight``) and a LoRA adapter.

    Args:
        weight: the base W [N, K], a tensor (kept frozen, in its dtype) or a ``QuantizedWeight``.
        bias: optional [N] tensor (frozen).
        r, alpha, dropout, use_rslora: the adapter (PEFT's meaning); r = 0 builds the layer without one.
        init_lora_weights: True (PEFT's default: A kaiming-uniform with a = √5, B zero), "gaussian"
            (A normal with std 1/r, B zero) or False (A and B both kaiming-uniform: a non-zero update).
        lora_dtype: dtype of A and B (default fp32, fp64 for an fp64 base).
        use_dora: DoRA (PEFT's semantics): a trained magnitude m [N] rescales each output row of
            W + s·B·A to m / ‖W + s·B·A‖ (``fusedlora.dora``); m starts at that norm.
    """

    def __init__(
        self,
        weight: torch.Tensor | QuantizedWeight,
        bias: torch.Tensor | None = None,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ):
        super().__init__()
        if isinstance(weight, QuantizedWeight):
            self._set_quantized_base(weight)
            base_dtype, device = weight.dtype, weight.device
        elif isinstance(weight, torch.Tensor):
            if weight.dim() != 2 or not weight.is_floating_point():
                raise ValueError(
                    f"weight: expected a 2-D floating-point tensor [N, K], got {weight.dtype} "
                    f"of shape {tuple(weight.shape)}"
                )
            self.quant_scheme = None
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
            base_dtype, device = weight.dtype, weight.device
        else:
            raise TypeError(f"weight: expected a torch.Tensor or a QuantizedWeight, got {type(weight).__name__}")
        self.out_features, self.in_features = self._base_shape()
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias: expected a tensor of shape ({self.out_features},), got {got}")
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.merged = False
        # a 4-bit base's merged dense weight while merged (moves with the module, never saved)
        self.register_buffer("merged_weight", None, persistent=False)
        self.register_load_state_dict_pre_hook(LoRALinear._check_quant_state)
        self.register_load_state_dict_post_hook(LoRALinear._sync_quant_meta)
        self.r = 0
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.register_module("lora_magnitude_vector", None)
        # fusedlora.disable_adapter: the layer computes its base alone while set
        self.adapter_disabled = False
        self.alpha, self.dropout, self.use_rslora, self.scaling = 0.0, 0.0, False, 0.0
        if r:
            self.reset_adapter(
                r, alpha, dropout, use_rslora, init_lora_weights,
                lora_dtype or _default_lora_dtype(base_dtype), device, use_dora,
            )
        elif use_dora:
            raise ValueError("use_dora: DoRA needs an adapter (r >= 1), got r = 0")

    # ----------------------------------------------------------------------------------- base weight
    def _set_quantized_base(self, qw: QuantizedWeight) -> None:
        p = qw.packed
        if p.scheme not in SCHEMES:
            raise ValueError(f"weight: expected a quant scheme in {SCHEMES}, got {p.scheme!r}")
        if qw.dtype not in _DTYPES:
            raise TypeError(f"weight: expected a compute dtype in {_DTYPES}, got {qw.dtype}")
        check_packed(p, field_names("weight."))
        self.quant_scheme = p.scheme
        self.quant_block = int(p.block)
        self.quant_nested_offset = float(p.nested_offset)
        self.compute_dtype = qw.dtype
        for field in _QUANT_FIELDS:
            t = getattr(p, field)
            if field == "nested_code" and t is not None:
                # the 256-entry code book is one cached tensor shared by every weight (ours and
                # bitsandbytes'); a copy per layer keeps state dicts free of shared tensors
                t = t.clone()
            self.register_buffer(f"quant_{field}", t)
        meta = [p.shape[0], p.shape[1], p.block, SCHEMES.index(p.scheme), _DTYPES.index(qw.dtype)]
        self.register_buffer("quant_meta", torch.tensor(meta, dtype=torch.int64, device=p.data.device))
        # fp32 exactly as the checkpoint has it (a Python float holds any fp32 value exactly).
        offset = torch.tensor(float(p.nested_offset), dtype=torch.float32, device=p.data.device)
        self.register_buffer("quant_offset", offset)
        self._quant_shape = (int(p.shape[0]), int(p.shape[1]))

    def _base_shape(self) -> tuple[int, int]:
        if self.quant_scheme is None:
            return tuple(self.weight.shape)
        return self._quant_shape

    @staticmethod
    def _check_quant_state(module: LoRALinear, state_dict, prefix, *_) -> None:
        """Before load_state_dict copies anything: the 4-bit weight the layer would hold afterwards (the
        incoming buffers where the state dict has them, the current ones elsewhere) passes
        ``check_packed``, and its metadata fits this layer. Errors name the state-dict key."""
        if module.quant_scheme is None:
            return
        # The codes in another layout of the same bytes (a sharded model's NF4 [blocks, bytes per block]
        # against an unsharded [bytes, 1], or the reverse): taken in this layer's layout.
        data, key = module.quant_data, prefix + "quant_data"
        got = state_dict.get(key)
        if (isinstance(got, torch.Tensor) and got.shape != data.shape and got.dtype == data.dtype
                and got.dim() == 2 and got.numel() == data.numel()):
            state_dict[key] = got.reshape(data.shape)

        def incoming(name: str):
            current = getattr(module, name)
            return current if current is None else state_dict.get(prefix + name, current)

        names = ["quant_meta", "quant_offset"] + [f"quant_{f}" for f in _QUANT_FIELDS]
        quantized_weight_from_state_dict({prefix + n: incoming(n) for n in names}, prefix, module._quant_shape)

    @staticmethod
    def _sync_quant_meta(module: LoRALinear, incompatible) -> None:
        """After load_state_dict: the Python copies of the 4-bit metadata follow the loaded buffers (which
        ``_check_quant_state`` validated before they were copied)."""
        if module.quant_scheme is None:
            return
        _, _, block, scheme, dtype = (int(v) for v in module.quant_meta.tolist())
        module.quant_block, module.quant_scheme, module.compute_dtype = block, SCHEMES[scheme], _DTYPES[dtype]
        module.quant_nested_offset = float(module.quant_offset.item())

    @property
    def quantized(self) -> bool:
        return self.quant_scheme is not None

    @property
    def base_weight(self) -> torch.Tensor | QuantizedWeight:
        """The frozen base: the dense Parameter, or a QuantizedWeight rebuilt over the 4-bit buffers."""
        if self.quant_scheme is None:
            return self.weight
        packed = Packed4bit(
            scheme=self.quant_scheme,
            shape=self._quant_shape,
            block=self.quant_block,
            nested_offset=self.quant_nested_offset,
            **{field: getattr(self, f"quant_{field}") for field in _QUANT_FIELDS},
        )
        return QuantizedWeight(packed, self.compute_dtype)

    def base_dtype(self) -> torch.dtype:
        return self.weight.dtype if self.quant_scheme is None else self.compute_dtype

    def dense_base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [N, K] as a dense tensor (4-bit bases dequantized) in ``dtype`` (default: the base's dtype)."""
        dtype = dtype or self.base_dtype()
        if self.quant_scheme is None:
            return self.weight.detach().to(dtype)
        return self.base_weight.dequantize(dtype)

    def _apply(self, fn, recurse=True):
        # The 4-bit tensors move with the module but keep their dtypes; a dtype cast of the module becomes
        # its new compute dtype (probed on an empty tensor of the current one).
        if self.quant_scheme is None:
            return super()._apply(fn, recurse)
        # (fusedlora.fully_shard holds the storage tensors as frozen parameters of the same names)
        names = [f"quant_{f}" for f in _QUANT_FIELDS] + ["quant_meta", "quant_offset"]
        stores = {name: self._parameters if name in self._parameters else self._buffers for name in names}
        held = {name: stores[name].pop(name) for name in names}
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=held["quant_data"].device))
        finally:
            for name, t in held.items():
                stores[name][name] = t
        if probe.is_floating_point() and probe.dtype in _DTYPES:
            self.compute_dtype = probe.dtype
            held["quant_meta"][4] = _DTYPES.index(probe.dtype)
        for name, t in held.items():
            if t is not None and t.device != probe.device:
                moved = t.to(probe.device)
                stores[name][name] = nn.Parameter(moved, requires_grad=False) if name in self._parameters else moved
        return self

    # -------------------------------------------------------------------------------------- adapter
    def reset_adapter(
        self,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        use_dora: bool = False,
    ) -> None:
        """Give the layer a fresh adapter (replacing any it has); r = 0 removes it. ``use_dora`` adds DoRA's
        magnitude, initialized to the row norms of W + s·B·A."""
        if self.merged:
            raise RuntimeError("reset_adapter: the adapter is merged into the base; call unmerge() first")
        _check_int("r", r, 0)
        if init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"init_lora_weights: expected one of {INIT_CHOICES}, got {init_lora_weights!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha: expected a positive finite number, got {alpha!r}")
        if r > MAX_RANK:
            raise ValueError(f"r: {r} is beyond the largest supported rank, {MAX_RANK}")
        if r > min(self.in_features, self.out_features):
            warnings.warn(f"r = {r} is larger than min(in_features, out_features) = "
                          f"{min(self.in_features, self.out_features)} of this {self.in_features}->"
                          f"{self.out_features} layer: the update's rank cannot exceed that", stacklevel=3)
        self.dropout = _check_dropout(dropout)
        self.r, self.alpha, self.use_rslora = r, alpha, bool(use_rslora)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora: expected a bool, got {type(use_dora).__name__}")
        if use_dora and r == 0:
            raise ValueError("use_dora: DoRA needs an adapter (r >= 1), got r = 0")
        self.lora_magnitude_vector = None
        if r == 0:
            self.lora_A = self.lora_B = None
            self.scaling = 0.0
            return
        self.scaling = lora_scaling(r, alpha, use_rslora)
        if device is None:
            device = self.lora_A.device if self.lora_A is not None else self._base_device()
        if lora_dtype is None:
            lora_dtype = self.lora_A.dtype if self.lora_A is not None else _default_lora_dtype(self.base_dtype())
        a = torch.empty(r, self.in_features, dtype=lora_dtype, device=device)
        b = torch.empty(self.out_features, r, dtype=lora_dtype, device=device)
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        if use_dora:
            self.lora_magnitude_vector = DoRAMagnitude.initial(self, lora_dtype)

    def set_scaling(self, alpha: float, use_rslora: bool | None = None) -> None:
        """Change alpha (and optionally rsLoRA) of the current adapter, keeping A and B."""
        if self.r == 0:
            raise RuntimeError("set_scaling: the layer has no adapter (r = 0)")
        if self.merged:
            raise RuntimeError("set_scaling: the adapter is merged into the base; call unmerge() first")
        self.alpha = alpha
        if use_rslora is not None:
            self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.r, alpha, self.use_rslora)

    def adopt_adapter(
        self,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """Make ``lora_A`` [r, K] / ``lora_B`` [N, r] (and DoRA's ``magnitude`` [N], when given) this layer's
        adapter. Parameters are kept as the same objects (an optimizer that holds them keeps working); other
        tensors are wrapped as new Parameters."""
        if self.merged:
            raise RuntimeError("adopt_adapter: the adapter is merged into the base; call unmerge() first")
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if lora_A.dim() != 2 or r < 1 or lora_A.shape[1] != self.in_features:
            raise ValueError(f"lora_A: expected shape [r, {self.in_features}], got {tuple(lora_A.shape)}")
        if tuple(lora_B.shape) != (self.out_features, r):
            raise ValueError(f"lora_B: expected shape ({self.out_features}, {r}), got {tuple(lora_B.shape)}")
        if magnitude is not None and (not isinstance(magnitude, torch.Tensor) or not magnitude.is_floating_point()
                                      or tuple(magnitude.shape) != (self.out_features,)):
            got = (f"{magnitude.dtype} {tuple(magnitude.shape)}" if isinstance(magnitude, torch.Tensor)
                   else type(magnitude).__name__)
            raise ValueError(f"magnitude: expected a floating-point tensor of shape ({self.out_features},), got {got}")
        self.dropout = _check_dropout(dropout)
        self.r, self.alpha, self.use_rslora = r, alpha, bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = lora_A if isinstance(lora_A, nn.Parameter) else nn.Parameter(lora_A.detach())
        self.lora_B = lora_B if isinstance(lora_B, nn.Parameter) else nn.Parameter(lora_B.detach())
        self.lora_magnitude_vector = None
        if magnitude is not None:
            mag = DoRAMagnitude(torch.empty(0))
            mag.weight = magnitude if isinstance(magnitude, nn.Parameter) else nn.Parameter(magnitude.detach())
            self.lora_magnitude_vector = mag

    @property
    def dora(self) -> bool:
        """True when the adapter is DoRA (it has a magnitude vector)."""
        return self.lora_magnitude_vector is not None

    def _base_device(self) -> torch.device:
        return self.weight.device if self.quant_scheme is None else self.quant_data.device

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s·B·A [N, K], computed in fp32 (fp64 for fp64 adapters) and returned in ``dtype``."""
        if self.r == 0:
            raise RuntimeError("delta_weight: the layer has no adapter (r = 0)")
        acc = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        a, b = self.lora_A.detach().to(acc), self.lora_B.detach().to(acc)
        return (self.scaling * (b @ a)).to(dtype)

    # ---------------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base. A dense base is updated in place (W += s·B·A, rounded to W's
        dtype); a 4-bit base keeps its 4-bit tensors and computes with a merged dense copy until
        ``unmerge()``, which is then exact."""
        if self.merged:
            return
        if self.r == 0:
            raise RuntimeError("merge: the layer has no adapter (r = 0)")
        if self.quant_scheme is None:
            w = self.weight
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            w.copy_(self._merged(w.to(acc), self.delta_weight(acc), keep_factor=True).to(w.dtype))
        else:
            acc = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
            merged = self._merged(self.dense_base_weight(acc), self.delta_weight(acc), keep_factor=True)
            self.merged_weight = merged.to(self.compute_dtype)
        self.merged = True

    def _merged(self, w: torch.Tensor, delta: torch.Tensor, keep_factor: bool = False) -> torch.Tensor:
        """W + ΔW, or DoRA's m / ‖W + ΔW‖ ⊙ (W + ΔW) (its factor kept for unmerge when ``keep_factor``)."""
        if not self.dora:
            return w + delta
        merged, factor = self.lora_magnitude_vector.fold(w, delta)
        if keep_factor:
            self.lora_magnitude_vector.merged_factor = factor
        return merged

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` (a dense base is restored up to the rounding of its dtype)."""
        if not self.merged:
            return
        if self.quant_scheme is None:
            w = self.weight
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            if self.dora:
                mag = self.lora_magnitude_vector
                w.copy_(mag.unfold(w.to(acc), self.delta_weight(acc), mag.merged_factor).to(w.dtype))
            else:
                w.copy_((w.to(acc) - self.delta_weight(acc)).to(w.dtype))
        else:
            self.merged_weight = None
        if self.dora:
            self.lora_magnitude_vector.merged_factor = None
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear computing this layer without dropout: base (dequantized to the compute dtype)
        plus the adapter, folded in fp32. Its parameters are frozen like the base."""
        if self.merged and self.quant_scheme is None:
            w = self.weight.detach().clone()
        else:
            dtype = self.base_dtype()
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            w = self.dense_base_weight(acc)
            if self.r and not self.merged:
                w = self._merged(w, self.delta_weight(acc))
            elif self.merged:
                w = self.merged_weight.to(acc)
            w = w.to(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone().to(w.dtype), requires_grad=False)
        return linear

    # -------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = _cast(self.bias, x.dtype)
        if self.r and self.adapter_disabled and not self.merged:
            # the base alone, still through the fused op (x·Wᵀ + 0·(...) is the base exactly for finite
            # adapters), so that nothing weight-sized is decoded
            weight = self.base_weight if self.quant_scheme is not None else _cast(self.weight, x.dtype)
            return lora_linear(x, weight, _cast(self.lora_A, x.dtype).detach(), _cast(self.lora_B, x.dtype).detach(),
                               0.0, bias)
        if self.merged or self.r == 0:
            if self.quant_scheme is None:
                w = self.weight
            elif self.merged:
                w = self.merged_weight
            else:
                w = self.base_weight.dequantize(x.dtype)
            return F.linear(x, _cast(w, x.dtype), bias)
        weight = self.base_weight if self.quant_scheme is not None else _cast(self.weight, x.dtype)
        if self.dora:
            mag = self.lora_magnitude_vector
            a, b = _cast(self.lora_A, x.dtype), _cast(self.lora_B, x.dtype)
            sq = mag.base_sq_norm(self, x.dtype)
            kept = mag.kept.call_args(sq, (self.lora_A, self.lora_B), weight, a, b, self.scaling, mag.weight, x.dtype)
            return dora_linear(x, weight, a, b, self.scaling, mag.weight, sq, bias, self.dropout, self.training, **kept)
        return lora_linear(
            x,
            weight,
            _cast(self.lora_A, x.dtype),
            _cast(self.lora_B, x.dtype),
            self.scaling,
            bias,
            self.dropout,
            self.training,
        )

    # ----------------------------------------------------------------------------------- build, repr
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        quantize: str | Mapping | None = None,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> LoRALinear:
        """Wrap an ``nn.Linear`` (its weight and bias are shared, not copied, unless ``quantize`` is given).

        ``quantize``: None keeps the base as it is; "nf4" or "int4" quantizes it with the defaults of
        ``fusedlora.quantize``; a mapping gives the keyword arguments, e.g.
        ``{"scheme": "nf4", "blocksize": 128, "double_quant": False}``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if quantize is not None:
            weight = quantize_weight(weight, quantize)
        return cls(weight, linear.bias, r, alpha, dropout, use_rslora, init_lora_weights, lora_dtype, use_dora)

    def extra_repr(self) -> str:
        if self.quant_scheme is None:
            base = f"base=dense {str(self.weight.dtype).replace('torch.', '')}"
        else:
            dq = "+dq" if self.quant_nested_absmax is not None else ""
            dt = str(self.compute_dtype).replace("torch.", "")
            base = f"base={self.quant_scheme}{dq} (block {self.quant_block}, compute {dt})"
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}", f"r={self.r}"]
        if self.r:
            parts += [f"alpha={self.alpha:g}", f"scaling={self.scaling:.4g}"]
            if self.use_rslora:
                parts.append("rslora=True")
            if self.dropout:
                parts.append(f"dropout={self.dropout:g}")
            if self.dora:
                parts.append("dora=True")
        if self.merged:
            parts.append("merged=True")
        try:
            fam = backend(self._base_device())
        except (RuntimeError, ValueError) as exc:
            fam = f"unavailable ({exc})"
        parts += [base, f"backend={fam}"]
        return ", ".join(parts)


def quantize_weight(weight: torch.Tensor, spec: str | Mapping) -> QuantizedWeight:
    """``fusedlora.quantize`` with ``spec`` = a scheme name or a mapping of its keyword arguments."""
    if isinstance(spec, str):
        kwargs = {"scheme": spec}
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
    else:
        raise TypeError(f"quantize: expected None, 'nf4', 'int4' or a mapping, got {type(spec).__name__}")
    if kwargs.get("scheme") not in SCHEMES:
        raise ValueError(f"quantize: expected a scheme in {SCHEMES}, got {kwargs.get('scheme')!r}")
    return quantize(weight, **kwargs)


def linear_base(module: nn.Module) -> tuple[torch.Tensor | QuantizedWeight, torch.Tensor | None]:
    """(base weight, bias) of a linear layer: an ``nn.Linear`` (weight kept as it is), a bitsandbytes
    4-bit linear (recognized by its weight's ``quant_state``; the 4-bit tensors are taken as they are,
    without bitsandbytes being imported), or a ``LoRALinear``'s base."""
    if isinstance(module, LoRALinear):
        return module.base_weight, module.bias
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a linear layer (torch.nn.Linear or a subclass), got {type(module).__name__}")
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        if getattr(quant_state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU eval forward repacks the bytes and drops double quantization in place
            raise ValueError(
                f"{type(module).__name__}: its 4-bit state was converted in place by a bitsandbytes CPU forward "
                "in eval mode and no longer holds the checkpoint's NF4 state; convert the layer before any "
                "eval-mode CPU forward (or reload it)"
            )
        return QuantizedWeight.from_bnb(weight), module.bias
    if not weight.is_floating_point():
        raise TypeError(
            f"{type(module).__name__}: its weight is {type(weight).__name__} of dtype {weight.dtype}; only "
            "floating-point and bitsandbytes 4-bit (NF4) bases are supported"
        )
    return weight.detach(), module.bias
