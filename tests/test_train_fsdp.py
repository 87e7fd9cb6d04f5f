"""`fusedlora train --fsdp` on CPU (gloo, 2 processes): FSDP2 gives the adapter DDP gives, a run killed and
resumed under --fsdp equals one never interrupted. A 4-bit base under --fsdp: tests/test_sharding.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fusedlora.train import checkpoint
from fusedlora.train.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense base (FSDP2 shards parameters), dropout on (resuming must restore each process's random state),
# gradient accumulation 2 (FSDP2 holds back the reduce-scatter until the last micro-batch).
ARGS = ["--quantize", "none", "--batch-size", "2", "--seq-len", "32", "--rank", "4", "--dropout", "0.1",
        "--grad-accum", "2", "--steps", "12", "--save-every", "3", "--eval-every", "6"]
STEPS = 12


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fusedlora.train", *args]


def _run2(*args):
    subprocess.run(_torchrun(*args), env=_env(), check=True, timeout=300, capture_output=True)


def _log(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {row["step"]: row[key] for row in map(json.loads, f) if key in row}


def _adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp") / "run")
    _run2(*ARGS, "--fsdp", "--out", out)
    return out


@pytest.mark.slow
def test_fsdp_equals_ddp(fsdp_run, tmp_path):
    """Two processes with FSDP2 against two with DDP: the same micro-batches, dropout draws and loss scaling;
    the gradients are averaged by a reduce-scatter instead of an all-reduce, and the gradient norm (hence the
    clipping factor; the norm is ≈ 3 > 1, so clipping acts) is summed from per-process shards, so they may
    differ in their last fp32 bits. Adam moves each parameter by at most ≈ lr per step (≤ 2e-3 here) and its
    update m/√v barely depends on the gradient's scale, so 12 steps leave the adapters within 1e-6 (measured:
    3e-8), while a run that sees half the global batch is off by ≈ 1e-2 (measured 1.3e-2; asserted: over 100×
    the difference)."""
    ddp = str(tmp_path / "ddp")
    _run2(*ARGS, "--out", ddp)
    half = str(tmp_path / "half")
    assert main([*ARGS, "--save-every", "0", "--out", half]) == 0  # one process × batch 2

    summary = json.load(open(os.path.join(fsdp_run, "summary.json")))
    assert summary["world_size"] == 2 and summary["parallel"] == "fsdp"
    assert json.load(open(os.path.join(ddp, "summary.json")))["parallel"] == "ddp"
    a, b, c = _adapter(fsdp_run), _adapter(ddp), _adapter(half)
    assert a.keys() == b.keys() and len(a) == 28  # 7 linears × 2 layers × (A, B): the whole adapter
    assert all(a[k].shape == b[k].shape for k in a)
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    off = max((a[k] - c[k]).abs().max().item() for k in a)
    assert err < 1e-6 and off > 100 * max(err, 1e-7), (err, off)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0.01 for k in a)
    for key in ("loss", "eval_loss"):
        want = _log(ddp, key)
        assert sorted(_log(fsdp_run, key)) == sorted(want)
        for step, loss in want.items():
            assert _log(fsdp_run, key)[step] == pytest.approx(loss, rel=1e-6)
    # The checkpoint holds whole tensors, as a DDP run writes them.
    o1 = load_file(os.path.join(fsdp_run, f"checkpoint-{STEPS:06d}", "optimizer.safetensors"))
    o2 = load_file(os.path.join(ddp, f"checkpoint-{STEPS:06d}", "optimizer.safetensors"))
    assert o1.keys() == o2.keys() and all(o1[k].shape == o2[k].shape for k in o1)


@pytest.mark.slow
def test_fsdp_kill_and_resume_equals_uninterrupted(fsdp_run, tmp_path):
    """SIGKILL to the whole torchrun process group after a checkpoint, then --resume under --fsdp: the
    parameters and AdamW moments come back from whole tensors and are re-sharded, so the remaining steps
    are the same computation as in the uninterrupted run: equal to the bit on a CPU."""
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(_torchrun(*ARGS, "--fsdp", "--out", out), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(out, "trainer_state.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers: their own session
        except ProcessLookupError:
            pass
        proc.wait()
    killed_at = checkpoint.require_latest(out)["step"]
    if killed_at >= STEPS:
        pytest.fail("the run finished before it was killed; the test needs a slower run")

    _run2("--resume", "--out", out)  # --fsdp and the rest come from the checkpoint's config
    assert json.load(open(os.path.join(out, "summary.json")))["parallel"] == "fsdp"
    ref_log, log = _log(fsdp_run), _log(out)
    assert sorted(log) == list(range(1, STEPS + 1))
    assert log == ref_log and _log(out, "eval_loss") == _log(fsdp_run, "eval_loss")
    a, b = _adapter(fsdp_run), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_fsdp_takes_a_4bit_base(scheme):
    """--fsdp with a 4-bit base is a valid config (tests/test_sharding.py runs it)."""
    from fusedlora.train.config import TrainConfig

    assert TrainConfig(fsdp=True, quantize=scheme).fsdp


def test_fsdp_flag_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--fsdp" in capsys.readouterr().out
