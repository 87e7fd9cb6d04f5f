"""Decode bench (GPU): 4-bit + LoRA at M = 1..64 and the first M past the decode's cut-over against bf16
cuBLAS and bitsandbytes, % of copy bandwidth.

    python bench/bench_decode.py [--quick] --out decode.json
"""

import argparse
import sys

import torch

from fusedlora.bench import results
from fusedlora.bench.decode import DECODE_MS, DECODE_SHAPES, run_decode
from fusedlora.bench.timing import ceilings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=40.0, help="stop starting new rows after this many seconds")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    ceil = ceilings()
    shapes = DECODE_SHAPES[:1] if args.quick else DECODE_SHAPES
    env = {**results.environment(), "ceilings": ceil}
    rows = run_decode(shapes, DECODE_MS, ceilings=ceil, budget_s=args.budget, out_path=args.out, env=env)
    results.save(rows, args.out, env)
    print(f"bench_decode: {len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
