"""The whole-step bench on the tiny model (CPU): rows in the results schema, and every variant computes ours."""

import os
import subprocess
import sys

import pytest
import torch

from fusedlora.bench import results
from fusedlora.bench.step import StepCase, check_tolerance, compare, llama_config, run_step

pytest.importorskip("transformers")
pytest.importorskip("peft")

SEQ = 33  # odd, so no length is a multiple of a tile
FP32 = check_tolerance(torch.float32)  # 1e-4 relative: fp32 sums of a few hundred terms in two orders


def _case(**kw):
    return StepCase(llama_config("tiny", SEQ), seq=SEQ, device="cpu", **kw)


def _steps(case, model, n=2):
    torch.manual_seed(5)
    step = case.step_fn(model, lr=1e-2)  # a large rate, so the second loss shows the first update
    return [float(step()) for _ in range(n)]


def test_rows_follow_schema(tmp_path):
    case = _case()
    out = str(tmp_path / "step.json")
    rows, failed = run_step(case, baseline_names=("peft_bf16",), ceilings={"matmul_tflops": 1.0}, out_path=out,
                            cpu_reps=1, log=lambda s: None)
    assert failed == [] and len(rows) == 1
    row = rows[0]
    assert (row["bench"], row["shape"], row["m"], row["r"], row["dropout"], row["dtype"], row["quant"],
            row["baseline"]) == ("step", [128, 2], SEQ, 16, 0.1, "fp32", "nf4-dq", "peft_fp32")  # what ran: fp32
    assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ours_ms"])
    assert row["pct_roofline"] == pytest.approx(100 * case.flops() / 1e12 / (row["ours_ms"] * 1e-3))
    assert results.load(out)["rows"] == rows
    # every linear layer but the output head, 7 per layer: q, k, v, o, gate, up, down
    assert len(case.targets) == 14 and "lm_head" not in case.targets


def test_ours_dense_matches_peft_bf16_through_a_step():
    # quantize=None, dropout 0, fp32: ours and PEFT are the same math; the second loss also checks the gradients
    case = _case(quant="none", dropout=0.0)
    ours, peft = case.build("ours"), case.build("peft_bf16")
    ok, msg = compare(case.check_outputs(ours), case.check_outputs(peft), torch.float32)
    assert ok, msg
    l_ours, l_peft = _steps(case, ours), _steps(case, peft)
    assert l_ours[1] != l_ours[0]  # the optimizer step changed the adapters
    torch.testing.assert_close(l_ours, l_peft, rtol=FP32[0], atol=0)


def test_ours_nf4_matches_dequantized_reference():
    # The reference: a plain transformers model with W = dequantized NF4 + s·B·A folded in (no LoRA code).
    case = _case(dropout=0.0)
    ours = case.build("ours")
    got = case.check_outputs(ours)
    scale = case.alpha / case.r
    folded = dict(case.state)
    for name, (a, b) in case.lora.items():
        w = case.dense_state[f"{name}.weight"]
        folded[f"{name}.weight"] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
    ok, msg = compare(got, case.check_outputs(case.dense_model(folded)), torch.float32)
    assert ok, msg
    # the check can tell: the same adapters over the original dense weights are another function
    for name, (a, b) in case.lora.items():
        w = case.state[f"{name}.weight"]
        folded[f"{name}.weight"] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
    ok, msg = compare(got, case.check_outputs(case.dense_model(folded)), torch.float32)
    assert not ok, msg


def test_ours_over_bnb_bytes_matches_peft_bnb():
    pytest.importorskip("bitsandbytes")
    case = _case(dropout=0.0, use_bnb=True)
    ours, peft = case.build("ours"), case.build("peft_bnb")
    ok, msg = compare(case.check_outputs(ours), case.check_outputs(peft), torch.float32)
    assert ok, msg
    torch.testing.assert_close(_steps(case, ours), _steps(case, peft), rtol=FP32[0], atol=0)


def test_a_baseline_computing_another_function_gets_no_row(monkeypatch):
    build = StepCase.build

    def dense_not_dequantized(self, name):
        if name == "peft_bf16":
            self.dense_state = {}  # PEFT over the original weights instead of ours dequantized
        return build(self, name)

    monkeypatch.setattr(StepCase, "build", dense_not_dequantized)
    lines = []
    rows, failed = run_step(_case(), baseline_names=("peft_bf16",), cpu_reps=1, log=lines.append)
    assert rows == [] and failed == ["peft_bf16"]
    assert any("MISMATCH" in s for s in lines)


def test_cli_needs_a_gpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "bench_step.py")
    p = subprocess.run([sys.executable, script, "--out", str(tmp_path / "s.json")], env=env, capture_output=True,
                       text=True)
    assert p.returncode != 0 and "needs a CUDA GPU" in p.stderr
