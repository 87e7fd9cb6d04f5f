"""Dequantize bench (GPU): NF4 (plain, double-quant) and INT4 -> bf16, as GB/s and % of copy bandwidth.

    python bench/bench_dequant.py [--quick] [--dtype bf16|fp16] [--out dequant.json]

Bytes counted = bytes read (packed codes, absmax or its 8-bit codes + nested state, INT4 scales/zeros)
+ bytes written (N*K outputs). % of roofline is against the device-to-device copy bandwidth measured in
the same run (target >= 85%). Times are triton.testing.do_bench medians (L2 flushed before every
repetition), and each call also takes the next of several weight copies whose total exceeds L2, so no
weight is read from cache. Baseline: bitsandbytes' dequantize_4bit when it is installed, else the plain
reference under torch.compile. Rows follow DESIGN.md's results schema ("bench": "dequant", "m": 0), with
an extra "ours" field naming the implementation (cuda or triton).
"""

import argparse
import sys

import torch

# Llama-3-8B projections, W [N, K]; the results schema records [K, N].
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
L2_BYTES = 64 << 20  # above the L2 of an H100/H200 (50-60 MB)


def packed_bytes(p) -> int:
    return sum(t.numel() * t.element_size() for t in (p.data, p.absmax, p.nested_absmax, p.nested_code, p.scales,
                                                      p.zeros) if t is not None)


def clone(qw):
    import dataclasses

    from fusedlora import QuantizedWeight

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


def bnb_functional():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # not installed, or installed without a working GPU library
        return None
    return bnbf


def run(shapes, dtype_name: str, ceilings: dict, with_int4: bool = True, device: str = "cuda",
        budget_s: float = float("inf")) -> list[dict]:
    """Rows for each shape; shapes not started within ``budget_s`` seconds are skipped (and said so)."""
    import time

    import fusedlora as fl
    from fusedlora.bench import results
    from fusedlora.bench.timing import time_ms
    from fusedlora.ops import dequantize
    from fusedlora.ops.backend import why_not

    dtype = DTYPES[dtype_name]
    families = [f for f in ("cuda", "triton") if why_not(f, torch.device(device)) is None]
    bnbf = bnb_functional()
    rows = []
    t0 = time.perf_counter()
    for n, k in shapes:
        if time.perf_counter() - t0 > budget_s:
            print(f"bench_dequant: time budget of {budget_s:.0f} s spent; skipped W [{n}, {k}] and after")
            break
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        cases = [("nf4", dict(scheme="nf4", blocksize=64, double_quant=False)),
                 ("nf4-dq", dict(scheme="nf4", blocksize=64, double_quant=True))]
        if with_int4:
            cases.append(("int4", dict(scheme="int4", group_size=128)))
        for quant, kwargs in cases:
            qw = fl.quantize(w, **kwargs)  # the reference quantizer runs on the GPU tensors
            moved = packed_bytes(qw.packed) + n * k * torch.finfo(dtype).bits // 8
            copies = max(2, -(-L2_BYTES // moved) + 1)
            weights = [qw] + [clone(qw) for _ in range(copies - 1)]
            baseline, base_ms = _baseline(quant, weights, dtype, bnbf, time_ms)
            for fam in families:
                if fam == "cuda" and quant == "int4":
                    continue  # the cuda family runs the Triton INT4 kernel: the triton row already has it
                _force(fam)
                try:
                    ms = time_ms(rotating(lambda i, ws=weights: dequantize(ws[i].packed, dtype), copies))
                finally:
                    _force(None)
                gbs = moved / (ms * 1e-3) / 1e9
                row = results.make_row(
                    bench="dequant", shape=(k, n), m=0, r=0, dropout=0.0, dtype=dtype_name, quant=quant,
                    ours_ms=ms, baseline=baseline, baseline_ms=base_ms, pct_roofline=100 * gbs / ceilings["copy_gbs"],
                )
                row["ours"] = fam
                row["gbs"] = gbs
                rows.append(row)
    return rows


def _force(family):
    import os

    if family is None:
        os.environ.pop("FUSEDLORA_BACKEND", None)
    else:
        os.environ["FUSEDLORA_BACKEND"] = family


def _baseline(quant, weights, dtype, bnbf, time_ms):
    copies = len(weights)
    if bnbf is not None and quant != "int4":
        states = [_bnb_state(bnbf, qw.packed, dtype) for qw in weights]
        ms = time_ms(rotating(lambda i: bnbf.dequantize_4bit(weights[i].packed.data, states[i]), copies))
        return "bnb", ms
    from fusedlora.formats import dequantize_reference

    # static shapes (dynamic=True trips an inductor bug on this graph); the time budget bounds the compiles
    ref = torch.compile(dequantize_reference, dynamic=False)
    return "torch_compile", time_ms(rotating(lambda i: ref(weights[i].packed, dtype), copies))


def _bnb_state(bnbf, p, dtype):
    """bitsandbytes' QuantState over our tensors (the same bytes: the formats are identical)."""
    code = bnbf.get_4bit_type("nf4", device=p.data.device)
    if not p.double_quant:
        return bnbf.QuantState(absmax=p.absmax, shape=torch.Size(p.shape), code=code, blocksize=p.block,
                               quant_type="nf4", dtype=dtype)
    state2 = bnbf.QuantState(absmax=p.nested_absmax, code=p.nested_code, blocksize=256, dtype=torch.float32)
    return bnbf.QuantState(absmax=p.absmax, shape=torch.Size(p.shape), code=code, blocksize=p.block,
                           quant_type="nf4", dtype=dtype,
                           offset=torch.tensor(p.nested_offset, device=p.data.device), state2=state2)


def table(rows, ceilings) -> str:
    lines = [f"dequant -> bf16/fp16   copy bandwidth {ceilings['copy_gbs']:.0f} GB/s (read + write), target >= 85%",
             f"{'W [N, K]':>14} {'quant':>7} {'ours':>7} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'baseline':>14} "
             f"{'base ms':>8} {'speedup':>8}"]
    for r in rows:
        k, n = r["shape"]
        lines.append(f"{f'{n}x{k}':>14} {r['quant']:>7} {r['ours']:>7} {r['ours_ms']:8.4f} {r['gbs']:7.0f} "
                     f"{r['pct_roofline']:6.1f}% {r['baseline']:>14} {r['baseline_ms']:8.4f} {r['speedup']:7.2f}x")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the rows as a results JSON file here")
    ap.add_argument("--quick", action="store_true", help="one shape, NF4 only")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--budget-s", type=float, default=50.0,
                    help="start no new shape after this many seconds (the device check gives a bench 75 s)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_dequant: needs a CUDA GPU (none visible); nothing measured", file=sys.stderr)
        return 2
    from fusedlora.bench import results
    from fusedlora.bench.timing import ceilings as measure_ceilings

    ceilings = measure_ceilings()
    rows = run(SHAPES[:1] if args.quick else SHAPES, args.dtype, ceilings, with_int4=not args.quick,
               budget_s=args.budget_s)
    print(table(rows, ceilings))
    if args.out:
        results.save(rows, args.out, {**results.environment(), "ceilings": ceilings})
        print(f"bench_dequant: {len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
