"""``fusedlora bench``: runs the bench matrix (or re-renders saved rows) and writes table, JSON and plots."""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch
from tqdm import tqdm

from . import report, results
from .decode import DECODE_MS, DECODE_SHAPES, run_decode
from .dequant import SHAPES as DEQUANT_SHAPES
from .dequant import run as run_dequant
from .layer import run_layer
from .step import STEP_BASELINES, StepCase, llama_config, run_step
from .timing import NOISY_SPREAD
from .timing import ceilings as measure_ceilings

# Llama-3-8B projections (K -> N), DESIGN.md's performance targets.
LLAMA3_8B = [(4096, 4096), (4096, 14336), (14336, 4096)]


def matrix(quick: bool, gpu: bool):
    """[((K, N), M, quant)] and the dtype of the layer bench."""
    if not gpu:  # small sizes so the harness runs anywhere; the numbers are CPU timings of the reference
        return [((256, 384), m, q) for m in (16, 64) for q in ("nf4-dq", "none")], torch.float32
    if quick:
        return [((4096, 4096), m, q) for m in (1024, 4096) for q in ("nf4-dq", "none")], torch.bfloat16
    ms = (512, 1024, 2048, 4096, 8192)
    return [(s, m, q) for s in LLAMA3_8B for m in ms for q in ("nf4-dq", "none")], torch.bfloat16


def dora_matrix(quick: bool, gpu: bool):
    """[((K, N), M, quant, p)] of the DoRA rows: NF4, M = 4096, p = 0 and 0.1 (one shape with ``quick``); on
    a CPU the small size of ``matrix``."""
    if not gpu:
        return [((256, 384), 64, "nf4-dq", p) for p in (0.0, 0.1)]
    return [(s, 4096, "nf4-dq", p) for s in (LLAMA3_8B[:1] if quick else LLAMA3_8B) for p in (0.0, 0.1)]


def step_rows(quick: bool, gpu: bool, ceil: dict) -> list[dict]:
    """The whole-step bench: on a GPU the ~1B model (4 layers with ``quick``) against peft_bnb and peft_bf16;
    on a CPU the tiny model against PEFT over the same fp32 base (labelled peft_fp32; bitsandbytes' CPU
    kernels are not what a QLoRA run uses)."""
    if any(importlib.util.find_spec(m) is None for m in ("transformers", "peft")):
        print("step bench: skipped (needs transformers and peft)")
        return []
    size, seq = ("quick" if quick else "full", 2048) if gpu else ("tiny", 128)
    case = StepCase(llama_config(size, seq), seq=seq)
    rows, failed = run_step(case, baseline_names=STEP_BASELINES if gpu else ("peft_bf16",), ceilings=ceil)
    if failed:
        print(f"step bench: no rows for {', '.join(failed)}: its outputs differ from ours")
    return rows


def run(quick: bool, out_dir: str) -> dict:
    gpu = torch.cuda.is_available()
    cases, dtype = matrix(quick, gpu)
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil['copy_gbs']:.0f} GB/s, matmul {ceil['matmul_tflops']:.3g} TFLOP/s")
    dora_cases = dora_matrix(quick, gpu)
    with tqdm(total=len(cases) + len(dora_cases), desc="layer bench", unit="case") as bar:
        rows = run_layer(cases, dtype=dtype, ceilings=ceil, progress=bar, log=bar.write)
        rows = run_layer(dora_cases, dtype=dtype, ceilings=ceil, progress=bar, log=bar.write, dora=True, rows=rows)
    rows += step_rows(quick, gpu, ceil)
    if gpu:  # the dequant and decode kernels only exist on a GPU (on a CPU both are the reference)
        rows += run_dequant(DEQUANT_SHAPES[:1] if quick else DEQUANT_SHAPES, "bf16", ceil, with_int4=not quick)
        rows += run_decode(DECODE_SHAPES[:1] if quick else DECODE_SHAPES, DECODE_MS, ceilings=ceil)
    else:
        print("dequant and decode benches: skipped (no GPU; they time the CUDA and Triton kernels)")
    for line in results.noisy(rows, NOISY_SPREAD):
        print(line)
    os.makedirs(out_dir, exist_ok=True)
    env = results.environment()
    env["ceilings"] = ceil
    return results.save(rows, os.path.join(out_dir, "results.json"), env)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="kernel and layer benchmarks against the baselines; table, JSON, plots")
    p.add_argument("--quick", action="store_true", help="a small matrix (on CPU the matrix is always small)")
    p.add_argument("--out", default="bench-out", help="output folder (default: ./bench-out)")
    p.add_argument("--from", dest="from_file", metavar="FILE.json", help="render saved rows instead of running")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    doc = results.load(args.from_file) if args.from_file else run(args.quick, args.out)
    written = report.render(doc, args.out)
    print(report.markdown(doc))
    print("wrote", ", ".join([os.path.join(args.out, "results.json")] * (not args.from_file) + written))
    return 0
