"""Dequantize bench: NF4 (plain, double-quant) and INT4 -> bf16/fp16, as GB/s and % of copy bandwidth.

Bytes counted = bytes read (packed codes, absmax or its 8-bit codes + nested state, INT4 scales/zeros)
+ bytes written (N*K outputs). % of roofline is against the device-to-device copy bandwidth measured in
the same run (target >= 85%). Each call takes the next of several weight copies whose total exceeds L2,
so no weight is read from cache. Baseline: bitsandbytes' dequantize_4bit when it is installed, else the
plain reference under torch.compile. Rows follow DESIGN.md's results schema ("bench": "dequant",
"m": 0), the implementation timed (cuda or triton) as the row's "variant"; GB/s is pct_roofline of the
run's copy bandwidth.
"""

import dataclasses

import torch

from ..formats import dequantize_reference
from ..ops import dequantize
from ..ops.backend import forced, why_not
from ..quantized import QuantizedWeight, quantize
from . import results
from .baselines import bitsandbytes, bnb_quant_state
from .timing import Budget, time_ms

# Llama-3-8B projections, W [N, K]; the results schema records [K, N].
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
L2_BYTES = 64 << 20  # above the L2 of an H100/H200 (50-60 MB)


def packed_bytes(p) -> int:
    return sum(t.numel() * t.element_size() for t in (p.data, p.absmax, p.nested_absmax, p.nested_code, p.scales,
                                                      p.zeros) if t is not None)


def clone(qw):
    p = qw.packed
    fields = ("data", "absmax", "nested_absmax", "nested_code", "scales", "zeros")
    return QuantizedWeight(dataclasses.replace(p, **{f: getattr(p, f).clone() for f in fields
                                                     if getattr(p, f) is not None}), qw.dtype)


def rotating(make, copies: int):
    """A zero-argument callable running ``make(i)`` on the next of ``copies`` inputs each call."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        return make(state["i"])

    return call


def run(shapes, dtype_name: str, ceilings: dict, with_int4: bool = True, device: str = "cuda",
        budget_s: float = float("inf"), out_path: str | None = None, env: dict | None = None) -> list[dict]:
    """Rows for each shape and format; those not started within ``budget_s`` seconds are skipped (and said
    so). ``out_path`` is rewritten (with ``env``) after each format, so a timeout (the INT4 baseline compiles
    with inductor) still leaves the rows so far."""
    dtype = DTYPES[dtype_name]
    families = [f for f in ("cuda", "triton") if why_not(f, torch.device(device)) is None]
    bnb = bitsandbytes()
    bnbf = None if bnb is None else bnb.functional
    rows = []
    budget = Budget(budget_s)
    for n, k in shapes:
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        cases = [("nf4", dict(scheme="nf4", blocksize=64, double_quant=False)),
                 ("nf4-dq", dict(scheme="nf4", blocksize=64, double_quant=True))]
        if with_int4:
            cases.append(("int4", dict(scheme="int4", group_size=128)))
        for quant, kwargs in cases:
            if budget.spent(f"W [{n}, {k}] {quant}"):
                return rows
            qw = quantize(w, **kwargs)  # the reference quantizer runs on the GPU tensors
            moved = packed_bytes(qw.packed) + n * k * torch.finfo(dtype).bits // 8
            copies = max(2, -(-L2_BYTES // moved) + 1)
            weights = [qw] + [clone(qw) for _ in range(copies - 1)]
            baseline, base_ms = _baseline(quant, weights, dtype, bnbf)
            for fam in families:
                if fam == "cuda" and quant == "int4":
                    continue  # the cuda family runs the Triton INT4 kernel: the triton row already has it
                with forced(fam):
                    ms = time_ms(rotating(lambda i, ws=weights: dequantize(ws[i].packed, dtype), copies))
                gbs = moved / (ms * 1e-3) / 1e9
                rows.append(results.make_row(
                    bench="dequant", shape=(k, n), m=0, r=0, dropout=0.0, dtype=dtype_name, quant=quant,
                    ours_ms=ms, baseline=baseline, baseline_ms=base_ms, pct_roofline=100 * gbs / ceilings["copy_gbs"],
                    variant=fam,
                ))
            if out_path is not None:
                results.save(rows, out_path, env)
    return rows


def _baseline(quant, weights, dtype, bnbf):
    copies = len(weights)
    if bnbf is not None and quant != "int4":
        states = [bnb_quant_state(bnbf, qw.packed, dtype) for qw in weights]
        ms = time_ms(rotating(lambda i: bnbf.dequantize_4bit(weights[i].packed.data, states[i]), copies))
        return "bnb", ms
    # static shapes (dynamic=True trips an inductor bug on this graph); the time budget bounds the compiles
    ref = torch.compile(dequantize_reference, dynamic=False)
    return "torch_compile", time_ms(rotating(lambda i: ref(weights[i].packed, dtype), copies))


def table(rows, ceilings) -> str:
    lines = [f"dequant -> bf16/fp16   copy bandwidth {ceilings['copy_gbs']:.0f} GB/s (read + write), target >= 85%",
             f"{'W [N, K]':>14} {'quant':>7} {'ours':>7} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'baseline':>14} "
             f"{'base ms':>8} {'speedup':>8}"]
    for r in rows:
        k, n = r["shape"]
        gbs = r["pct_roofline"] * ceilings["copy_gbs"] / 100
        lines.append(f"{f'{n}x{k}':>14} {r['quant']:>7} {r['variant']:>7} {r['ours_ms']:8.4f} {gbs:7.0f} "
                     f"{r['pct_roofline']:6.1f}% {r['baseline']:>14} {r['baseline_ms']:8.4f} {r['speedup']:7.2f}x")
    return "\n".join(lines)
