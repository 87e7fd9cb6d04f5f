"""Training-layer bench (GPU): forward + backward of one LoRA linear, ours against the baselines.

    python bench/bench_layer.py [--quick | --full | --dora] [--budget SECONDS] [--out layer.json]

Llama-3-8B projections (K→N: 4096→4096, 4096→14336, 14336→4096), r = 16, p = 0.1, bf16, NF4 (blocksize
64, double-quantized like a QLoRA checkpoint) and a dense bf16 base; the cases and baselines are those of
fusedlora.bench.layer. Then the DoRA rows: 4096→4096, M = 4096, NF4, p = 0 and 0.1, our DoRA layer against
PEFT's DoRA over bitsandbytes and against our LoRA layer (``--dora``: only those). The matrix runs in
priority order (the device-check matrix: its first shape, M = 4096, then the DoRA rows, then the rest) and
the rows so far are written after every row, so ``--budget`` (default 45 s, for the device check's slot)
stops it cleanly; ``--full`` runs every M in 512..8192.
"""

import argparse
import os
import sys
import time

import torch

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
QUICK = [((4096, 4096), m, q) for m in (4096, 1024) for q in ("nf4-dq", "none")]
# the device-check matrix: the target sizes (M = 4096, 8192 and 512..2048) first, one shape at a time
DEFAULT = [((4096, 4096), m, q) for m in (4096, 8192, 1024) for q in ("nf4-dq", "none")] + \
          [(s, m, "nf4-dq") for s in SHAPES[1:] for m in (4096, 512)]
FULL = [(s, m, q) for s in SHAPES for m in (512, 1024, 2048, 4096, 8192) for q in ("nf4-dq", "none")]
DORA = [((4096, 4096), 4096, "nf4-dq", p) for p in (0.0, 0.1)]  # (K, N), M, quant, dropout


def main() -> int:
    from fusedlora.bench import report, results
    from fusedlora.bench.layer import LAYER_BASELINES, run_layer
    from fusedlora.bench.timing import matmul_tflops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one shape, M in {1024, 4096}")
    size.add_argument("--full", action="store_true", help="every shape, M in 512..8192, NF4 and dense")
    size.add_argument("--dora", action="store_true", help="only the DoRA rows")
    ap.add_argument("--budget", type=float, default=45.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--baselines", default=",".join(LAYER_BASELINES))
    ap.add_argument("--out", default="layer.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_layer: needs a CUDA GPU (the fused kernels and every baseline are GPU code); none found")
    tflops = matmul_tflops()
    env = {**results.environment(), "ceilings": {"matmul_tflops": tflops}}
    print(f"bf16 matmul ceiling {tflops:.0f} TFLOP/s", flush=True)
    cases = [] if args.dora else QUICK if args.quick else FULL if args.full else DEFAULT
    names = [b for b in args.baselines.split(",") if b]
    common = dict(ceilings={"matmul_tflops": tflops}, out_path=args.out, env=env, log=lambda s: print(s, flush=True))
    t0 = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - t0)

    first = 0 if args.quick or args.full else 2  # the device-check matrix: DoRA right after 4096², M = 4096
    rows = run_layer(cases[:first], baseline_names=names, budget_s=args.budget, **common) if first else []
    if left() > 0:
        rows = run_layer(DORA, dora=True, budget_s=left(), rows=rows, **common)
    else:
        print(f"budget of {args.budget:.0f} s spent: no DoRA rows", flush=True)
    if left() > 0 and cases[first:]:
        rows = run_layer(cases[first:], baseline_names=names, budget_s=left(), rows=rows, **common)
    if not rows:
        print("bench_layer: no rows", file=sys.stderr)
        return 1
    print(report.markdown(results.save(rows, args.out, env)))
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_layer: unset TRITON_INTERPRET (the interpreter runs kernels on the CPU)")
    sys.exit(main())
