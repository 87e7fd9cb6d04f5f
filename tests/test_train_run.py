"""`fusedlora train` end to end on CPU: the loss falls, kill-and-resume equals an uninterrupted run, two gloo
processes equal one, a local transformers checkpoint trains and PEFT loads its adapter, clear errors."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import fusedlora as fl
from fusedlora.train import checkpoint
from fusedlora.train.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough that a step takes milliseconds; dropout on so resuming must restore the random state.
SMALL = ["--batch-size", "2", "--seq-len", "32", "--rank", "4", "--dropout", "0.1"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _log(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {row["step"]: row[key] for row in map(json.loads, f) if key in row}


def _adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def _tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(p.encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert main([*SMALL, "--steps", "4", "--save-every", "2", "--eval-every", "2", "--out", out]) == 0
    return out


@pytest.mark.slow
def test_default_run_loss_falls(tmp_path, finished_run):
    """The default configuration (built-in model and data, NF4 base) for a few steps: outputs as DESIGN.md
    lists them, and the loss well below the untrained model's."""
    out = str(tmp_path / "run")
    assert main(["--steps", "30", "--eval-every", "30", "--out", out]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert {"loss_first", "loss_last", "tokens_per_s", "peak_memory_bytes", "backend"} <= set(summary)
    assert summary["backend"] == fl.backend("cpu") and summary["tokens_per_s"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "loss.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    # The untrained model (LoRA B = 0) predicts bytes almost uniformly: ln(259) = 5.56 nats plus the spread
    # of its random logits. Thirty steps take the held-out loss down by more than half of that.
    assert 5.0 < summary["eval_loss_first"] < 7.0
    assert abs(summary["loss_first"] - summary["eval_loss_first"]) < 0.3
    assert summary["eval_loss_last"] < summary["eval_loss_first"] - 2.5
    assert summary["loss_last"] < summary["loss_first"] - 2.5
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["step"] == 30 and state["config"]["quantize"] == "nf4"
    _peft_equals_ours(os.path.join(out, "base_model"), out)  # the built-in base is saved beside the adapter


def _peft_equals_ours(base_dir, adapter_dir):
    """PEFT and fl.load_adapter load the adapter onto the dense base with equal logits (the same fp32 math in
    another order; logits are O(1): 1e-5), and the adapter changes them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).eval()
    peft_model = PeftModel.from_pretrained(load(), adapter_dir).eval()
    ours = fl.load_adapter(load(), adapter_dir).eval()
    base = load()
    x = torch.randint(4, base.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, plain = peft_model(input_ids=x).logits, ours(input_ids=x).logits, base(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-2


def test_untrained_loss_matches_transformers(tmp_path):
    """Step 0's held-out loss equals transformers' own loss of the untouched model on the same sequences
    (dense base, LoRA B = 0): the label shift, masking and token averaging are transformers' own.
    fp32 on both sides, sums in a different order: 1e-5 relative."""
    from fusedlora.train.data import build_sequences, builtin_records, split
    from fusedlora.train.model import tiny_llama

    out = str(tmp_path / "run")
    assert main([*SMALL, "--steps", "1", "--quantize", "none", "--eval-every", "1", "--out", out]) == 0
    model, tok = tiny_llama()
    held = build_sequences(split(builtin_records(), 0.05)[1], tok, 32, True)
    rows = torch.arange(min(len(held), 8 * 2))  # eval_batches × batch size
    with torch.no_grad():
        ref = model(**held.rows(rows), use_cache=False).loss.item()
    assert _log(out, "eval_loss")[0] == pytest.approx(ref, rel=1e-5)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    args = [*SMALL, "--steps", "24", "--save-every", "4", "--eval-every", "6"]
    ref = str(tmp_path / "ref")
    assert main([*args, "--out", ref]) == 0

    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "fusedlora.train", *args, "--out", out], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(out, "trainer_state.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.require_latest(out)["step"]
    if killed_at >= 24:
        pytest.fail("the run finished before it was killed; the test needs a slower run")

    assert main([*args, "--out", out, "--resume"]) == 0
    # Same computation in the same order on the same CPU: equal to the bit.
    ref_log, log = _log(ref), _log(out)
    assert sorted(log) == list(range(1, 25))
    assert {s: log[s] for s in log if s > killed_at} == {s: ref_log[s] for s in ref_log if s > killed_at}
    assert log == ref_log and _log(out, "eval_loss") == _log(ref, "eval_loss")
    a, b = _adapter(ref), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    assert sorted(n for n in os.listdir(out) if n.startswith(("checkpoint-", ".tmp"))) == ["checkpoint-000024"]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes × batch 2 against one process × batch 4, gradient accumulation 2 in both.
    The gradients are the same sums taken in another order (across processes), so they differ in their last
    fp32 bits. Adam moves each parameter by at most ≈ lr per step (lr ≤ 6e-4 in these warmup steps) and its
    update m/√v barely depends on the gradient's scale, so 4 steps leave the adapters within 1e-6 (under 1%
    of one step; measured: 1.2e-7), while a run that sees half the batch (what unsynchronized gradients
    would give) is off by ≈ 2e-3 (checked: over 100× the difference)."""
    args = ["--seq-len", "32", "--rank", "4", "--dropout", "0", "--steps", "4", "--grad-accum", "2",
            "--eval-every", "2", "--save-every", "0"]
    one = str(tmp_path / "one")
    assert main([*args, "--batch-size", "4", "--out", one]) == 0
    two = str(tmp_path / "two")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "fusedlora.train", *args, "--batch-size", "2", "--out", two],
                   env=_env(), check=True, timeout=300, capture_output=True)
    half = str(tmp_path / "half")
    assert main([*args, "--batch-size", "2", "--out", half]) == 0

    assert json.load(open(os.path.join(two, "summary.json")))["world_size"] == 2
    a, b, c = _adapter(one), _adapter(two), _adapter(half)
    assert a.keys() == b.keys()
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    off = max((a[k] - c[k]).abs().max().item() for k in a)
    assert err < 1e-6 and off > 100 * max(err, 1e-7), (err, off)
    for step, loss in _log(one).items():
        assert _log(two)[step] == pytest.approx(loss, rel=1e-6)  # measured: 2e-8
    for step, loss in _log(one, "eval_loss").items():
        assert _log(two, "eval_loss")[step] == pytest.approx(loss, rel=1e-6)


def test_gradient_checkpointing_and_eval_change_nothing(tmp_path):
    """Recomputing activations in the backward (with the random state of the forward, so the same dropout
    masks) runs the same ops on the same values, and measuring the held-out loss draws nothing and moves no
    data: equal losses and adapters, to the bit on a CPU."""
    args = [*SMALL, "--steps", "3", "--save-every", "0"]
    plain, ckpt = str(tmp_path / "plain"), str(tmp_path / "ckpt")
    assert main([*args, "--eval-every", "0", "--out", plain]) == 0
    assert main([*args, "--eval-every", "1", "--gradient-checkpointing", "--out", ckpt]) == 0
    assert not _log(plain, "eval_loss") and len(_log(ckpt, "eval_loss")) == 4
    assert _log(plain) == _log(ckpt)
    a, b = _adapter(plain), _adapter(ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _word_tokenizer(path, texts):
    """A word-level tokenizer over the words of ``texts`` (ids 0-3: unk, bos, eos, pad), saved in ``path``;
    returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")
    fast.save_pretrained(path)
    return len(vocab)


def _arithmetic(tmp_path, n=6):
    prompts = [f"what is {a} plus {b} ?" for a in range(n) for b in range(n)]
    completions = [f"it is {a + b} ." for a in range(n) for b in range(n)]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in zip(prompts, completions, strict=True)))
    return prompts + completions, str(data)


def _hf_checkpoint(path, texts):
    """A small Llama checkpoint and a word-level tokenizer, saved as transformers saves them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_vocab = _word_tokenizer(path, texts)
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def test_local_transformers_checkpoint_trains_and_peft_loads_the_adapter(tmp_path):
    texts, data = _arithmetic(tmp_path)
    hf = str(tmp_path / "hf")
    _hf_checkpoint(hf, texts)
    out = str(tmp_path / "run")
    assert main(["--model", hf, "--data", data, "--steps", "8", "--batch-size", "4", "--seq-len", "16",
                 "--no-pack", "--target-modules", "q_proj", "v_proj", "down_proj", "--rank", "4", "--lr", "1e-2",
                 "--eval-every", "4", "--out", out]) == 0
    log = _log(out)
    assert log[8] < log[1]

    _peft_equals_ours(hf, out)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["base_model_name_or_path"] == hf and cfg["task_type"] == "CAUSAL_LM"

    with pytest.raises(SystemExit):  # argparse: --pack/--no-pack takes no value
        main(["--model", hf, "--no-pack=1"])


@pytest.mark.slow
def test_bitsandbytes_4bit_checkpoint_trains_over_its_own_4bit_weights(tmp_path):
    """A checkpoint saved by transformers + bitsandbytes (NF4, double quantization) trains with its stored
    4-bit tensors as the base; the adapter loads back onto fl.load_quantized of the same folder."""
    from lora_models import bnb_nf4_checkpoint

    texts, data = _arithmetic(tmp_path, n=4)
    nf4_dir, _, _ = bnb_nf4_checkpoint(str(tmp_path))
    assert _word_tokenizer(nf4_dir, texts) <= 97  # the checkpoint's vocabulary
    out = str(tmp_path / "run")
    assert main(["--model", nf4_dir, "--data", data, "--steps", "6", "--batch-size", "4", "--seq-len", "16",
                 "--rank", "4", "--lr", "1e-2", "--eval-every", "3", "--out", out]) == 0
    evals = _log(out, "eval_loss")
    assert evals[6] < evals[0]
    model = fl.load_adapter(fl.load_quantized(nf4_dir), out)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, fl.LoRALinear) and layer.quantized and layer.lora_B.abs().max() > 0


# ------------------------------------------------------------------------------------------------- errors


def _fails(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_resume_without_checkpoint(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    _fails(capsys, ["--resume", "--out", missing], f"the output directory {missing} does not exist")
    assert not os.path.exists(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["--resume", "--out", str(empty)], "holds no checkpoint (trainer_state.json not found)")
    assert os.listdir(empty) == []


def test_bad_jsonl_line_and_too_long_sequences_write_nothing(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n"
                    + json.dumps({"prompt": "no completion"}) + "\n")
    out = tmp_path / "out"
    _fails(capsys, [*SMALL, "--data", str(data), "--out", str(out)],
           f'{data} line 3: expected a "text" field, or "prompt" and "completion", or "instruction" and "output"')
    _fails(capsys, ["--seq-len", "4096", "--out", str(out)],
           "--seq-len: 4096 is longer than the built-in model allows (max_position_embeddings=1024)")
    _fails(capsys, [*SMALL, "--data", str(tmp_path / "none.jsonl"), "--out", str(out)], "does not exist")
    assert not out.exists()


def test_resume_with_another_config_and_fresh_run_over_a_run_change_nothing(finished_run, capsys):
    before = _tree_digest(finished_run)
    _fails(capsys, ["--resume", "--out", finished_run, "--rank", "8"],
           "--rank: checkpoint has 4, command line gives 8")
    _fails(capsys, [*SMALL, "--steps", "4", "--out", finished_run],
           f"{finished_run} already holds a run (checkpoint at step 4)")
    assert _tree_digest(finished_run) == before


def test_kill_between_checkpoint_rename_and_state_replacement_resumes_from_it(finished_run, tmp_path, monkeypatch):
    """A kill after checkpoint 4's folder is renamed into place but before DIR/trainer_state.json moves: the
    file still names checkpoint 2, yet --resume finds the newer complete folder and continues from it (the
    result is the uninterrupted run's), and the pruning that follows removes only the older checkpoint."""
    out = str(tmp_path / "run")
    real = checkpoint._replace_copy

    def crash_at_step_4(src, dst):
        if "checkpoint-000004" in src:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_replace_copy", crash_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            main([*SMALL, "--steps", "4", "--save-every", "2", "--eval-every", "2", "--out", out])
    assert json.load(open(os.path.join(out, "trainer_state.json")))["step"] == 2
    assert {"checkpoint-000002", "checkpoint-000004"} <= set(os.listdir(out))
    assert checkpoint.require_latest(out)["step"] == 4

    assert main(["--resume", "--out", out]) == 0  # nothing left to do: the outputs show checkpoint 4
    assert json.load(open(os.path.join(out, "trainer_state.json")))["step"] == 4
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-000004"]
    a, b = _adapter(finished_run), _adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(json.load(open(os.path.join(out, "summary.json")))["loss_last"])


def _tiny_base():
    from fusedlora.train.model import tiny_llama

    return tiny_llama()[0]


def test_dora_run_trains_the_magnitudes_and_resumes_exactly(tmp_path, monkeypatch):
    """--dora: the adapter carries PEFT's use_dora and one magnitude per targeted linear, the magnitudes are
    trained (the optimizer holds their state, they move between checkpoints), PEFT and fl.load_adapter read
    the adapter alike, and a run stopped after checkpoint 2 resumes to the uninterrupted run's result, to the
    bit (the magnitudes are restored with the other adapter tensors)."""
    args = [*SMALL, "--dora", "--steps", "4", "--save-every", "2", "--eval-every", "0"]
    ref = str(tmp_path / "ref")
    assert main([*args, "--out", ref]) == 0
    losses = _log(ref)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    config = json.load(open(os.path.join(ref, "adapter_config.json")))
    assert config["use_dora"] is True
    final = _adapter(ref)
    mags = sorted(k for k in final if k.endswith(".lora_magnitude_vector"))
    assert mags and len(mags) == len([k for k in final if k.endswith("lora_A.weight")])
    state = load_file(os.path.join(ref, "checkpoint-000004", checkpoint.OPTIMIZER))
    moments = [v for k, v in state.items() if k.startswith("exp_avg/") and "lora_magnitude_vector" in k]
    assert len(moments) == len(mags) and all(v.abs().max() > 0 for v in moments)

    out = str(tmp_path / "stopped")
    real = checkpoint.save

    def stop_at_step_4(out_dir, step, *rest):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return real(out_dir, step, *rest)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", stop_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            main([*args, "--out", out])
    assert checkpoint.require_latest(out)["step"] == 2
    at_2 = _adapter(out)
    assert all(not torch.equal(at_2[k], final[k]) for k in mags)  # steps 3 and 4 moved every magnitude
    assert main(["--resume", "--out", out]) == 0
    assert _log(out) == losses
    resumed = _adapter(out)
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    _peft_equals_ours(os.path.join(ref, "base_model"), ref)

