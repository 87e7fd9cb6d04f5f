"""Rendering results: a Markdown table (medians ± IQR, notes as footnotes) and PNG plots per bench: speedup
against M, a line per (shape, quant, variant, baseline), and % of roofline, a line per (shape, quant,
variant) (it is ours alone, the same for every baseline); the dropout p joins the label of a bench whose
rows have several. With fewer than three token counts the panels are bars instead, and the M axis is
logarithmic only when M spans a factor of 8 or more."""

from __future__ import annotations

import os
from collections import defaultdict

from .results import is_speed_of_light


def shape_label(row: dict) -> str:
    """K→N for a layer-shaped row; hidden × layers for a whole-model step row."""
    a, b = row["shape"]
    return f"h{a}×{b}L" if row["bench"] == "step" else f"{a}→{b}"


def _mem(v):
    return "" if v is None else f"{v / 2**20:.0f}"


def _ms(row: dict, side: str) -> str:
    iqr = row.get(f"{side}_iqr_ms")
    return f"{row[f'{side}_ms']:.4g}" + ("" if iqr is None else f" ± {iqr:.2g}")


def markdown(doc: dict) -> str:
    lines = [
        f"GPU: {doc['gpu']} | date: {doc['date']} | commit: {doc['commit']} | torch {doc.get('torch', '?')}"
        f" | triton {doc.get('triton', '?')}",
        "",
        "Times: median ± interquartile range of repeated runs.",
        "",
        "| bench | shape | M | p | quant | dtype | baseline | ours ms | baseline ms | speedup | % roofline"
        " | ours MiB | baseline MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for r in doc["rows"]:
        base = r["baseline"] + (" (computes less)" if is_speed_of_light(r["baseline"]) else "")
        ours = "ours" if r.get("variant") is None else f"ours ({r['variant']})"
        pct = "" if r["pct_roofline"] is None else f"{r['pct_roofline']:.0f}"
        if r.get("note"):
            if r["note"] not in notes:
                notes.append(r["note"])
            pct += f" [{notes.index(r['note']) + 1}]"
        lines.append(
            f"| {r['bench']} | {shape_label(r)} | {r['m']} | {r['dropout']:g} | {r['quant']} | {r['dtype']} | {base}"
            f" | {_ms(r, 'ours')}{'' if ours == 'ours' else ' ' + ours} | {_ms(r, 'baseline')}"
            f" | {r['speedup']:.2f}× | {pct} | {_mem(r['ours_peak_mem'])} | {_mem(r['baseline_peak_mem'])} |")
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)] if notes else []
    return "\n".join(lines) + "\n"


def _axis_m(ax, ms: list[int]) -> None:
    """M on a log axis only when it spans a factor of 8 or more; ticks at the measured M, in plain numbers."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    if max(ms) >= 8 * min(ms):
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(ms))))
    ax.xaxis.set_minor_locator(NullLocator())
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.xaxis.set_major_formatter(fmt)
    ax.set_xlabel("M (tokens)")


def _panel(ax, series: dict, ylabel: str, title: str, ref: float | None = None) -> None:
    """Lines against M, or bars when there are fewer than three M values (a line through one or two points
    says little); ``ref``: a grey line at that value."""
    ms = sorted({m for pts in series.values() for m, _ in pts})
    if len(ms) < 3:
        labels = [f"{label} M={m}" for label, pts in series.items() for m, _ in sorted(pts)]
        values = [v for pts in series.values() for _, v in sorted(pts)]
        ax.barh(range(len(values)), values)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.set_xlabel(ylabel)
        if ref is not None:
            ax.axvline(ref, color="grey", lw=0.8)
    else:
        for label, pts in series.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        _axis_m(ax, ms)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        if ref is not None:
            ax.axhline(ref, color="grey", lw=0.8)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plots(doc: dict, out_dir: str) -> list[str]:
    """One PNG per bench: speedup per (shape, quant, baseline) and ours' % of roofline per (shape, quant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_bench = defaultdict(list)
    for r in doc["rows"]:
        by_bench[r["bench"]].append(r)
    for bench, rows in by_bench.items():
        speed, roof = defaultdict(set), defaultdict(set)
        several_p = len({r["dropout"] for r in rows}) > 1  # then p tells the series apart
        for r in rows:
            who = ("" if r.get("variant") is None else f" {r['variant']}") + (f" p={r['dropout']:g}" * several_p)
            speed[f"{shape_label(r)} {r['quant']}{who} vs {r['baseline']}"].add((r["m"], r["speedup"]))
            if r["pct_roofline"] is not None:
                roof[f"{shape_label(r)} {r['quant']}{who}"].add((r["m"], r["pct_roofline"]))
        fig, axes = plt.subplots(1, 2 if roof else 1, figsize=(13 if roof else 7, 5), squeeze=False)
        _panel(axes[0][0], dict(sorted(speed.items())), "speedup (baseline ms / ours ms)", f"{bench}: speedup",
               ref=1.0)
        if roof:
            _panel(axes[0][1], dict(sorted(roof.items())), "% of the roofline measured in the run",
                   f"{bench}: ours, % of roofline")
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
