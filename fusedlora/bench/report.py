"""Rendering results: a Markdown table and PNG plots (speedup vs M per shape, % of roofline)."""

from __future__ import annotations

import os
from collections import defaultdict

from .results import SPEED_OF_LIGHT


def shape_label(row: dict) -> str:
    """K→N for a layer-shaped row; hidden × layers for a whole-model step row."""
    a, b = row["shape"]
    return f"h{a}×{b}L" if row["bench"] == "step" else f"{a}→{b}"


def _mem(v):
    return "" if v is None else f"{v / 2**20:.0f}"


def markdown(doc: dict) -> str:
    lines = [
        f"GPU: {doc['gpu']} | date: {doc['date']} | commit: {doc['commit']} | torch {doc.get('torch', '?')}"
        f" | triton {doc.get('triton', '?')}",
        "",
        "| bench | shape | M | quant | dtype | baseline | ours ms | baseline ms | speedup | % roofline"
        " | ours MiB | baseline MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        base = r["baseline"] + (" (computes less)" if r["baseline"] in SPEED_OF_LIGHT else "")
        pct = "" if r["pct_roofline"] is None else f"{r['pct_roofline']:.0f}"
        lines.append(
            f"| {r['bench']} | {shape_label(r)} | {r['m']} | {r['quant']} | {r['dtype']} | {base}"
            f" | {r['ours_ms']:.4g} | {r['baseline_ms']:.4g} | {r['speedup']:.2f}× | {pct}"
            f" | {_mem(r['ours_peak_mem'])} | {_mem(r['baseline_peak_mem'])} |")
    return "\n".join(lines) + "\n"


def plots(doc: dict, out_dir: str) -> list[str]:
    """One PNG per bench: speedup against M, a line per (shape, quant, baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_bench = defaultdict(list)
    for r in doc["rows"]:
        by_bench[r["bench"]].append(r)
    for bench, rows in by_bench.items():
        series = defaultdict(list)
        for r in rows:
            series[(shape_label(r), r["quant"], r["baseline"])].append((r["m"], r["speedup"], r["pct_roofline"]))
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for (shape, quant, base), pts in sorted(series.items()):
            pts.sort()
            label = f"{shape} {quant} vs {base}"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if pts[0][2] is not None:
                axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
        axes[0].axhline(1.0, color="grey", lw=0.8)
        axes[0].set(xscale="log", xlabel="M (tokens)", ylabel="speedup (baseline ms / ours ms)",
                    title=f"{bench}: speedup")
        axes[1].set(xscale="log", xlabel="M (tokens)", ylabel="% of measured roofline", title=f"{bench}: % roofline")
        axes[0].legend(fontsize=6)
        fig.suptitle(f"{doc['gpu']} · {doc['date']} · {doc['commit'][:12]}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{bench}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def render(doc: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(markdown(doc))
    return [md, *plots(doc, out_dir)]
