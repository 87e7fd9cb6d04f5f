"""fusedlora.shard_loading.load_sharded: a 4-bit base built on the meta device and materialized layer by layer
from safetensors under FSDP2 (gloo, 2 processes on CPU)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "shard_loading_worker.py")


def _checkpoint(path, layers=8, hidden=512, tie=False):
    """A random Llama of ``layers`` layers, saved in fp32: 105 MiB at the defaults, one decoder layer 13 MiB
    (one linear at most 3 MiB), so the base is 8× one layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
def test_load_sharded_holds_a_shard_plus_one_layer(tmp_path):
    """tests/shard_loading_worker.py: each process's peak resident set grows by less than half the checkpoint
    while it loads (measured: 26 MiB of 105 MiB: its half of the NF4 base, 7 MiB, plus one linear's fp32
    weight and quantization temporaries, plus the adapters), where the whole model alone takes at least the
    checkpoint's bytes. The model equals from_pretrained + inject(quantize="nf4") + fully_shard under the
    same seed: every local shard, and the logits, to the bit.

    glibc's malloc raises its mmap threshold to the size of each large block freed, after which such blocks
    come from the heap, whose freed holes between live allocations stay resident: the resident set then counts
    fragmentation, not what the process holds (measured: 87 MiB here). A fixed threshold
    (MALLOC_MMAP_THRESHOLD_) keeps large blocks in their own mappings, returned to the system when freed."""
    _run_worker(_checkpoint(str(tmp_path / "ckpt")))


def _run_worker(path: str, *extra: str) -> str:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, path,
           *extra]
    done = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


@pytest.mark.slow
def test_load_sharded_of_a_1gib_checkpoint_holds_a_shard_plus_one_layer(tmp_path):
    """The same bound at the size where it matters: a 1.1 GiB fp32 checkpoint (21 layers of 52 MiB, one
    linear at most 12 MiB), loaded by 2 processes: each one's peak resident set grows by less than half the
    checkpoint (the worker asserts it and prints the growth)."""
    path = _checkpoint(str(tmp_path / "ckpt"), layers=21, hidden=1024)
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    assert size >= 2**30
    out = _run_worker(path, "--memory-only")
    assert out.count("loading grew the peak resident set by") == 2, out


def test_weight_files_single_and_indexed(tmp_path):
    import json

    from safetensors.torch import save_file

    from fusedlora.shard_loading import weight_files

    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        weight_files(str(tmp_path))
    save_file({"a": torch.zeros(2), "b": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    assert weight_files(str(tmp_path)) == dict.fromkeys("ab", str(tmp_path / "model.safetensors"))
    index = {"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_files(str(tmp_path))["b"] == str(tmp_path / "part-2.safetensors")


def test_load_sharded_refusals(tmp_path):
    from fusedlora.shard_loading import load_sharded

    path = _checkpoint(str(tmp_path / "tied"), layers=1, hidden=64, tie=True)
    with pytest.raises(ValueError, match="quantize is required"):
        load_sharded(path, quantize=None)


def _torchrun2(*args):
    from test_sharding import _env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fusedlora.train", *args]
    done = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "layer by layer into 2 shards" in done.stderr


def _two_processes_equal_one(tmp_path, args, resume=False):
    """`fusedlora train --fsdp` on 2 processes, which loads through load_sharded, against 1 process given the
    same global batch through --grad-accum (the tolerance: tests/test_sharding.py's _check_equal_runs);
    ``resume``: both runs then extended by 3 steps from their checkpoints, the 2-process one again loading
    layer by layer and taking its adapters and optimizer state from whole tensors."""
    from test_sharding import ARGS, _check_equal_runs

    from fusedlora.train.main import main

    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    args = [*ARGS, *args]
    dora = "--dora" in args
    _torchrun2(*args, "--fsdp", "--out", two)
    assert main([*args, "--grad-accum", "2", "--out", one]) == 0
    _check_equal_runs(two, one, dora=dora)
    if resume:
        _torchrun2("--resume", "--steps", "9", "--out", two)
        assert main(["--resume", "--steps", "9", "--out", one]) == 0
        _check_equal_runs(two, one, dora=dora)


@pytest.mark.slow
def test_train_fsdp_loads_a_dense_checkpoint_layer_by_layer(tmp_path):
    """`fusedlora train --fsdp --model DIR --quantize nf4` on 2 processes loads DIR (tied embeddings) through
    load_sharded and trains as one process given the same global batch through --grad-accum, also after both
    resume."""
    from test_train_run import _arithmetic, _word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    texts, data = _arithmetic(tmp_path)
    hf = str(tmp_path / "hf")
    config = LlamaConfig(vocab_size=_word_tokenizer(hf, texts), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.1,
                         tie_word_embeddings=True)  # tied: one tensor, read once, shared by the head
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf)
    _two_processes_equal_one(tmp_path, ["--model", hf, "--data", data, "--quantize", "nf4"], resume=True)


@pytest.mark.slow
def test_train_fsdp_reads_a_bitsandbytes_checkpoint_layer_by_layer(tmp_path):
    """The same over a bitsandbytes NF4 checkpoint (double quantization), with DoRA adapters: its 4-bit
    tensors are read layer by layer as they are, each layer's magnitude is made from them as it is built,
    and the run equals the 1-process run, which loads it whole (fl.load_quantized)."""
    from lora_models import bnb_nf4_checkpoint
    from test_train_run import _arithmetic, _word_tokenizer

    texts, data = _arithmetic(tmp_path, n=4)
    nf4_dir, _, _ = bnb_nf4_checkpoint(str(tmp_path), tie=False)
    assert _word_tokenizer(nf4_dir, texts) <= 97
    _two_processes_equal_one(tmp_path, ["--model", nf4_dir, "--data", data, "--dora"])
