"""Whole-QLoRA-step bench (GPU): one training step of a ~1B Llama-architecture model, ours against PEFT.

    python bench/bench_step.py [--quick] [--budget SECONDS] [--out step.json]

The model is built from a config (hidden 2048, 16 layers, intermediate 8192, 32 heads, vocab 32000), batch
1 × seq 2048, LoRA r = 16 on every linear layer, dropout 0.1, bf16; ours over NF4 double-quantized bases
against PEFT + bitsandbytes QLoRA (``peft_bnb``, when bitsandbytes imports) and PEFT over the dense bf16
model (``peft_bf16``), as fusedlora.bench.step describes. ``--quick`` keeps every width and the sequence
with 4 layers (the same kernels compile and run; the device check uses it). The baselines run in order and
the rows so far are written after every one, so ``--budget`` (default 60 s) stops the run cleanly. Exits 1
when a baseline's outputs differ from ours (its row is left out).
"""

import argparse
import importlib.util
import os
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 layers instead of 16 (same widths and sequence)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (batch 1)")
    ap.add_argument("--budget", type=float, default=60.0, help="stop starting new baselines after this many seconds")
    ap.add_argument("--baselines", default="peft_bnb,peft_bf16")
    ap.add_argument("--out", default="step.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_step: needs a CUDA GPU (the fused kernels and the bitsandbytes baseline are GPU code); "
                 "none found. `fusedlora bench` runs a tiny step on the CPU.")
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"bench_step: needs {' and '.join(missing)} (pip install 'fusedlora[dev]')")

    from fusedlora.bench import report, results
    from fusedlora.bench.step import StepCase, llama_config, run_step
    from fusedlora.bench.timing import matmul_tflops

    tflops = matmul_tflops()
    env = {**results.environment(), "ceilings": {"matmul_tflops": tflops}}
    print(f"bf16 matmul ceiling {tflops:.0f} TFLOP/s", flush=True)
    case = StepCase(llama_config("quick" if args.quick else "full", args.seq), seq=args.seq)
    names = [b for b in args.baselines.split(",") if b]
    rows, failed = run_step(case, baseline_names=names, ceilings={"matmul_tflops": tflops}, budget_s=args.budget,
                            out_path=args.out, env=env, log=lambda s: print(s, flush=True))
    if rows:
        print(report.markdown(results.save(rows, args.out, env)))
    if failed:
        print(f"bench_step: {', '.join(failed)} computed a different function than ours", file=sys.stderr)
        return 1
    if not rows:
        print("bench_step: no rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_step: unset TRITON_INTERPRET (the interpreter runs kernels on the CPU)")
    sys.exit(main())
