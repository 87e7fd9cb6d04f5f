"""Config sweep (GPU): each candidate tile config of the fused GEMMs (forward and dX) timed alone.

    python bench/sweep_configs.py [--budget SECONDS] [--out sweep.json]

The built-in autotune lists (fusedlora.kernels.lora_fwd: INLOOP_FWD_CONFIGS, INLOOP_DX_CONFIGS,
DENSE_FWD_CONFIGS, DENSE_DX_CONFIGS) are reasoned from the SASS; this measures them and a few neighbours on
the target shapes, forward + backward of the NF4
(double-quant) layer in bf16, r = 16, p = 0.1. Prints one line per (case, config) and the best per case;
writes {"gpu", "date", "commit", "sweep": [...]} (its own format: these are not baseline comparisons).
"""

import argparse
import json
import os
import sys
import time

import torch

CANDIDATES = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, GROUP_M)
    (128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 3, 8),
    (128, 128, 64, 4, 4, 8), (64, 128, 64, 4, 4, 8), (64, 256, 64, 8, 3, 8), (32, 64, 64, 4, 4, 8),
    (64, 64, 64, 4, 5, 8),
]
CASES = [((4096, 4096), 4096), ((4096, 4096), 1024), ((4096, 14336), 4096), ((14336, 4096), 512)]


def main() -> int:
    from fusedlora.bench import results
    from fusedlora.bench.layer import LayerCase
    from fusedlora.bench.timing import time_ms
    from fusedlora.kernels import lora_fwd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=50.0)
    ap.add_argument("--out", default="sweep.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_configs: needs a CUDA GPU")
    t0, out = time.perf_counter(), []
    doc = {**results.environment(), "sweep": out}
    try:
        for (k, n), m in CASES:
            case = LayerCase(m, k, n, 16, torch.bfloat16, "nf4-dq", 0.1, "cuda", copies=3)
            best = None
            for bm, bn, bk, warps, stages, gm in CANDIDATES:
                if time.perf_counter() - t0 > args.budget:
                    print(f"budget of {args.budget:.0f} s spent", flush=True)
                    return 0
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": warps,
                       "num_stages": stages}
                lora_fwd.set_gemm_configs([cfg])
                try:
                    ms = time_ms(case.ours())
                except Exception as exc:  # e.g. out of shared memory for this tile: report and go on
                    print(f"{k}->{n} M={m} {cfg}: failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                out.append({"shape": [k, n], "m": m, "config": cfg, "ms": ms})
                print(f"{k}->{n} M={m} {bm}x{bn}x{bk} w{warps} s{stages}: {ms:.3f} ms", flush=True)
                best = min(best or (ms, cfg), (ms, cfg), key=lambda t: t[0])
            if best:
                print(f"BEST {k}->{n} M={m}: {best[0]:.3f} ms with {best[1]}", flush=True)
    finally:
        lora_fwd.set_gemm_configs(None)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("sweep_configs: unset TRITON_INTERPRET")
    sys.exit(main())
