"""DoRA's part of a LoRALinear: the trained magnitude m [N] and what its norm needs from the frozen base.

A DoRA layer is a LoRALinear whose ``lora_magnitude_vector`` is a ``DoRAMagnitude`` (PEFT's attribute name,
so the state-dict key is ``lora_magnitude_vector.weight`` and the adapter file's is PEFT's
``<module>.lora_magnitude_vector``). The layer's forward runs ``fusedlora.functional.dora_linear``; the
squared row norms of the base that it takes are computed once per (base tensors, compute dtype) and kept,
not saved (``RowSqNormCache``, also what ``fusedlora.accelerate`` keeps per PEFT DoRA layer): the base is
frozen, and a load, a move or an in-place change of its tensors computes them again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .ops.backend import backend
from .ops.dora import dora_fold, dora_row_norm, dora_weight_norm, folds, weight_row_sq_norms
from .quantized import QuantizedWeight


class TensorKeyedValue:
    """A value computed from tensors, kept until one of them changes or ``extra`` does.

    A tensor counts as unchanged while it is the same object (held weakly, so a new tensor at a freed
    address is not taken for the old one) with the same device, data pointer and version counter: a load,
    a move, a replaced tensor or an in-place change (an optimizer step included) computes the value again.
    A write that bypasses the version counter (through ``.data``) is not seen. Tensors made under
    ``torch.inference_mode`` have no version counter: with one of them the value is computed, not kept.
    """

    def __init__(self):
        self.value = None
        self._key: tuple | None = None
        self._refs: tuple = ()

    def get(self, tensors: Iterable[torch.Tensor | None], extra: tuple, compute: Callable[[], object]):
        if torch.compiler.is_compiling():
            # a traced graph cannot check that the tensors are unchanged (nor keep what it computes): the
            # value is computed in the graph, at every call
            return compute()
        held = [t for t in tensors if t is not None]
        if any(t.is_inference() for t in held):
            return compute()  # (made under torch.inference_mode: no version counter to key on)
        key = extra + tuple((t.device, t.data_ptr(), t._version) for t in held)
        stale = self.value is None or key != self._key  # an equal key has one ref per tensor
        if stale or any(r() is not t for r, t in zip(self._refs, held, strict=True)):
            # made as normal tensors inside torch.inference_mode too, so that a later call with gradients
            # may use (and save) what was kept
            with torch.inference_mode(False):
                self.value = compute()
            self._key, self._refs = key, tuple(weakref.ref(t) for t in held)
        return self.value


class RowSqNormCache(TensorKeyedValue):
    """‖W_n‖² [N] of a frozen base (``weight_row_sq_norms``), computed once per (base tensors, dtype)."""

    def get(self, tensors: Iterable[torch.Tensor | None], dtype: torch.dtype,
            base: Callable[[], object]) -> torch.Tensor:
        """The kept norms, or ``weight_row_sq_norms(base(), dtype)`` when ``tensors`` or ``dtype`` changed;
        ``base`` is called only then (a dense tensor or a ``Packed4bit``)."""
        return super().get(tensors, (dtype,), lambda: weight_row_sq_norms(base(), dtype))


class DoRAKept:
    """What a DoRA layer keeps between calls (ours, or a PEFT layer that ``fusedlora.accelerate`` runs), each
    value until a tensor it was computed from changes: ‖W_n‖² of the base, the norm ‖W + s·B·A‖ of the
    current adapter, and, for calls without gradients on the folded route, g folded into B and into the
    base's block scales (``ops.dora.dora_fold``), so that an inference run launches neither the norm's
    GEMM nor the fold per token."""

    def __init__(self):
        self.sq = RowSqNormCache()
        self._norm = TensorKeyedValue()
        self._fold = TensorKeyedValue()

    def norm(self, sq: torch.Tensor, params: list, base, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
             dtype: torch.dtype) -> torch.Tensor | None:
        """‖W + s·B·A‖ [N] (detached, fp32) of ``base``, ``lora_A``, ``lora_B`` as the op takes them (in
        ``dtype``), kept while ``sq`` (‖W_n‖²), ``params`` (the adapter's A and B Parameters: an optimizer
        step changes their version), s and the dtype are unchanged: an inference run or the micro-batches of
        one accumulated step decode W for it once. None where the op takes the norm itself: the reference
        backend (the norm of the whole W + s·B·A, as PEFT does), and while compiling (at every call)."""
        if dtype == torch.float64 or backend(lora_A.device) == "reference" or torch.compiler.is_compiling():
            return None
        return self._norm.get([sq, *params], (dtype, float(scale)),
                              lambda: dora_row_norm(base, lora_A, lora_B, scale, sq, dtype))

    def fold(self, norm: torch.Tensor | None, params: list, base, lora_B: torch.Tensor, magnitude: torch.Tensor,
             dtype: torch.dtype) -> tuple | None:
        """``dora_fold`` of the kept ``norm`` for a call without gradients on the folded route (a 4-bit base in
        bf16 or fp32), kept while the norm, ``params`` (B's Parameter) and the magnitude are unchanged; None
        otherwise (with gradients the op folds g itself, so that B gets its gradient)."""
        if norm is None or torch.is_grad_enabled() or not folds(base, dtype):
            return None
        return self._fold.get([norm, *params, magnitude], (dtype,),
                              lambda: dora_fold(base, lora_B, magnitude, norm))

    def call_args(self, sq: torch.Tensor, params: tuple, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  scale: float, magnitude: torch.Tensor, dtype: torch.dtype) -> dict:
        """``dora_linear``'s ``weight_norm`` and ``fold`` as kept for a call on ``weight`` (dense, or a
        QuantizedWeight), ``lora_A`` and ``lora_B`` as the op takes them; ``params``: the adapter's (A, B)
        Parameters. The fold comes from the norm, and depends on B's Parameter alone."""
        base = weight.packed if isinstance(weight, QuantizedWeight) else weight
        a_param, b_param = params
        norm = self.norm(sq, [a_param, b_param], base, lora_A, lora_B, scale, dtype)
        return {"weight_norm": norm, "fold": self.fold(norm, [b_param], base, lora_B, magnitude, dtype)}


class DoRAMagnitude(nn.Module):
    """m [N] (``weight``) of a DoRA layer; ``merged_factor`` is m / ‖W + s·B·A‖ while the layer is merged."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self.merged_factor: torch.Tensor | None = None
        self.kept = DoRAKept()

    def base_sq_norm(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """‖W_n‖² [N] of ``layer``'s base decoded to ``dtype`` (kept until the base's tensors change)."""
        if layer.quantized:
            fields = ("data", "absmax", "nested_absmax", "nested_code", "scales", "zeros", "offset")
            return self.kept.sq.get([getattr(layer, f"quant_{f}") for f in fields], dtype,
                                    lambda: layer.base_weight.packed)
        return self.kept.sq.get([layer.weight], dtype, lambda: layer.weight)

    def weight_norm(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """‖W + s·B·A‖ per row (detached), W decoded to ``dtype``; fp32, fp64 for fp64."""
        base = layer.base_weight.packed if layer.quantized else layer.weight.detach().to(dtype)
        return dora_weight_norm(base, layer.lora_A, layer.lora_B, layer.scaling, self.base_sq_norm(layer, dtype),
                                dtype)

    @classmethod
    def initial(cls, layer, dtype: torch.dtype) -> DoRAMagnitude:
        """m = ‖W + s·B·A‖ of the layer's current adapter (DoRA's initialization: the layer starts as its
        LoRA), W decoded to the base's dtype, m in ``dtype`` (the adapters')."""
        mag = cls(torch.empty(layer.out_features, dtype=dtype, device=layer.lora_A.device))
        with torch.no_grad():
            mag.weight.copy_(mag.weight_norm(layer, layer.base_dtype()))
        return mag

    @torch.no_grad()
    def fold(self, w: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m / ‖W + ΔW‖ ⊙ (W + ΔW), the factor m / ‖W + ΔW‖ [N]) of dense ``w`` and ``delta`` (one dtype),
        in that dtype. The norm is the unmerged weight's, as the forward takes it (PEFT merges the same way)."""
        total = w + delta
        factor = self.weight.detach().to(total.dtype) / torch.linalg.vector_norm(total, dim=1)
        return total * factor[:, None], factor

    @staticmethod
    @torch.no_grad()
    def unfold(merged: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """W from a merged weight and the factor ``fold`` gave (its inverse, up to rounding)."""
        return merged / factor.to(merged.dtype)[:, None] - delta

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"
