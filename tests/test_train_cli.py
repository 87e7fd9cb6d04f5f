"""`fusedlora train` as a user meets it: the output folder (ownership, lock, umask, write errors), inputs and
flags checked before the model loads with one line naming the flag or file, damaged checkpoints, the
config file, --epochs, extending a finished run, and the layers' rank and alpha rules."""

import errno
import json
import math
import os
import shutil
import warnings

import pytest
import torch
from torch import nn

from fusedlora.modules import MAX_RANK, LoRALinear
from fusedlora.train import checkpoint, loop, outdir
from fusedlora.train.main import main

SMALL = ["--batch-size", "2", "--seq-len", "32", "--rank", "4", "--dropout", "0.1", "--eval-every", "0"]


def _fails(capsys, argv, needle, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fusedlora train:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err  # one line, no traceback
    return lines[0]


def _snapshot(path):
    return {os.path.relpath(os.path.join(root, f), path): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(path) for f in files}


@pytest.fixture
def no_model_load(monkeypatch):
    """Any load of the model fails the test: what is checked must be checked before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loop, "load_model", refuse)


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run4") / "run")
    assert main([*SMALL, "--steps", "4", "--save-every", "2", "--out", out]) == 0
    return out


# ------------------------------------------------------------------------------------------ the folder


def test_a_foreign_folder_is_refused_and_left_as_it_is(tmp_path, capsys, no_model_load):
    """An HF Trainer output folder (its checkpoints, a user's notes, a temporary folder) is not the trainer's."""
    out = tmp_path / "hf_out"
    for d in ("checkpoint-3", "checkpoint-6", "checkpoint-keepme", ".tmp-mine"):
        (out / d).mkdir(parents=True)
        (out / d / "notes.txt").write_text(d)
    (out / "trainer_state.json").write_text("{}")
    before = _snapshot(out)
    _fails(capsys, [*SMALL, "--steps", "2", "--out", str(out)],
           f"--out: {out} is not empty and was not made by fusedlora train (no .fusedlora-run.json in it)")
    assert _snapshot(out) == before and sorted(os.listdir(out)) == sorted(
        ["checkpoint-3", "checkpoint-6", "checkpoint-keepme", ".tmp-mine", "trainer_state.json"])


def test_the_trainer_removes_only_what_it_made(run4, tmp_path):
    """A user's checkpoint-* and .tmp-* folders beside a run survive its further checkpoints and pruning."""
    out = str(tmp_path / "run")
    shutil.copytree(run4, out)
    for d in ("checkpoint-keepme", "checkpoint-000001", ".tmp-mine", ".tmp-checkpoint-000002"):
        os.makedirs(os.path.join(out, d))
        open(os.path.join(out, d, "notes.txt"), "w").write(d)
    assert main(["--resume", "--steps", "6", "--out", out]) == 0
    names = set(os.listdir(out))
    assert {"checkpoint-keepme", "checkpoint-000001", ".tmp-mine", ".tmp-checkpoint-000002"} <= names
    assert "checkpoint-000006" in names and "checkpoint-000004" not in names
    assert all(open(os.path.join(out, d, "notes.txt")).read() == d
               for d in ("checkpoint-keepme", "checkpoint-000001", ".tmp-mine", ".tmp-checkpoint-000002"))
    assert outdir.owned(out) == {"checkpoint-000006", "base_model"}


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, capsys, no_model_load):
    out = str(tmp_path / "run")
    held = outdir.claim(out)
    try:
        _fails(capsys, [*SMALL, "--out", out], f"--out: {out} is in use by another fusedlora train (pid {os.getpid()})")
    finally:
        held.release()
    outdir.claim(out).release()  # free again once released


def test_files_follow_the_umask(tmp_path):
    out = str(tmp_path / "run")
    old = os.umask(0o027)
    try:
        assert main([*SMALL, "--steps", "1", "--quantize", "none", "--out", out]) == 0
    finally:
        os.umask(old)
    modes = {os.path.relpath(os.path.join(r, f), out): os.stat(os.path.join(r, f)).st_mode & 0o777
             for r, _, files in os.walk(out) for f in files}
    assert "checkpoint-000001/adapter_model.safetensors" in modes
    assert {name for name, mode in modes.items() if mode != 0o640} == set(), modes


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "No space left on device"),
                                        (errno.EROFS, "Read-only file system")])
def test_disk_full_and_read_only_give_one_line(tmp_path, capsys, monkeypatch, code, text):
    """Root writes anywhere, so the failures are injected where the checkpoint's tensors are written."""
    out = str(tmp_path / "run")

    def fail(tensors, path, *a, **k):
        raise OSError(code, text, path)

    monkeypatch.setattr(checkpoint, "save_file", fail)
    _fails(capsys, [*SMALL, "--steps", "1", "--quantize", "none", "--out", out],
           f"cannot write {out}/.tmp-checkpoint-000001/optimizer.safetensors: {text}")
    assert os.path.isdir(os.path.join(out, ".tmp-checkpoint-000001"))
    # The failed checkpoint is the trainer's own temporary folder: the next run in the folder clears it.
    monkeypatch.undo()
    assert main([*SMALL, "--steps", "1", "--quantize", "none", "--save-every", "0", "--out", out]) == 0
    assert sorted(n for n in os.listdir(out) if "checkpoint-" in n) == ["checkpoint-000001"]


# --------------------------------------------------------------------------- inputs, before the model


def test_inputs_are_checked_before_the_model_loads(tmp_path, capsys, no_model_load):
    out = str(tmp_path / "out")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    _fails(capsys, [*SMALL, "--data", str(bad), "--out", out], f"{bad} line 2: not UTF-8 (byte 0xe9 at column 14)")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _fails(capsys, [*SMALL, "--data", str(empty), "--out", out], f"{empty}: no records")
    _fails(capsys, [*SMALL, "--data", str(tmp_path), "--out", out], f"--data: {tmp_path} is a folder, not a file")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _fails(capsys, [*SMALL, "--out", str(a_file)], f"--out: {a_file} is a file, not a folder")
    _fails(capsys, [*SMALL, "--model", str(tmp_path / "nowhere"), "--out", out], "--model: ")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    _fails(capsys, [*SMALL, "--data", str(chat), "--out", out],
           f'{chat} line 1: a "messages" record needs a tokenizer with a chat template')
    assert not os.path.exists(out)


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["--alpha", "-1"], "--alpha: expected a positive finite number, got -1.0"),
    (["--alpha", "nan"], "--alpha: expected a positive finite number, got nan"),
    (["--rank", "1000"], f"--rank: 1000 is beyond the largest supported rank, {MAX_RANK}"),
    (["--max-grad-norm", "inf"], "--max-grad-norm: expected a positive finite number, got inf"),
    (["--warmup-steps", "-1"], "--warmup-steps: expected an integer >= 0, got -1"),
    (["--steps", "3", "--epochs", "1"], "--steps and --epochs: give one of the two"),
])
def test_flag_errors_name_the_flag(tmp_path, capsys, no_model_load, argv, needle):
    _fails(capsys, [*argv, "--out", str(tmp_path / "out")], needle)


def test_damaged_checkpoint_files_give_one_line(run4, tmp_path, capsys, no_model_load):
    out = str(tmp_path / "run")
    shutil.copytree(run4, out)
    opt = os.path.join(out, "checkpoint-000004", "optimizer.safetensors")
    with open(opt, "r+b") as f:
        f.truncate(os.path.getsize(opt) - 10)
    _fails(capsys, ["--resume", "--out", out], f"--resume: {opt} is damaged")
    state = os.path.join(out, "trainer_state.json")
    with open(state, "w") as f:
        f.write('{"step": 4,\n')
    _fails(capsys, ["--resume", "--out", out], f"--resume: {state} is damaged (not valid JSON")


# ------------------------------------------------------------------------------ config file and runs


def test_config_file_flags_override_it_and_epochs_set_the_steps(tmp_path, capsys):
    from fusedlora.train.data import build_sequences, builtin_records, split
    from fusedlora.train.model import tiny_llama

    toml = tmp_path / "run.toml"
    toml.write_text('batch-size = 4\nseq_len = 32\nrank = 2\nepochs = 0.02\neval-every = 0\nquantize = "none"\n'
                    'out = "from_toml"\n')
    assert main(["--config", str(toml), "--batch-size", "8"]) == 0
    state = json.load(open(tmp_path / "from_toml" / "trainer_state.json"))
    n_train = len(build_sequences(split(builtin_records(), 0.05)[0], tiny_llama()[1], 32, True))
    assert state["config"]["batch_size"] == 8 and state["config"]["rank"] == 2
    assert state["step"] == state["config"]["steps"] == math.ceil(0.02 * n_train / 8) > 1
    bad = tmp_path / "bad.toml"
    bad.write_text("batchsize = 4\n")
    _fails(capsys, ["--config", str(bad)], f"--config: {bad}: unknown key 'batchsize'")


def test_out_defaults_to_the_model_folder_name(tmp_path, monkeypatch):
    from test_train_run import _arithmetic, _hf_checkpoint

    texts, data = _arithmetic(tmp_path, n=3)
    hf = str(tmp_path / "my-llama")
    _hf_checkpoint(hf, texts)
    monkeypatch.chdir(tmp_path)
    assert main(["--model", hf, "--data", data, "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--rank", "2", "--eval-every", "0"]) == 0
    assert os.path.isfile(tmp_path / "runs" / "my-llama" / "trainer_state.json")


def test_a_finished_run_extends_with_a_larger_steps(run4, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(run4, out)
    assert main(["--resume", "--steps", "3", "--out", out]) == 2
    assert "--steps: checkpoint has 4, command line gives 3 (a run can be extended, not shortened)" in (
        capsys.readouterr().err)
    assert main(["--resume", "--steps", "6", "--out", out]) == 0
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["step"] == 6 and state["config"]["steps"] == 6
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # The cosine is recomputed over the new total: step 5 runs at the 6-step schedule's rate for step 4.
    cfg = loop.TrainConfig.from_dict({**state["config"], "out": out})
    assert log[4]["lr"] == pytest.approx(cfg.lr * loop.lr_lambda(cfg)(4))


# ---------------------------------------------------------------------------------------- the layers


def test_layer_rank_and_alpha_rules():
    lin = nn.Linear(16, 32)
    with pytest.warns(UserWarning, match=r"r = 17 is larger than min\(in_features, out_features\) = 16"):
        LoRALinear.from_linear(lin, r=17, alpha=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRALinear.from_linear(lin, r=16, alpha=8)
    with pytest.raises(ValueError, match=f"r: 1000 is beyond the largest supported rank, {MAX_RANK}"):
        LoRALinear(torch.zeros(1024, 1024), r=1000)
    for alpha in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha: expected a positive finite number"):
            LoRALinear.from_linear(lin, r=4, alpha=alpha)


# ------------------------------------------------------------------------------------ interruption


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _start(args, out):
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fusedlora.train", *args, "--out", out], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(out, "trainer_state.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    return proc


@pytest.mark.slow
def test_sigint_checkpoints_the_step_and_resume_equals_an_uninterrupted_run(tmp_path):
    """Ctrl-C: the current step finishes and is saved, one line says where and how to resume, the exit code is
    130; resuming gives the uninterrupted run's losses and adapter, to the bit."""
    import signal

    from safetensors.torch import load_file

    args = [*SMALL, "--steps", "40", "--save-every", "4"]
    ref = str(tmp_path / "ref")
    assert main([*args, "--out", ref]) == 0

    out = str(tmp_path / "stopped")
    proc = _start(args, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    state = checkpoint.require_latest(out)
    step = state["step"]
    assert step < 40, "the run finished before it was interrupted; the test needs a slower run"
    assert last == (f"fusedlora train: interrupted (SIGINT) at step {step}; last checkpoint step {step}; "
                    f"resume with: fusedlora train --resume --out {out}")
    assert "Traceback" not in err
    assert main(["--resume", "--out", out]) == 0
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    assert read(out) == read(ref)
    a, b = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



def test_stop_request_records_the_first_signal_and_exits_at_the_second(monkeypatch):
    import signal

    from fusedlora.train import stop

    exits = []
    monkeypatch.setattr(stop.os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGTERM)
    with stop.StopRequest() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.signal == signal.SIGTERM and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
    assert signal.getsignal(signal.SIGTERM) is before
    message = str(stop.Interrupted(signal.SIGTERM, 7, None, "runs/x", 2))
    assert message == "interrupted (SIGTERM) at step 7; no checkpoint was written"
    assert stop.Interrupted(signal.SIGTERM, 7, 6, "runs/x", 2).exit_code == 143
    assert str(stop.Interrupted(signal.SIGINT, 7, 6, "runs/x", 2)).endswith(
        "resume with: torchrun --nproc_per_node 2 -m fusedlora.train --resume --out runs/x")
