"""Cut-over bench (GPU): where each GEMM over a 4-bit weight should switch from decoding in its loop to the
dequant path, measured.

    python bench/bench_cutover.py [--budget SECONDS] [--out cutovers.json]

For NF4 with double quantization and INT4 (bf16, r = 16, dropout 0.1) on Llama-3-8B projections, times the
forward and the backward of one layer with each GEMM forced onto each path (``fusedlora.ops.paths``), over
M = 8192 down to 256, every shape at one M before the next M. A GEMM's measured cut-over is the smallest M
from which its dequant path was faster at every larger M on every shape (null: never). Only the M that
were timed on every shape decide: when the budget runs out, the M it cut short is left out, and a format
with no such M gets no key (the dispatcher keeps its arithmetic rule there); the summary says down to
which M each format was measured. Writes {"gpu", "date", "commit", "<fmt>-<gemm>": M or null, ...,
"rows": [...]}: the device check copies it to fusedlora/ops/cutovers.json, which the dispatcher reads;
rows keep the times the decisions came from.
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


def complete_ms(rows: list[dict], fmt: str, shapes=SHAPES) -> list[int]:
    """The M (ascending) at which format ``fmt`` was timed on every one of ``shapes``."""
    timed: dict[int, set] = {}
    for r in rows:
        if r["quant"] == fmt:
            timed.setdefault(r["m"], set()).add(tuple(r["shape"]))
    return sorted(m for m, got in timed.items() if got >= set(map(tuple, shapes)))


def cutover(rows: list[dict], fmt: str, gemm: str, shapes=SHAPES):
    """Smallest M from which the dequant path was faster at every larger M, on every one of ``shapes``, among
    the M timed on all of them; None: never (or no such M: ``decide`` then writes no key)."""
    ms = complete_ms(rows, fmt, shapes)
    cut = None
    for m in reversed(ms):
        if not all(r["dequant"][gemm] < r["inloop"][gemm] for r in rows if r["quant"] == fmt and r["m"] == m):
            break
        cut = m
    return cut


def decide(rows: list[dict], shapes=SHAPES) -> dict:
    """The cut-over keys ("<fmt>-<gemm>": M or None) of every format with at least one M timed on every shape,
    and "measured_down_to" ({fmt: the smallest such M})."""
    doc, down_to = {}, {}
    for fmt in FORMATS:
        ms = complete_ms(rows, fmt, shapes)
        if not ms:
            continue
        down_to[fmt] = ms[0]
        for gemm in ("fwd", "dx"):
            doc[f"{fmt.split('-')[0]}-{gemm}"] = cutover(rows, fmt, gemm, shapes)
    doc["measured_down_to"] = down_to
    return doc


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
    # M descending, every shape at one M before the next: the large-M decisions (the ones that matter most)
    # come first, and a budget cut leaves at most one M partly timed
    cases = [(fmt, s, m) for fmt in FORMATS for m in reversed(TOKENS) for s in SHAPES]
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
    decided = decide(rows)
    doc.update(decided)
    doc["rows"] = rows
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print("cutovers:", {k: v for k, v in decided.items() if k.endswith(("-fwd", "-dx"))},
          "| measured on every shape down to M =", decided["measured_down_to"] or "none (no key written)",
          flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_cutover: unset TRITON_INTERPRET")
    sys.exit(main())
