"""fl.fully_shard over a 4-bit base on CPU (gloo, 2 and 4 processes), from Python and through `fusedlora train --fsdp`.

Dropout is 0 wherever runs with different numbers of processes are compared: the masks depend on which
process holds which rows."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fusedlora.train.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "fsdp_qlora_worker.py")
ARGS = ["--batch-size", "2", "--seq-len", "32", "--rank", "4", "--dropout", "0", "--steps", "6",
        "--save-every", "3", "--eval-every", "3", "--eval-batches", "1000"]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _torchrun(*args, env=None, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    done = subprocess.run(cmd, env=env or _env(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _log(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {row["step"]: row[key] for row in map(json.loads, f) if key in row}


def _adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def _max_diff(a, b, dora=False):
    # 7 linears × 2 layers × (A, B, and DoRA's magnitude)
    assert a.keys() == b.keys() and len(a) == (42 if dora else 28)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("scheme, backend, nproc", [("nf4", "triton", 2), ("int4", "reference", 2),
                                                    ("nf4", "reference", 4)])
def test_fully_shard_a_4bit_model(scheme, backend, nproc):
    """tests/fsdp_qlora_worker.py: each process holds 1/2 of every layer's 4-bit bytes in whole blocks, the
    layer sees whole tensors at its forward, the state-dict keys are unchanged, and the output rows and the
    whole LoRA gradients equal the unsharded model's (fp32; the gradients differ only by the order of the sum
    over processes: 1e-4 is far above that and far below a wrong weight's effect). NF4 (double quantization)
    runs the fused Triton kernels under the interpreter; with 4 processes each holds 1/4, and after its
    forward a unit stays sharded over 2 (reshard_after_forward=2: FSDP2 makes other parameters of the 4-bit
    storage there, and the backward gathers from them)."""
    env = _env(FUSEDLORA_BACKEND=backend, TRITON_INTERPRET="1", **({"FSDP_WORKER_RESHARD": "2"} if nproc == 4 else {}))
    _torchrun(WORKER, scheme, env=env, nproc=nproc)


@pytest.fixture(scope="module")
def nf4_runs(tmp_path_factory):
    """--fsdp over NF4 (double quantization) on 2 processes with batch 2, and 1 process with --grad-accum 2:
    the same global batch of 4 sequences per step."""
    root = tmp_path_factory.mktemp("nf4")
    two, one = str(root / "two"), str(root / "one")
    _torchrun("-m", "fusedlora.train", *ARGS, "--quantize", "nf4", "--fsdp", "--out", two)
    assert main([*ARGS, "--quantize", "nf4", "--grad-accum", "2", "--out", one]) == 0
    return two, one


def _check_equal_runs(two, one, world=2, dora=False):
    """The losses and adapters of two runs of the same global batches. Each step's gradient is the same sum
    of per-token terms, taken in another order (reduce-scatter of two halves vs accumulation in one process):
    fp32 rounding, ~1e-7 relative. Adam's update m/√v is insensitive to that scale, so 6 steps at lr 3e-3
    leave the adapters within 1e-5 (measured 1.2e-7), while Adam moves each by ≈ lr per step (B, zero at the
    start, reaches ≈ 3e-3: the sum of the warmup's learning rates)."""
    summary = json.load(open(os.path.join(two, "summary.json")))
    assert summary["world_size"] == world and summary["parallel"] == "fsdp"
    for key in ("loss", "eval_loss"):
        want = _log(one, key)
        assert sorted(_log(two, key)) == sorted(want)
        for step, loss in want.items():
            assert _log(two, key)[step] == pytest.approx(loss, rel=1e-5), (key, step)
    a, b = _adapter(two), _adapter(one)
    assert _max_diff(a, b, dora) < 1e-5
    assert max(a[k].abs().max().item() for k in a if k.endswith("lora_B.weight")) > 2e-3  # trained


@pytest.mark.slow
def test_train_fsdp_nf4_equals_one_process(nf4_runs):
    _check_equal_runs(*nf4_runs)


@pytest.mark.slow
def test_train_fsdp_nf4_on_four_processes_equals_one_process(tmp_path):
    """4 processes with batch 2 and 1 process with --grad-accum 4: the same global batch of 8 sequences."""
    four, one = str(tmp_path / "four"), str(tmp_path / "one")
    _torchrun("-m", "fusedlora.train", *ARGS, "--quantize", "nf4", "--fsdp", "--out", four, nproc=4)
    assert main([*ARGS, "--quantize", "nf4", "--grad-accum", "4", "--out", one]) == 0
    _check_equal_runs(four, one, world=4)


@pytest.mark.slow
def test_train_fsdp_nf4_dora_equals_one_process(tmp_path):
    """--dora --fsdp on 2 processes (the magnitudes sharded with the adapters) equals 1 process with
    --grad-accum 2: losses, A, B and the magnitudes, by _check_equal_runs' argument."""
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    _torchrun("-m", "fusedlora.train", *ARGS, "--quantize", "nf4", "--dora", "--fsdp", "--out", two)
    assert main([*ARGS, "--quantize", "nf4", "--dora", "--grad-accum", "2", "--out", one]) == 0
    a, b = _adapter(two), _adapter(one)
    mags = [k for k in a if k.endswith("lora_magnitude_vector")]
    assert len(mags) == 14 and a.keys() == b.keys()
    _check_equal_runs(two, one, dora=True)


@pytest.mark.slow
def test_train_fsdp_int4_equals_one_process(tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    _torchrun("-m", "fusedlora.train", *ARGS, "--quantize", "int4", "--group-size", "64", "--fsdp", "--out", two)
    assert main([*ARGS, "--quantize", "int4", "--group-size", "64", "--grad-accum", "2", "--out", one]) == 0
    _check_equal_runs(two, one)


@pytest.mark.slow
def test_resume_on_another_number_of_processes(nf4_runs, tmp_path):
    """A checkpoint of 2 processes (batch 2) resumes in 1 process: --grad-accum becomes 2, so each step has
    the same global batch, and the run continues as the 1-process run resumed from its own checkpoint."""
    two, one = (shutil.copytree(src, str(tmp_path / name)) for src, name in zip(nf4_runs, ("two", "one"), strict=True))
    for out in (two, one):
        assert main(["--resume", "--steps", "9", "--out", out]) == 0
    state = json.load(open(os.path.join(two, "trainer_state.json")))
    assert state["world_size"] == 1 and state["config"]["grad_accum"] == 2
    assert sorted(_log(two)) == list(range(1, 10))
    for step, loss in _log(one).items():
        assert _log(two)[step] == pytest.approx(loss, rel=1e-5)
    assert _max_diff(_adapter(two), _adapter(one)) < 1e-5


def test_resume_world_keeps_the_global_batch():
    from fusedlora.train.config import TrainConfig
    from fusedlora.train.loop import _resume_world

    config = TrainConfig(batch_size=2, grad_accum=3)
    _resume_world(config, {"world_size": 2}, 1)
    assert config.grad_accum == 6
    _resume_world(config, {"world_size": 1}, 3)
    assert config.grad_accum == 2
    with pytest.raises(ValueError, match="cannot split that into whole micro-batches.*dividing 6"):
        _resume_world(TrainConfig(batch_size=2, grad_accum=3), {"world_size": 2}, 4)


def test_held_as_parameters_keeps_keys_values_and_dtypes():
    """Without a process group: the storage held as frozen parameters keeps the state-dict keys and the
    bytes (NF4 codes as [blocks, bytes per block]), the output is the same, and a dtype cast of the module
    changes its compute dtype, never the 4-bit tensors' dtypes."""
    import fusedlora as fl
    from fusedlora.sharding import hold_as_parameters

    torch.manual_seed(0)
    layer = fl.LoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, quantize="nf4", init_lora_weights=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 128)
    y = layer(x)
    hold_as_parameters(layer)
    after = layer.state_dict()
    assert list(sorted(after)) == sorted(before)
    assert all(torch.equal(after[k].reshape(before[k].shape), before[k]) for k in before)
    assert tuple(layer.quant_data.shape) == (128, 32) and not layer.quant_data.requires_grad
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    layer.double()
    assert layer.quant_absmax.dtype == torch.uint8 and layer.quant_nested_absmax.dtype == torch.float32
    assert isinstance(layer.quant_nested_absmax, torch.nn.Parameter)
    torch.testing.assert_close(layer(x.double()).float(), y, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_before_torch_2_12_creates_integer_parameters_frozen(monkeypatch):
    """FSDP2 before torch 2.12 creates each sharded parameter as nn.Parameter(t), which raises for integer
    tensors (the codes). Holding a 4-bit layer as parameters gives FSDP2's parameter module, on those
    versions only and once, a torch.nn whose Parameter creates integer tensors frozen and floating ones as
    before. (test_fully_shard_a_4bit_model shards through it when the installed torch is older.)"""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    import fusedlora as fl
    from fusedlora.sharding import _NNForFSDP2, hold_as_parameters

    monkeypatch.setattr(_fsdp_param, "nn", torch.nn)  # put back after the test
    layer = fl.LoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, quantize="nf4")
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    hold_as_parameters(layer)
    assert _fsdp_param.nn is torch.nn  # a fixed torch is left as it is
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    hold_as_parameters(layer)
    seen = _fsdp_param.nn
    hold_as_parameters(layer)
    assert isinstance(seen, _NNForFSDP2) and _fsdp_param.nn is seen and seen.Module is torch.nn.Module
    with pytest.raises(RuntimeError, match="floating point"):  # what FSDP2 < 2.12 calls
        torch.nn.Parameter(layer.quant_data.detach())
    codes = seen.Parameter(layer.quant_data.detach())
    assert type(codes) is torch.nn.Parameter and codes.dtype == torch.uint8 and not codes.requires_grad
    scales = seen.Parameter(torch.randn(4))
    assert type(scales) is torch.nn.Parameter and scales.requires_grad


def test_cpu_offload_gives_the_same_run(nf4_runs, tmp_path):
    """--cpu-offload (FSDP2's CPUOffloadPolicy) changes where the shards, their gradients and AdamW's state
    are kept, not what is computed: the same all-gathers, reduce-scatters and per-shard AdamW steps in the
    same order. On a CPU the shards are in host memory either way, so the run is equal to the bit (measured);
    on a GPU the optimizer would step on the CPU, whose AdamW may differ from the GPU's in the last bits."""
    out = str(tmp_path / "offload")
    _torchrun("-m", "fusedlora.train", *ARGS, "--quantize", "nf4", "--fsdp", "--cpu-offload", "--out", out)
    two = nf4_runs[0]
    assert json.load(open(os.path.join(out, "trainer_state.json")))["config"]["cpu_offload"] is True
    for key in ("loss", "eval_loss"):
        assert _log(out, key) == _log(two, key)
    a, b = _adapter(out), _adapter(two)
    assert _max_diff(a, b) == 0.0


def test_cpu_offload_needs_fsdp():
    from fusedlora.train.config import TrainConfig

    assert TrainConfig(fsdp=True, cpu_offload=True).cpu_offload
    with pytest.raises(ValueError, match="--cpu-offload: .* needs --fsdp"):
        TrainConfig(cpu_offload=True)


def test_sharded_layout_loads_into_an_unsharded_model():
    """A state dict of a sharded model (NF4 codes as [blocks, bytes per block], whole tensors as
    ``full_tensor()`` gives them) loads into an unsharded layer ([bytes, 1]) and the reverse; the layout is
    taken from the layer, the bytes from the state dict. A code tensor of other bytes is still refused."""
    import fusedlora as fl
    from fusedlora.sharding import hold_as_parameters

    torch.manual_seed(0)
    src = fl.LoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, quantize="nf4", init_lora_weights=False)
    dst = fl.LoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, quantize="nf4", init_lora_weights=False)
    x = torch.randn(3, 128)
    want = src(x)
    hold_as_parameters(src)
    sharded = {k: v.detach().clone() for k, v in src.state_dict().items()}
    assert tuple(sharded["quant_data"].shape) == (128, 32) and tuple(dst.quant_data.shape) == (4096, 1)
    dst.load_state_dict(sharded)
    assert tuple(dst.quant_data.shape) == (4096, 1)
    torch.testing.assert_close(dst(x), want, rtol=0, atol=0)

    back = fl.LoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, quantize="nf4", init_lora_weights=False)
    hold_as_parameters(back)
    back.load_state_dict(dst.state_dict())
    assert tuple(back.quant_data.shape) == (128, 32)
    torch.testing.assert_close(back(x), want, rtol=0, atol=0)

    bad = dict(sharded, quant_data=sharded["quant_data"][:64])
    with pytest.raises((ValueError, RuntimeError)):
        dst.load_state_dict(bad)


@pytest.mark.slow
def test_fully_shard_a_4bit_dora_model():
    """The same worker with DoRA layers (NF4, the fused kernels under the interpreter): the magnitudes are
    sharded with the adapters, and outputs and every gradient (A, B, magnitude) equal the unsharded model's."""
    _torchrun(WORKER, "nf4", env=_env(FUSEDLORA_BACKEND="triton", TRITON_INTERPRET="1", FSDP_WORKER_DORA="1"))


@pytest.mark.gpu
def test_fully_shard_a_4bit_model_on_one_gpu():
    """The device check's FSDP2 smoke run: the same worker on one GPU over NCCL (the fused kernels compiled
    for the card; the sharded and the unsharded model run the same kernels on the same rows)."""
    _torchrun(WORKER, "nf4", env=_env(FSDP_WORKER_DEVICE="cuda"), nproc=1)
