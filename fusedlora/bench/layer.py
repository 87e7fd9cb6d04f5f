"""The training-layer bench: forward + backward of one LoRA linear (dX, dA, dB; the base is frozen).

One step = y = f(x) with dropout on (training), then y.backward(dY). Baselines (DESIGN.md):
- ``cublas_bf16_dense``: F.linear forward + dX on the dense weight, no LoRA (computes less on purpose: the
  speed of light);
- ``dequant_cublas_lora``: dequantize → cuBLAS → separate LoRA matmuls, re-dequantizing for dX (Unsloth's
  technique);
- ``peft_bnb``: PEFT LoRA over a bitsandbytes Linear4bit holding the very bytes ours reads (when
  bitsandbytes imports and a GPU is present); ``peft_bf16``: PEFT LoRA over the dense nn.Linear;
- ``torch_compile``: the reference op under torch.compile (dynamic shapes: one compile serves every M; GPU
  only, inductor on a small CPU takes minutes).
DoRA rows (``run_layer(..., dora=True)``, variant "dora"): ours is ``fl.dora_linear`` (the magnitude trained
too), against ``peft_bnb_dora`` (PEFT's DoRA over the same bitsandbytes Linear4bit, same A, B and magnitude;
GPU with bitsandbytes only) and ``ours_lora`` (our LoRA layer on the same case: what DoRA adds on top).
Each call takes the next of ``copies`` (x, dY) pairs, so back-to-back repetitions don't reuse cached
activations; % of roofline counts the layer's matmul FLOPs against the matmul rate measured in the run.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..functional import dora_linear, lora_linear
from ..ops.dora import weight_row_sq_norms
from ..ops.lora import lora_linear_reference
from ..quantized import QuantizedWeight, quantize
from . import baselines
from .results import baseline_label, make_row, save
from .timing import Budget, measure, peak_memory_bytes

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
LAYER_BASELINES = ("cublas_bf16_dense", "dequant_cublas_lora", "peft_bnb", "peft_bf16", "torch_compile")
DORA_BASELINES = ("peft_bnb_dora", "ours_lora")


def layer_flops(m: int, k: int, n: int, r: int) -> float:
    """Matmul FLOPs of forward + backward: x·Wᵀ and dX (2·2·MNK), and the six thin LoRA products."""
    return 2 * 2 * m * n * k + 2 * m * r * (k + n) * 3


def dora_flops(m: int, k: int, n: int, r: int, p: float) -> float:
    """The LoRA layer's FLOPs, the norm's W·Aᵀ (2·rNK) and, with dropout, DoRA's second base product and its
    dX (2·2·MNK): the products the formula needs, not the zero-scaled low-rank term that runs with them."""
    return layer_flops(m, k, n, r) + 2 * r * n * k + (2 * 2 * m * n * k if p > 0 else 0)


class LayerCase:
    """Inputs of one (shape, M, quant) case; every baseline computes from the same tensors."""

    def __init__(self, m, k, n, r, dtype, quant, dropout_p, device, *, alpha=None, bnb=None, copies=1, dora=False):
        g = torch.Generator(device="cpu").manual_seed(k + 3 * n + 7 * m)
        rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
        self.m, self.k, self.n, self.r, self.dtype, self.quant, self.p = m, k, n, r, dtype, quant, dropout_p
        self.alpha = float(alpha if alpha is not None else 2 * r)
        self.scale = self.alpha / r
        dense = rnd(n, k, std=k**-0.5)
        self.bnb_layer = None
        if quant == "none":
            self.weight = self.dense = dense
        else:
            if quant == "int4":
                self.weight = quantize(dense, scheme="int4", group_size=128)
            elif bnb is not None and torch.device(device).type == "cuda":
                # bitsandbytes quantizes; ours reads the very same bytes and state
                dq = quant == "nf4-dq"
                layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=dq,
                                          quant_type="nf4", device="cpu")
                layer.weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=dq, blocksize=64)
                self.bnb_layer = layer.to(device)
                self.weight = QuantizedWeight.from_bnb(self.bnb_layer.weight)
            else:
                self.weight = quantize(dense, scheme="nf4", blocksize=64, double_quant=quant == "nf4-dq")
            self.dense = self.weight.dequantize(dtype)
        self.A = rnd(r, k, std=k**-0.5).requires_grad_(True)
        self.B = rnd(n, r, std=r**-0.5).requires_grad_(True)  # random, never zero: the LoRA term is real work
        self.xs = [rnd(m, k).requires_grad_(True) for _ in range(copies)]
        self.dys = [rnd(m, n) for _ in range(copies)]
        self.x, self.dy = self.xs[0], self.dys[0]
        self.magnitude = self.base_sq = None
        if dora:
            w = self.weight.packed if isinstance(self.weight, QuantizedWeight) else self.weight
            self.base_sq = weight_row_sq_norms(w, dtype)
            with torch.no_grad():  # DoRA's initial magnitude ‖W + s·B·A‖, moved off it so that g ≠ 1
                w_full = self.dense.float() + self.scale * self.B.float() @ self.A.float()
                norm = torch.linalg.vector_norm(w_full, dim=1)
                self.magnitude = (norm * (1 + 0.1 * torch.randn(n, generator=g).to(device))).requires_grad_(True)
        self._i = 0

    def step(self, forward, params=()):
        """A zero-argument callable: forward on the next (x, dY) pair, then backward."""
        leaves = [*self.xs, self.A, self.B, *params]

        def run():
            self._i = (self._i + 1) % len(self.xs)
            for t in leaves:
                t.grad = None
            forward(self.xs[self._i]).backward(self.dys[self._i])

        return run

    def ours(self):
        return self.step(lambda x: lora_linear(x, self.weight, self.A, self.B, self.scale, None, self.p, True))

    def ours_dora(self):
        return self.step(lambda x: dora_linear(x, self.weight, self.A, self.B, self.scale, self.magnitude,
                                               self.base_sq, None, self.p, True), [self.magnitude])

    def baseline(self, name, compiled_ref=None):
        """The step of baseline ``name``, or None where it cannot run here."""
        if name == "cublas_bf16_dense":
            return self.step(lambda x: F.linear(x, self.dense))
        if name == "ours_lora":
            return self.ours()
        if name == "peft_bnb_dora":
            if not baselines.peft_available() or self.bnb_layer is None or self.magnitude is None:
                return None
            model = baselines.peft_lora_layer(self.bnb_layer, self.A.detach(), self.B.detach(), self.alpha, self.p,
                                              magnitude=self.magnitude.detach())
            return self.step(model, [p for p in model.parameters() if p.requires_grad])
        if name == "dequant_cublas_lora":
            if not isinstance(self.weight, QuantizedWeight):
                return None
            return self.step(lambda x: baselines.dequant_cublas_lora(
                x, self.weight, self.A, self.B, self.scale, None, self.p, True))
        if name in ("peft_bf16", "peft_bnb"):
            if not baselines.peft_available():
                return None
            if name == "peft_bnb":
                if self.bnb_layer is None:
                    return None
                base = self.bnb_layer
            else:
                base = torch.nn.Linear(self.k, self.n, bias=False, device=self.x.device, dtype=self.dtype)
                with torch.no_grad():
                    base.weight.copy_(self.dense)
                base.weight.requires_grad_(False)
            model = baselines.peft_lora_layer(base, self.A.detach(), self.B.detach(), self.alpha, self.p)
            return self.step(model, [p for p in model.parameters() if p.requires_grad])
        if name == "torch_compile":
            if compiled_ref is None:
                return None
            w = self.weight.packed if isinstance(self.weight, QuantizedWeight) else self.weight
            return self.step(lambda x: compiled_ref(x, w, self.A, self.B, self.scale, None, self.p, True, None))
        raise ValueError(f"baseline: unknown name {name!r}")


def run_layer(cases, *, r=16, dropout_p=0.1, dtype=torch.bfloat16, baseline_names=None, ceilings=None,
              budget_s=None, out_path=None, env=None, progress=None, log=print, dora=False, rows=None):
    """Rows for ``cases`` [((K, N), M, quant) or ((K, N), M, quant, p)] (p: the case's dropout, else
    ``dropout_p``), in order, after ``rows`` (an earlier call's, kept in ``out_path`` too); stops starting
    cases once ``budget_s`` is spent and rewrites ``out_path`` after every row, so a timeout still leaves the
    rows so far. ``dora``: ours is the DoRA layer (variant "dora"), against ``DORA_BASELINES`` by default,
    else ``LAYER_BASELINES``."""
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    bnb = baselines.bitsandbytes() if gpu else None
    if baseline_names is None:
        baseline_names = DORA_BASELINES if dora else LAYER_BASELINES
    compiled_ref = torch.compile(lora_linear_reference, dynamic=True) if gpu else None
    variant = "dora" if dora else None
    budget, rows = Budget(budget_s, log), list(rows or [])
    for (k, n), m, quant, *case_p in cases:
        p = case_p[0] if case_p else dropout_p
        what = f"{k}->{n} M={m} {quant}" + (f" DoRA p={p:g}" if dora else "")
        if budget.spent(what):
            break
        case = LayerCase(m, k, n, r, dtype, quant, p, device, bnb=bnb, copies=3 if gpu else 1, dora=dora)
        ours = case.ours_dora() if dora else case.ours()
        ours_t = measure(ours)
        ours_mem = peak_memory_bytes(ours)
        pct = None
        if ceilings:
            flops = dora_flops(m, k, n, r, p) if dora else layer_flops(m, k, n, r)
            pct = 100.0 * flops / (ceilings["matmul_tflops"] * 1e12) / (ours_t.ms * 1e-3)
        for name in baseline_names:
            fn = case.baseline(name, compiled_ref)
            if fn is None:
                continue
            base_t = measure(fn)
            label = baseline_label(name, DTYPE_NAMES[dtype], gpu)
            rows.append(make_row(
                bench="layer", shape=(k, n), m=m, r=r, dropout=p, dtype=DTYPE_NAMES[dtype], quant=quant,
                ours_ms=ours_t.ms, baseline=label, baseline_ms=base_t.ms, pct_roofline=pct, ours_peak_mem=ours_mem,
                baseline_peak_mem=peak_memory_bytes(fn), ours_iqr_ms=ours_t.iqr, baseline_iqr_ms=base_t.iqr,
                variant=variant))
            log(f"{what}: ours {ours_t.ms:.3f} ms, {label} {base_t.ms:.3f} ms "
                f"({base_t.ms / ours_t.ms:.2f}x)  [{time.perf_counter() - budget.start:.0f} s]")
            if out_path is not None:
                save(rows, out_path, env)
        del case
        if gpu:
            torch.cuda.empty_cache()
        if progress is not None:
            progress.update(1)
    return rows
