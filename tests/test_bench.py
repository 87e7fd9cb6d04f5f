"""The bench harness: results schema, rendering, and that every baseline claiming our function computes it."""

import json
import time

import pytest
import torch

import fusedlora as fl
from fusedlora.bench import baselines, report, results
from fusedlora.bench.layer import LayerCase
from fusedlora.ops.lora import draw_dropout_mask_reference, lora_linear_reference


def _rows():
    return [results.make_row(bench="layer", shape=(64, 96), m=m, r=4, dropout=0.1, dtype="fp32", quant="nf4",
                             ours_ms=1.0 + m / 100, baseline=b, baseline_ms=2.0, pct_roofline=50.0)
            for m in (16, 64) for b in ("dequant_cublas_lora", "cublas_bf16_dense")]


def test_schema_round_trip_and_render(tmp_path):
    doc = results.save(_rows(), str(tmp_path / "r.json"))
    assert set(("gpu", "date", "commit", "torch", "triton", "rows")) <= set(doc)
    loaded = results.load(str(tmp_path / "r.json"))
    assert loaded["rows"] == json.loads(json.dumps(doc["rows"]))
    assert loaded["rows"][0]["speedup"] == pytest.approx(2.0 / 1.16)
    written = report.render(loaded, str(tmp_path / "out"))
    md = open(written[0]).read()
    assert "cublas_bf16_dense (computes less)" in md and "| 16 |" in md
    assert all(p.endswith((".md", ".png")) for p in written) and len(written) == 2


@pytest.mark.parametrize("bad,msg", [({"bench": "nope"}, "bench expected"), ({"baseline": "x"}, "baseline expected"),
                                     ({"ours_ms": 0.0}, "positive")])
def test_schema_rejects_bad_rows(bad, msg):
    row = {**_rows()[0], **bad}
    with pytest.raises(ValueError, match=msg):
        results.check_row(row)


def _grads(run, case):
    run()
    return [t.grad.clone() for t in (case.x, case.A, case.B)]


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq", "int4", "none"])
def test_dequant_cublas_lora_computes_our_function(quant):
    # fp32 everywhere: both sides are fp32 matmuls of the same values; 1e-5 relative covers summation order.
    case = LayerCase(33, 128, 96, 8, torch.float32, quant, 0.2, "cpu")
    mask = draw_dropout_mask_reference(case.x, 0.2)
    w = case.weight.packed if isinstance(case.weight, fl.QuantizedWeight) else case.weight
    ref = lora_linear_reference(case.x, w, case.A, case.B, case.scale, None, 0.2, True, mask)
    got = baselines.dequant_cublas_lora(case.x, case.weight, case.A, case.B, case.scale, None, 0.2, True, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g_ref = torch.autograd.grad(ref, (case.x, case.A, case.B), case.dy)
    g_got = torch.autograd.grad(got, (case.x, case.A, case.B), case.dy)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not baselines.peft_available(), reason="peft not installed")
def test_peft_bf16_computes_our_function():
    # Dropout off: PEFT draws its own mask, so equality is checked without it (same fp32 tolerance as above).
    case = LayerCase(21, 64, 48, 4, torch.float32, "none", 0.0, "cpu")
    model = baselines.peft_lora_layer(torch.nn.Linear(64, 48, bias=False), case.A.detach(), case.B.detach(),
                                      case.alpha, 0.0)
    with torch.no_grad():
        model.base_model.model.proj.base_layer.weight.copy_(case.dense)
    ref = lora_linear_reference(case.x, case.dense, case.A, case.B, case.scale, None, 0.0, True, None)
    torch.testing.assert_close(model(case.x), ref, rtol=1e-5, atol=1e-5)


def test_speed_of_light_baseline_computes_less():
    case = LayerCase(9, 64, 32, 4, torch.float32, "none", 0.0, "cpu")
    full = lora_linear_reference(case.x, case.dense, case.A, case.B, case.scale, None, 0.0, False, None)
    sol = baselines.cublas_dense(case.x, case.dense)
    assert not torch.allclose(sol, full)  # no LoRA term: labelled "computes less" in every table
    torch.testing.assert_close(sol + case.scale * (case.x @ case.A.T) @ case.B.T, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dq", [False, True])
def test_bnb_baselines_read_our_bytes_and_compute_our_function(dq):
    # The dequant baseline (bitsandbytes' dequantize_4bit) and the decode baseline (its matmul_4bit plus the
    # LoRA term) over a QuantState built from our tensors: bit-identical dequantization, and the decode
    # output equal to the reference within fp32 summation-order error (1e-5 relative).
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from fusedlora.formats import dequantize_reference

    k, n, r = 128, 96, 8
    qw = fl.quantize(torch.randn(n, k), scheme="nf4", blocksize=64, double_quant=dq)
    state = baselines.bnb_quant_state(bnbf, qw.packed, torch.float32)
    assert torch.equal(bnbf.dequantize_4bit(qw.packed.data, state), dequantize_reference(qw.packed, torch.float32))
    x, A, B = torch.randn(3, k), torch.randn(r, k) / k**0.5, torch.randn(n, r)
    got = baselines.bnb_lora(bnb, x, qw.packed.data, state, A, B, 2.0)
    ref = lora_linear_reference(x, qw.packed, A, B, 2.0, None, 0.0, False, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ spread, labels, roofline, plots


def test_timing_median_and_iqr():
    from fusedlora.bench.timing import Timing

    t = Timing.of([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (t.ms, t.q1, t.q3, t.n) == (3.0, 2.0, 4.0, 5) and t.iqr == 2.0 and t.spread == pytest.approx(2 / 3)
    assert Timing.of([7.0]).iqr == 0.0


def test_noisy_rows_warn_and_the_table_shows_the_spread():
    quiet = results.make_row(bench="layer", shape=(64, 96), m=16, r=4, dropout=0.1, dtype="fp32", quant="nf4",
                             ours_ms=1.0, baseline="dequant_cublas_lora", baseline_ms=2.0, ours_iqr_ms=0.05,
                             baseline_iqr_ms=0.1)
    loud = {**quiet, "m": 64, "ours_iqr_ms": 0.5}
    warnings = results.noisy([quiet, loud], 0.10)
    assert len(warnings) == 1 and "M=64" in warnings[0] and "ours 1 ms with an IQR of 0.5 ms (50 %" in warnings[0]
    md = report.markdown({"gpu": "cpu", "date": "d", "commit": "c", "rows": [quiet]})
    assert "| 1 ± 0.05 | 2 ± 0.1 |" in md


def test_baseline_labels_say_what_ran():
    assert results.baseline_label("cublas_bf16_dense", "bf16", gpu=True) == "cublas_bf16_dense"
    assert results.baseline_label("cublas_bf16_dense", "fp32", gpu=False) == "torch_cpu_fp32_dense"
    assert results.baseline_label("peft_bf16", "fp32", gpu=False) == "peft_fp32"
    assert results.baseline_label("dequant_cublas_lora", "fp16", gpu=True) == "dequant_cublas_lora"
    assert results.is_speed_of_light("torch_cpu_fp32_dense") and not results.is_speed_of_light("peft_fp32")
    row = results.make_row(bench="layer", shape=(64, 96), m=16, r=4, dropout=0.1, dtype="fp32", quant="nf4",
                           ours_ms=1.0, baseline="torch_cpu_fp32_dense", baseline_ms=2.0)
    assert "torch_cpu_fp32_dense (computes less)" in report.markdown({"gpu": "cpu", "date": "d", "commit": "c",
                                                                      "rows": [row]})


def test_roofline_above_100_carries_a_note_and_variant_is_kept():
    row = results.make_row(bench="layer", shape=(64, 96), m=16, r=4, dropout=0.1, dtype="fp32", quant="nf4",
                           ours_ms=1.0, baseline="peft_fp32", baseline_ms=2.0, pct_roofline=282.0, variant="dora")
    assert row["note"].startswith("% of roofline above 100") and row["variant"] == "dora"
    assert "note" not in results.make_row(**{**_row_args(), "pct_roofline": 99.0})
    md = report.markdown({"gpu": "cpu", "date": "d", "commit": "c", "rows": [row]})
    assert "| 282 [1] |" in md and "\n[1] % of roofline above 100" in md and "ours (dora)" in md
    with pytest.raises(ValueError, match="unknown keys"):
        results.check_row({**row, "colour": "red"})


def _row_args():
    return dict(bench="layer", shape=(64, 96), m=16, r=4, dropout=0.1, dtype="fp32", quant="nf4", ours_ms=1.0,
                baseline="peft_fp32", baseline_ms=2.0)


def test_plots_with_few_points_are_bars_and_roofline_lines_are_not_repeated(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    rows = [results.make_row(**{**_row_args(), "m": m, "baseline": b, "pct_roofline": 10.0 + m / 100})
            for m in (16, 64) for b in ("peft_fp32", "torch_cpu_fp32_dense", "dequant_cublas_lora")]
    report.plots({"gpu": "cpu", "date": "d", "commit": "c", "rows": rows}, "/nonexistent")
    speed, roof = figures[0].axes
    assert len(speed.patches) == 6 and len(speed.lines) == 1  # 3 baselines × 2 M as bars, and the 1× line
    assert len(roof.patches) == 2  # ours' roofline once per (shape, quant, M), not once per baseline

    many = [results.make_row(**{**_row_args(), "m": m, "pct_roofline": 20.0}) for m in (16, 32, 64)]
    report.plots({"gpu": "cpu", "date": "d", "commit": "c", "rows": many}, "/nonexistent")
    speed, roof = figures[1].axes
    assert speed.get_xscale() == "linear" and [t.get_text() for t in speed.get_xticklabels()] == ["16", "32", "64"]
    assert len(roof.lines) == 1 and speed.get_legend() is not None
    wide = [results.make_row(**{**_row_args(), "m": m}) for m in (16, 128, 1024)]
    report.plots({"gpu": "cpu", "date": "d", "commit": "c", "rows": wide}, "/nonexistent")
    assert figures[2].axes[0].get_xscale() == "log" and len(figures[2].axes) == 1  # no roofline: one panel
    # DoRA rows at two dropouts: one series each, told apart by p
    dora = [results.make_row(**{**_row_args(), "m": m, "dropout": p, "variant": "dora", "baseline": "ours_lora"})
            for m in (16, 32, 64) for p in (0.0, 0.1)]
    report.plots({"gpu": "cpu", "date": "d", "commit": "c", "rows": dora}, "/nonexistent")
    labels = [t.get_text() for t in figures[3].axes[0].get_legend().get_texts()]
    assert labels == ["64→96 nf4 dora p=0 vs ours_lora", "64→96 nf4 dora p=0.1 vs ours_lora"]


# ------------------------------------------------------------------------ DoRA rows


def test_dora_rows_have_the_schema_and_skip_what_cannot_run(tmp_path):
    """On a CPU: our DoRA layer against our LoRA layer at p = 0 and 0.1 (PEFT's DoRA over bitsandbytes needs a
    GPU: no row), variant "dora", appended to the rows given and written to the results file."""
    from fusedlora.bench.layer import DORA_BASELINES, run_layer

    earlier = _rows()
    out = str(tmp_path / "layer.json")
    rows = run_layer([((64, 96), 16, "nf4-dq", 0.0), ((64, 96), 16, "nf4-dq", 0.1)], r=4, dtype=torch.float32,
                     dora=True, ceilings={"matmul_tflops": 1.0}, rows=earlier, out_path=out, log=lambda s: None)
    assert DORA_BASELINES == ("peft_bnb_dora", "ours_lora") and rows[:len(earlier)] == earlier
    mine = rows[len(earlier):]
    assert [(r["baseline"], r["dropout"], r["variant"], r["quant"]) for r in mine] == [
        ("ours_lora", 0.0, "dora", "nf4-dq"), ("ours_lora", 0.1, "dora", "nf4-dq")]
    assert all(r["bench"] == "layer" and r["shape"] == [64, 96] and r["pct_roofline"] > 0 for r in mine)
    loaded = results.load(out)
    assert loaded["rows"] == json.loads(json.dumps(rows))
    md = report.markdown(loaded)
    assert "ours_lora (computes less)" in md and "ours (dora)" in md
    assert "| layer | 64→96 | 16 | 0 | nf4-dq |" in md and "| layer | 64→96 | 16 | 0.1 | nf4-dq |" in md
    row = results.make_row(**{**_row_args(), "baseline": "peft_bnb_dora", "variant": "dora"})
    assert not results.is_speed_of_light(row["baseline"])


def test_dora_case_trains_the_magnitude_and_peft_dora_computes_our_function():
    """The DoRA case's step reaches the magnitude, and PEFT's DoRA holding the case's A, B and magnitude (over
    the dense nn.Linear here; the bench's peft_bnb_dora holds them over bitsandbytes' Linear4bit the same way)
    computes our DoRA layer: dropout off, fp32, 1e-5 relative."""
    from fusedlora.ops.dora import dora_linear_reference

    case = LayerCase(21, 64, 48, 4, torch.float32, "none", 0.0, "cpu", dora=True)
    case.ours_dora()()
    assert case.magnitude.grad is not None and case.magnitude.grad.abs().max() > 0
    ref = dora_linear_reference(case.x, case.dense, case.A, case.B, case.scale, case.magnitude, case.base_sq,
                                None, 0.0, True, None)
    if not baselines.peft_available():
        pytest.skip("peft not installed")
    base = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        base.weight.copy_(case.dense)
    model = baselines.peft_lora_layer(base, case.A.detach(), case.B.detach(), case.alpha, 0.0,
                                      magnitude=case.magnitude.detach())
    torch.testing.assert_close(model(case.x), ref, rtol=1e-5, atol=1e-5)


def test_dora_matrix():
    from fusedlora.bench.suite import dora_matrix

    assert dora_matrix(True, False) == [((256, 384), 64, "nf4-dq", 0.0), ((256, 384), 64, "nf4-dq", 0.1)]
    assert dora_matrix(True, True) == [((4096, 4096), 4096, "nf4-dq", p) for p in (0.0, 0.1)]
    assert {c[0] for c in dora_matrix(False, True)} == {(4096, 4096), (4096, 14336), (14336, 4096)}


def test_decode_bench_times_the_first_m_past_the_cut_over(monkeypatch):
    # the decode bench's M list per shape: its own list and the first M the decode leaves to the Triton
    # forward (the cliff the cut-over may cost), wherever the rule puts it: M = 65 on 4096 -> 4096 (the
    # decode's build limit), M = 19 on 8192 -> 28672 (its re-reads of x), M = 17 with no re-reads allowed
    from fusedlora.bench.decode import DECODE_MS, shape_ms
    from fusedlora.ops import decode

    assert shape_ms(4096, 4096) == DECODE_MS + [65] and decode.DECODE_KERNEL_MAX_M == 64
    assert shape_ms(8192, 28672) == sorted(DECODE_MS + [19])
    assert shape_ms(4096, 4096, [1, 8]) == [1, 8, 65]
    monkeypatch.setattr(decode, "X_REREAD_BUDGET", 0)
    assert shape_ms(4096, 4096, [1, 64]) == [1, decode.DECODE_GEMV_MAX_M + 1, 64]


def test_dequant_bench_rows_are_schema_rows(tmp_path):
    # the dequant bench's rows pass the results schema (the implementation timed is the row's variant) and
    # are written after each format, so the device check's time limit cannot leave its file empty; run here
    # on the CPU families, one small weight, no INT4 (whose baseline compiles with inductor)
    from fusedlora.bench.dequant import run, table

    out = tmp_path / "dequant.json"
    ceilings = {"copy_gbs": 100.0}
    rows = run([(64, 128)], "bf16", ceilings, with_int4=False, device="cpu", out_path=str(out),
               env={**results.environment(), "note": "test"})
    assert [r["quant"] for r in rows] == ["nf4", "nf4-dq"] * (len(rows) // 2) and rows
    assert all(r["variant"] in ("cuda", "triton", "reference") and r["ours_ms"] > 0 for r in rows)
    saved = results.load(str(out))
    assert saved["note"] == "test" and saved["rows"] == json.loads(json.dumps(rows))
    assert "nf4-dq" in table(rows, ceilings)


def test_budget_stops_starting_work_once_spent_and_says_before_what():
    from fusedlora.bench.timing import Budget

    said = []
    assert not Budget(None, said.append).spent("a") and not Budget(1e9, said.append).spent("b")
    over = Budget(0.0, said.append)
    while time.perf_counter() == over.start:  # some time must pass, however little
        pass
    assert over.spent("4096->4096 M=65") and said == ["budget of 0 s spent: stopping before 4096->4096 M=65"]


def test_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    """A copy of the tree without .git (the GPU machine's): FUSEDLORA_COMMIT names the commit, and an unset or
    empty one (a `$(git rev-parse HEAD)` run where there is no checkout) reads "unknown", never ""."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git looks no further up than the copy
    monkeypatch.setenv("FUSEDLORA_COMMIT", "0123abc")
    assert results.commit(str(tmp_path)) == "0123abc"
    for value in ("", "  "):
        monkeypatch.setenv("FUSEDLORA_COMMIT", value)
        assert results.commit(str(tmp_path)) == "unknown"
    monkeypatch.delenv("FUSEDLORA_COMMIT")
    assert results.commit(str(tmp_path)) == "unknown"
    head = results.commit()  # this checkout
    assert len(head.removesuffix("-dirty")) == 40
