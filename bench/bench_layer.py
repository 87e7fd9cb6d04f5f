"""Training-layer bench (GPU): forward + backward of one LoRA linear, ours against the baselines.

    python bench/bench_layer.py [--quick | --full] [--budget SECONDS] [--out layer.json]

One step = y = f(x) with dropout on (training), then y.backward(dY): dX, dA, dB (the base is frozen).
Llama-3-8B projections (K→N: 4096→4096, 4096→14336, 14336→4096), r = 16, p = 0.1, bf16, NF4
(blocksize 64, double-quantized like a QLoRA checkpoint) and a dense bf16 base. Baselines (DESIGN.md):
- ``cublas_bf16_dense``: F.linear forward + dX on the dense bf16 weight, no LoRA (computes less on purpose:
  the speed of light);
- ``dequant_cublas_lora``: dequantize → cuBLAS → separate LoRA matmuls, re-dequantizing for dX (Unsloth's
  technique, fusedlora.bench.baselines);
- ``peft_bnb``: PEFT LoRA over a bitsandbytes Linear4bit holding the same NF4 bytes (when bitsandbytes
  imports); ``peft_bf16``: PEFT LoRA over the dense bf16 nn.Linear;
- ``torch_compile``: the reference op under torch.compile (dynamic shapes: one compile serves every M).
Times are triton.testing.do_bench medians (L2 flushed before every repetition), each call taking the next
of three (x, dY) copies; peak memory is per step above what was live before it. % of roofline counts the
layer's matmul FLOPs against the bf16 matmul rate measured in the same run.

The matrix runs in priority order and the rows so far are written after every row, so ``--budget``
(default 45 s, for the device check's 75 s slot) stops it cleanly; ``--full`` runs every M in 512..8192.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
R, P, ALPHA = 16, 0.1, 32.0
QUICK = [((4096, 4096), m, q) for m in (4096, 1024) for q in ("nf4-dq", "none")]
# the device-check matrix: the target sizes (M = 4096, 8192 and 512..2048) first, one shape at a time
DEFAULT = [((4096, 4096), m, q) for m in (4096, 8192, 1024) for q in ("nf4-dq", "none")] + \
          [(s, m, "nf4-dq") for s in SHAPES[1:] for m in (4096, 512)]
FULL = [(s, m, q) for s in SHAPES for m in (512, 1024, 2048, 4096, 8192) for q in ("nf4-dq", "none")]
COPIES = 3


def _bnb():
    try:
        import bitsandbytes as bnb

        return bnb
    except Exception:  # not installed, or its GPU library does not load
        return None


class Case:
    """Inputs of one (shape, M, quant) case; every baseline computes from the same tensors."""

    def __init__(self, k, n, m, quant, bnb):
        import fusedlora as fl

        g = torch.Generator(device="cpu").manual_seed(k + 3 * n + 7 * m)
        rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to("cuda", torch.bfloat16)  # noqa: E731
        self.k, self.n, self.m, self.quant = k, n, m, quant
        self.scale = ALPHA / R
        dense = rnd(n, k, std=k**-0.5)
        self.bnb_layer = None
        if quant == "none":
            self.weight = self.dense = dense
        else:
            dq = quant == "nf4-dq"
            if bnb is not None:
                # bitsandbytes quantizes; ours reads the very same bytes and state
                layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=dq,
                                          quant_type="nf4", device="cpu")
                layer.weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=dq, blocksize=64)
                self.bnb_layer = layer.cuda()
                self.weight = fl.QuantizedWeight.from_bnb(self.bnb_layer.weight)
            else:
                self.weight = fl.quantize(dense, scheme="nf4", blocksize=64, double_quant=dq)
            self.dense = self.weight.dequantize(torch.bfloat16)
        self.A = rnd(R, k, std=k**-0.5).requires_grad_(True)
        self.B = rnd(n, R, std=R**-0.5).requires_grad_(True)  # random, never zero: the LoRA term is real work
        self.xs = [rnd(m, k).requires_grad_(True) for _ in range(COPIES)]
        self.dys = [rnd(m, n) for _ in range(COPIES)]
        self.i = 0

    def step(self, forward, params=()):
        """A zero-argument callable: forward on the next (x, dY) copy, then backward."""
        leaves = [*self.xs, self.A, self.B, *params]

        def run():
            self.i = (self.i + 1) % COPIES
            for t in leaves:
                t.grad = None
            forward(self.xs[self.i]).backward(self.dys[self.i])

        return run

    def ours(self):
        import fusedlora as fl

        return self.step(lambda x: fl.lora_linear(x, self.weight, self.A, self.B, self.scale, None, P, True))

    def baseline(self, name, compiled_ref):
        import torch.nn.functional as F

        from fusedlora.bench import baselines

        if name == "cublas_bf16_dense":
            return self.step(lambda x: F.linear(x, self.dense))
        if name == "dequant_cublas_lora":
            return self.step(lambda x: baselines.dequant_cublas_lora(
                x, self.weight, self.A, self.B, self.scale, None, P, True))
        if name in ("peft_bf16", "peft_bnb"):
            if not baselines.peft_available():
                return None
            if name == "peft_bnb":
                if self.bnb_layer is None:
                    return None
                base = self.bnb_layer
            else:
                base = torch.nn.Linear(self.k, self.n, bias=False, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    base.weight.copy_(self.dense)
                base.weight.requires_grad_(False)
            model = baselines.peft_lora_layer(base, self.A.detach(), self.B.detach(), ALPHA, P)
            params = [p for p in model.parameters() if p.requires_grad]
            return self.step(model, params)
        if name == "torch_compile":
            w = self.weight.packed if self.quant != "none" else self.weight
            return self.step(lambda x: compiled_ref(x, w, self.A, self.B, self.scale, None, P, True, None))
        raise ValueError(f"baseline: unknown name {name!r}")


BASELINES = ("cublas_bf16_dense", "dequant_cublas_lora", "peft_bnb", "peft_bf16", "torch_compile")


def layer_flops(m, k, n, r):
    return 2 * 2 * m * n * k + 2 * m * r * (k + n) * 3  # forward and dX; xa, ·Bᵀ, dY·B, ·A, dA, dB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one shape, M in {1024, 4096}")
    size.add_argument("--full", action="store_true", help="every shape, M in 512..8192, NF4 and dense")
    ap.add_argument("--budget", type=float, default=45.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--out", default="layer.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_layer: needs a CUDA GPU (the fused kernels and every baseline are GPU code); none found")

    from fusedlora.bench import report, results
    from fusedlora.bench.timing import matmul_tflops, peak_memory_bytes, time_ms
    from fusedlora.ops.lora import lora_linear_reference

    t0 = time.perf_counter()
    cases = QUICK if args.quick else FULL if args.full else DEFAULT
    names = [b for b in args.baselines.split(",") if b]
    bnb = _bnb()
    compiled_ref = torch.compile(lora_linear_reference, dynamic=True)
    tflops = matmul_tflops()
    env = results.environment()
    env["ceilings"] = {"matmul_tflops": tflops}
    print(f"bf16 matmul ceiling {tflops:.0f} TFLOP/s; bitsandbytes {'yes' if bnb else 'no'}", flush=True)
    rows = []
    for (k, n), m, quant in cases:
        if time.perf_counter() - t0 > args.budget:
            print(f"budget of {args.budget:.0f} s spent: stopping before {k}->{n} M={m} {quant}", flush=True)
            break
        case = Case(k, n, m, quant, bnb)
        ours = case.ours()
        ours_ms = time_ms(ours)
        ours_mem = peak_memory_bytes(ours)
        pct = 100.0 * layer_flops(m, k, n, R) / (tflops * 1e12) / (ours_ms * 1e-3)
        for name in names:
            fn = case.baseline(name, compiled_ref)
            if fn is None:
                continue
            base_ms = time_ms(fn)
            rows.append(results.make_row(
                bench="layer", shape=(k, n), m=m, r=R, dropout=P, dtype="bf16", quant=quant, ours_ms=ours_ms,
                baseline=name, baseline_ms=base_ms, pct_roofline=pct, ours_peak_mem=ours_mem,
                baseline_peak_mem=peak_memory_bytes(fn)))
            print(f"{k}->{n} M={m} {quant}: ours {ours_ms:.3f} ms, {name} {base_ms:.3f} ms "
                  f"({base_ms / ours_ms:.2f}x)  [{time.perf_counter() - t0:.0f} s]", flush=True)
            results.save(rows, args.out, env)  # after every row: a timeout still leaves the rows so far
        del case
        torch.cuda.empty_cache()
    if not rows:
        print("bench_layer: no rows", file=sys.stderr)
        return 1
    doc = results.save(rows, args.out, env)
    print(report.markdown(doc))
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_layer: unset TRITON_INTERPRET (the interpreter runs kernels on the CPU)")
    sys.exit(main())
