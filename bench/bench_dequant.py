"""Dequantize bench (GPU): NF4 (plain, double-quant) and INT4 -> bf16, as GB/s and % of copy bandwidth.

    python bench/bench_dequant.py [--quick] [--dtype bf16|fp16] [--budget SECONDS] [--out dequant.json]

What is counted and compared: fusedlora.bench.dequant.
"""

import argparse
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the rows as a results JSON file here")
    ap.add_argument("--quick", action="store_true", help="one shape, NF4 only")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--budget", type=float, default=50.0, help="start no new shape after this many seconds")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_dequant: needs a CUDA GPU (none visible); nothing measured", file=sys.stderr)
        return 2
    from fusedlora.bench import results
    from fusedlora.bench.dequant import SHAPES, run, table
    from fusedlora.bench.timing import ceilings as measure_ceilings

    ceilings = measure_ceilings()
    env = {**results.environment(), "ceilings": ceilings}
    rows = run(SHAPES[:1] if args.quick else SHAPES, args.dtype, ceilings, with_int4=not args.quick,
               budget_s=args.budget, out_path=args.out, env=env)
    print(table(rows, ceilings))
    if args.out:
        results.save(rows, args.out, env)
        print(f"bench_dequant: {len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
