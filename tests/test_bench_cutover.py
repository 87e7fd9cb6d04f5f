"""bench/bench_cutover.py's decision on canned timings: the smallest M from which the dequant path wins
at every larger M on every shape (the measurement itself needs a GPU and runs in the device check)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_cutover  # noqa: E402


def _row(m, shape, fwd, dx, quant="nf4-dq"):
    # (in-loop, dequant) milliseconds per GEMM
    return {"quant": quant, "shape": list(shape), "m": m, "inloop": {"fwd": fwd[0], "dx": dx[0]},
            "dequant": {"fwd": fwd[1], "dx": dx[1]}}


def test_cutover_is_the_start_of_the_dequant_run():
    a, b = (4096, 4096), (4096, 14336)
    rows = [
        _row(512, a, (1.0, 2.0), (1.0, 2.0)), _row(512, b, (1.0, 2.0), (1.0, 2.0)),
        _row(1024, a, (1.0, 2.0), (2.0, 1.0)), _row(1024, b, (1.0, 2.0), (1.5, 1.6)),  # one shape disagrees
        _row(2048, a, (1.0, 2.0), (2.0, 1.0)), _row(2048, b, (1.0, 2.0), (2.0, 1.0)),
        _row(4096, a, (2.0, 1.0), (2.0, 1.0)), _row(4096, b, (1.0, 2.0), (2.0, 1.0)),
    ]
    assert bench_cutover.cutover(rows, "nf4-dq", "dx") == 2048
    assert bench_cutover.cutover(rows, "nf4-dq", "fwd") is None  # in-loop still won at the largest M on b
    # an M timed on one shape only (a budget cut) decides nothing
    rows.append(_row(8192, a, (1.0, 2.0), (1.0, 2.0)))
    assert bench_cutover.cutover(rows, "nf4-dq", "dx") == 2048
    # a win at small M followed by a loss does not count: the run must reach the largest M
    rows.append(_row(8192, b, (1.0, 2.0), (2.0, 1.0)))
    assert bench_cutover.cutover(rows, "nf4-dq", "dx") is None
    assert bench_cutover.cutover(rows, "int4", "dx") is None  # no rows of that format


def test_a_budget_cut_keeps_the_arithmetic_rule_where_nothing_was_timed_whole(tmp_path):
    """decide: a format with no M timed on every shape gets no key, so the dispatcher (which reads only the
    keys present) keeps its arithmetic cut-over there; the other format's keys come from its whole M."""
    from fusedlora.ops import paths

    a, b = (4096, 4096), (4096, 14336)
    rows = [_row(8192, a, (2.0, 1.0), (2.0, 1.0)), _row(8192, b, (2.0, 1.0), (2.0, 1.0)),
            _row(4096, a, (1.0, 2.0), (2.0, 1.0)), _row(4096, b, (1.0, 2.0), (2.0, 1.0)),
            _row(2048, a, (2.0, 1.0), (1.0, 2.0)),  # cut short: shape b never ran at 2048
            _row(8192, a, (2.0, 1.0), (2.0, 1.0), quant="int4")]
    doc = bench_cutover.decide(rows, shapes=(a, b))
    assert doc == {"nf4-fwd": 8192, "nf4-dx": 4096, "measured_down_to": {"nf4-dq": 4096}}
    table = tmp_path / "cutovers.json"
    table.write_text(json.dumps({"gpu": "test", **doc, "rows": rows}))
    got = paths._load_cutovers(table)
    assert got == {**paths.ARITHMETIC_CUTOVERS, "nf4-fwd": 8192, "nf4-dx": 4096}
    assert got["int4-dx"] == paths.ARITHMETIC_CUTOVERS["int4-dx"] == 2048
