"""The training-layer bench: forward + backward of one LoRA linear (dX, dA, dB), ours against baselines."""

from __future__ import annotations

import torch

from ..functional import lora_linear
from ..quantized import QuantizedWeight, quantize
from . import baselines
from .results import make_row
from .timing import peak_memory_bytes, time_ms

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def layer_flops(m: int, k: int, n: int, r: int) -> float:
    """Matmul FLOPs of forward + backward (dX, dA, dB) for one layer: the roofline numerator."""
    base = 2 * 2 * m * n * k  # forward and dX
    lora = 2 * m * r * (k + n) * 3  # xa and xa·Bᵀ; dY·B and ·A; dA and dB
    return base + lora


class LayerCase:
    def __init__(self, m, k, n, r, dtype, quant, dropout_p, device):
        g = torch.Generator(device="cpu").manual_seed(m * 7 + k * 3 + n)
        self.m, self.k, self.n, self.r, self.dtype, self.quant, self.p = m, k, n, r, dtype, quant, dropout_p
        rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
        self.dense = rnd(n, k, std=k**-0.5)
        self.weight = self.dense
        if quant != "none":
            scheme = "int4" if quant == "int4" else "nf4"
            kw = {"group_size": 128} if scheme == "int4" else {"blocksize": 64, "double_quant": quant == "nf4-dq"}
            self.weight = quantize(self.dense, scheme=scheme, **kw)
            self.dense = self.weight.dequantize(dtype)
        self.x = rnd(m, k).requires_grad_(True)
        self.A = rnd(r, k, std=k**-0.5).requires_grad_(True)
        self.B = rnd(n, r, std=r**-0.5).requires_grad_(True)  # random: a zero B would skip no work but hide errors
        self.dy = rnd(m, n)
        self.alpha = 2.0 * r
        self.scale = self.alpha / r

    def _step(self, forward):
        def run():
            self.x.grad = self.A.grad = self.B.grad = None
            forward().backward(self.dy)

        return run

    def ours(self):
        return self._step(lambda: lora_linear(self.x, self.weight, self.A, self.B, self.scale, None, self.p, True))

    def baseline(self, name):
        if name == "cublas_bf16_dense":
            return self._step(lambda: baselines.cublas_dense(self.x, self.dense))
        if name == "dequant_cublas_lora":
            if not isinstance(self.weight, QuantizedWeight):
                return None
            return self._step(lambda: baselines.dequant_cublas_lora(
                self.x, self.weight, self.A, self.B, self.scale, None, self.p, True))
        if name == "peft_bf16":
            if not baselines.peft_available():
                return None
            base = torch.nn.Linear(self.k, self.n, bias=False, device=self.x.device, dtype=self.dtype)
            with torch.no_grad():
                base.weight.copy_(self.dense)
            model = baselines.peft_lora_layer(base, self.A.detach(), self.B.detach(), self.alpha, self.p)
            return self._step(lambda: model(self.x))
        if name == "torch_compile":
            if not torch.cuda.is_available():
                return None  # inductor on a small CPU takes minutes to compile; not a meaningful baseline there
            fn = baselines.compiled_reference()
            w = self.weight.packed if isinstance(self.weight, QuantizedWeight) else self.weight
            return self._step(lambda: fn(self.x, w, self.A, self.B, self.scale, None, self.p, True, None))
        raise ValueError(f"baseline: unknown name {name!r}")


LAYER_BASELINES = ("cublas_bf16_dense", "dequant_cublas_lora", "peft_bf16", "torch_compile")


def run_layer(shapes, ms, *, r=16, dropout_p=0.1, dtype=torch.bfloat16, quants=("nf4", "none"), ceilings=None,
              baselines_=LAYER_BASELINES, progress=None):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for k, n in shapes:
        for m in ms:
            for quant in quants:
                case = LayerCase(m, k, n, r, dtype, quant, dropout_p, device)
                ours = case.ours()
                ours_ms = time_ms(ours)
                ours_mem = peak_memory_bytes(ours)
                pct = None
                if ceilings:
                    pct = 100.0 * layer_flops(m, k, n, r) / (ceilings["matmul_tflops"] * 1e12) / (ours_ms * 1e-3)
                for name in baselines_:
                    fn = case.baseline(name)
                    if fn is None:
                        continue
                    rows.append(make_row(
                        bench="layer", shape=(k, n), m=m, r=r, dropout=dropout_p, dtype=DTYPE_NAMES[dtype],
                        quant=quant, ours_ms=ours_ms, baseline=name, baseline_ms=time_ms(fn), pct_roofline=pct,
                        ours_peak_mem=ours_mem, baseline_peak_mem=peak_memory_bytes(fn)))
                if progress is not None:
                    progress.update(1)
    return rows
