"""Benchmark results: one schema for every bench (DESIGN.md, "Benchmark results", extended here).

{"gpu", "date", "commit", "torch", "triton", "rows": [{"bench", "shape", "m", "r", "dropout", "dtype",
 "quant", "ours_ms", "baseline", "baseline_ms", "speedup", "pct_roofline", "ours_peak_mem",
 "baseline_peak_mem", and optionally "ours_iqr_ms", "baseline_iqr_ms", "variant", "note"}]}

- ``ours_ms``/``baseline_ms`` are medians of repeated timings; ``*_iqr_ms`` their interquartile ranges.
- ``baseline`` names what really ran: DESIGN.md's names on a GPU in bf16; elsewhere the library and dtype
  that ran (``baseline_label``: e.g. ``torch_cpu_fp32_dense`` and ``peft_fp32`` for fp32 on a CPU).
- ``variant``: which variant of ours a row times when a bench has several (e.g. "dora"); absent: the plain one.
- ``note``: why a value needs reading with care; a ``pct_roofline`` above 100 always carries one.
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
BASELINES = ("cublas_bf16", "cublas_bf16_dense", "dequant_cublas_lora", "peft_bnb", "peft_bf16", "bnb", "torch_compile",
             "peft_bnb_dora", "ours_lora")
# These compute less than ours on purpose: the speed of light (no LoRA, no 4-bit), and our LoRA layer
# against our DoRA layer (no magnitude: what DoRA costs on top of it).
SPEED_OF_LIGHT = ("cublas_bf16", "cublas_bf16_dense", "ours_lora")
OPTIONAL_KEYS = ("ours_iqr_ms", "baseline_iqr_ms", "variant", "note")
DTYPES = ("bf16", "fp16", "fp32")
ROW_KEYS = ("bench", "shape", "m", "r", "dropout", "dtype", "quant", "ours_ms", "baseline", "baseline_ms",
            "speedup", "pct_roofline", "ours_peak_mem", "baseline_peak_mem")


def baseline_label(name: str, dtype: str, gpu: bool) -> str:
    """DESIGN.md's baseline ``name`` as it ran: its "cublas" is torch's CPU matmul without a GPU, its "bf16"
    the dtype of the run."""
    label = name.replace("_bf16", f"_{dtype}")
    return label if gpu else label.replace("cublas", "torch_cpu")


# Every label a row may carry: DESIGN.md's names in every dtype, on a GPU or not.
BASELINE_LABELS = {baseline_label(b, d, g): b for b in BASELINES for d in DTYPES for g in (True, False)}


def is_speed_of_light(label: str) -> bool:
    """Whether the baseline computes less than ours on purpose (no LoRA, no 4-bit)."""
    return BASELINE_LABELS.get(label) in SPEED_OF_LIGHT


def commit(root: str | None = None) -> str:
    """HEAD, with "-dirty" when the tree differs from it; FUSEDLORA_COMMIT when there is no git checkout (a
    copy of the tree on another machine), "unknown" when that is unset or empty."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FUSEDLORA_COMMIT", "").strip() or "unknown"


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
             ours_peak_mem=None, baseline_peak_mem=None, ours_iqr_ms=None, baseline_iqr_ms=None, variant=None,
             note=None) -> dict:
    row = {
        "bench": bench, "shape": list(shape), "m": int(m), "r": int(r), "dropout": float(dropout),
        "dtype": dtype, "quant": quant, "ours_ms": float(ours_ms), "baseline": baseline,
        "baseline_ms": float(baseline_ms), "speedup": float(baseline_ms) / float(ours_ms),
        "pct_roofline": None if pct_roofline is None else float(pct_roofline),
        "ours_peak_mem": ours_peak_mem, "baseline_peak_mem": baseline_peak_mem,
    }
    for key, value in (("ours_iqr_ms", ours_iqr_ms), ("baseline_iqr_ms", baseline_iqr_ms)):
        if value is not None:
            row[key] = float(value)
    if variant is not None:
        row["variant"] = variant
    if row["pct_roofline"] is not None and row["pct_roofline"] > 100 and note is None:
        note = ("% of roofline above 100: faster than the ceiling measured in this run, so that measurement "
                "was low (noisy, or a size the library runs slower than this one)")
    if note is not None:
        row["note"] = note
    check_row(row)
    return row


def noisy(rows: list[dict], limit: float) -> list[str]:
    """A warning line per row whose ours or baseline timing spreads more than ``limit`` (IQR / median)."""
    out = []
    for r in rows:
        for side in ("ours", "baseline"):
            iqr = r.get(f"{side}_iqr_ms")
            if iqr is not None and iqr > limit * r[f"{side}_ms"]:
                out.append(f"warning: {r['bench']} {r['shape']} M={r['m']} {r['quant']}: {side} "
                           f"{r[f'{side}_ms']:.4g} ms with an IQR of {iqr:.3g} ms ({100 * iqr / r[f'{side}_ms']:.0f} "
                           f"% of the median): noisy; rerun on an idle machine before reading the speedup")
    return out


def check_row(row: dict) -> None:
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"results row: missing keys {missing}: {row}")
    if row["bench"] not in BENCHES:
        raise ValueError(f"results row: bench expected one of {BENCHES}, got {row['bench']!r}")
    if row["quant"] not in QUANTS:
        raise ValueError(f"results row: quant expected one of {QUANTS}, got {row['quant']!r}")
    if row["baseline"] not in BASELINE_LABELS:
        raise ValueError(f"results row: baseline expected one of {BASELINES} (or, off a GPU or in another "
                         f"dtype, their labels from baseline_label), got {row['baseline']!r}")
    unknown = set(row) - set(ROW_KEYS) - set(OPTIONAL_KEYS)
    if unknown:
        raise ValueError(f"results row: unknown keys {sorted(unknown)}")
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
