"""Benchmark results: one schema for every bench (DESIGN.md, "Benchmark results").

{"gpu", "date", "commit", "torch", "triton", "rows": [{"bench", "shape", "m", "r", "dropout", "dtype",
 "quant", "ours_ms", "baseline", "baseline_ms", "speedup", "pct_roofline", "ours_peak_mem",
 "baseline_peak_mem"}]}
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import subprocess

import torch

BENCHES = ("decode", "layer", "step", "dequant")
QUANTS = ("nf4", "nf4-dq", "int4", "none")
BASELINES = ("cublas_bf16", "cublas_bf16_dense", "dequant_cublas_lora", "peft_bnb", "peft_bf16", "bnb", "torch_compile")
# These two compute less than ours on purpose (no LoRA, no 4-bit): they are the speed of light.
SPEED_OF_LIGHT = ("cublas_bf16", "cublas_bf16_dense")
ROW_KEYS = ("bench", "shape", "m", "r", "dropout", "dtype", "quant", "ours_ms", "baseline", "baseline_ms",
            "speedup", "pct_roofline", "ours_peak_mem", "baseline_peak_mem")


def commit(root: str | None = None) -> str:
    """HEAD, with "-dirty" when the tree differs from it; FUSEDLORA_COMMIT when there is no git checkout."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FUSEDLORA_COMMIT", "unknown")


def environment() -> dict:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def make_row(*, bench, shape, m, r, dropout, dtype, quant, ours_ms, baseline, baseline_ms, pct_roofline=None,
             ours_peak_mem=None, baseline_peak_mem=None) -> dict:
    row = {
        "bench": bench, "shape": list(shape), "m": int(m), "r": int(r), "dropout": float(dropout),
        "dtype": dtype, "quant": quant, "ours_ms": float(ours_ms), "baseline": baseline,
        "baseline_ms": float(baseline_ms), "speedup": float(baseline_ms) / float(ours_ms),
        "pct_roofline": None if pct_roofline is None else float(pct_roofline),
        "ours_peak_mem": ours_peak_mem, "baseline_peak_mem": baseline_peak_mem,
    }
    check_row(row)
    return row


def check_row(row: dict) -> None:
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"results row: missing keys {missing}: {row}")
    if row["bench"] not in BENCHES:
        raise ValueError(f"results row: bench expected one of {BENCHES}, got {row['bench']!r}")
    if row["quant"] not in QUANTS:
        raise ValueError(f"results row: quant expected one of {QUANTS}, got {row['quant']!r}")
    if row["baseline"] not in BASELINES:
        raise ValueError(f"results row: baseline expected one of {BASELINES}, got {row['baseline']!r}")
    if not (row["ours_ms"] > 0 and row["baseline_ms"] > 0):
        raise ValueError(f"results row: times must be positive, got {row['ours_ms']}, {row['baseline_ms']}")


def save(rows: list[dict], path: str, env: dict | None = None) -> dict:
    for row in rows:
        check_row(row)
    doc = {**(env or environment()), "rows": rows}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return doc


def load(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    for key in ("gpu", "date", "commit", "rows"):
        if key not in doc:
            raise ValueError(f"{path}: not a fusedlora results file (missing {key!r})")
    for row in doc["rows"]:
        check_row(row)
    return doc
