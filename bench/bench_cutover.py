"""Cut-over bench (GPU): where each GEMM over a 4-bit weight should switch from decoding in its loop to the
dequant path, measured.

    python bench/bench_cutover.py [--budget SECONDS] [--out cutovers.json]

For NF4 with double quantization and INT4 (bf16, r = 16, dropout 0.1) on Llama-3-8B projections, times the
forward and the backward of one layer with each GEMM forced onto each path (``fusedlora.ops.paths``), over
M = 256..8192. A GEMM's measured cut-over is the smallest M of the grid from which its dequant path was
faster at every larger M on every shape timed (null: never). Writes {"gpu", "date", "commit", "<fmt>-<gemm>":
M or null, ..., "rows": [...]}: the device check copies it to fusedlora/ops/cutovers.json, which the
dispatcher reads; rows keep the times the decision came from.
"""

import argparse
import json
import os
import sys
import time

import torch

SHAPES = ((4096, 4096), (4096, 14336))  # (K, N)
TOKENS = (256, 512, 1024, 2048, 4096, 8192)
FORMATS = ("nf4-dq", "int4")


def time_gemms(case, path: str) -> dict:
    """Milliseconds of the forward and of the backward of ``case`` with both GEMMs forced onto ``path``."""
    from fusedlora.bench.timing import time_ms
    from fusedlora.ops.lora import lora_linear
    from fusedlora.ops.paths import forced_path

    def forward():
        return lora_linear(case.x, case.weight, case.A, case.B, case.scale, None, case.p, True)

    with forced_path(path):
        fwd = time_ms(forward)
        y = forward()
        bwd = time_ms(lambda: torch.autograd.grad(y, (case.x, case.A, case.B), case.dy, retain_graph=True))
    return {"fwd": fwd, "dx": bwd}


def cutover(rows: list[dict], fmt: str, gemm: str):
    """Smallest M from which the dequant path was faster at every larger M, on every shape; None: never."""
    ms = sorted({r["m"] for r in rows if r["quant"] == fmt})
    faster = {m: all(r["dequant"][gemm] < r["inloop"][gemm] for r in rows if r["quant"] == fmt and r["m"] == m)
              for m in ms}
    cut = None
    for m in reversed(ms):
        if not faster[m]:
            break
        cut = m
    return cut


def main() -> int:
    from fusedlora.bench import results
    from fusedlora.bench.layer import LayerCase

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=40.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--out", default="cutovers.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cutover: needs a CUDA GPU; none found")
    t0, rows = time.perf_counter(), []
    doc = results.environment()
    # M descending within each shape: the large-M decisions (the ones that matter most) come first
    cases = [(fmt, s, m) for fmt in FORMATS for s in SHAPES for m in reversed(TOKENS)]
    for fmt, (k, n), m in cases:
        if time.perf_counter() - t0 > args.budget:
            print(f"budget of {args.budget:.0f} s spent; cut-overs from the rows so far", flush=True)
            break
        case = LayerCase(m, k, n, 16, torch.bfloat16, fmt, 0.1, "cuda")
        row = {"quant": fmt, "shape": [k, n], "m": m, **{p: time_gemms(case, p) for p in ("inloop", "dequant")}}
        rows.append(row)
        print(f"cutover {fmt} {k}->{n} M={m}: fwd in-loop {row['inloop']['fwd']:.3f} / dequant "
              f"{row['dequant']['fwd']:.3f} ms; bwd in-loop {row['inloop']['dx']:.3f} / dequant "
              f"{row['dequant']['dx']:.3f} ms", flush=True)
        del case
    for fmt in FORMATS:
        for gemm in ("fwd", "dx"):
            if any(r["quant"] == fmt for r in rows):
                doc[f"{fmt.split('-')[0]}-{gemm}"] = cutover(rows, fmt, gemm)
    doc["rows"] = rows
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print("cutovers:", {k: v for k, v in doc.items() if k.endswith(("-fwd", "-dx"))}, flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_cutover: unset TRITON_INTERPRET")
    sys.exit(main())
