"""The model a run trains: the built-in tiny Llama-architecture model, or a local Hugging Face checkpoint."""

from __future__ import annotations

import os

import torch

import fusedlora as fl

from ..plan import read_config
from .data import ByteTokenizer, HFTokenizer

TINY_NAME = "fusedlora-tiny-llama"
# The built-in base is the same for every --seed: runs with different seeds start from one model.
TINY_SEED = 0


def tiny_llama_config():
    """Two layers of width 128 over the byte vocabulary: one optimizer step of 8×128 tokens takes tens of
    milliseconds on a CPU core; every K (128, 384) is a multiple of INT4's group size 128.

    initializer_range 0.1 (transformers' default is 0.02) because the output head stays frozen: its rows
    have norm ≈ 0.1·√128 ≈ 1.1, so the final hidden state (norm ≈ √128 after RMSNorm) can reach logits up
    to ≈ 13 through LoRA alone, where 0.02 caps them near 2.6. Measured over 300 steps (dense base): the
    loss ends at 0.61 with 0.1 and stalls at 3.6 with 0.02."""
    from transformers import LlamaConfig

    tok = ByteTokenizer()
    return LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_llama():
    """(model, tokenizer): the built-in model, its weights drawn from TINY_SEED without touching the caller's
    random state."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(tiny_llama_config())
    model.config.name_or_path = TINY_NAME
    return model, ByteTokenizer()


def check_model_dir(path: str) -> dict:
    """The checkpoint's config.json as a dict, read without loading anything else."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model: {path} is not a directory (expected a local Hugging Face checkpoint)")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--model: {path} has no config.json (expected a Hugging Face checkpoint)")
    return read_config(config)


def load_tokenizer(path: str | None):
    """The run's tokenizer: the built-in byte tokenizer, or the checkpoint's (never the network)."""
    if path is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model: cannot load the tokenizer in {path} ({str(exc).splitlines()[0]})") from None
    return HFTokenizer(tok)


def load_model(path: str | None, dtype: torch.dtype):
    """The built-in model, or a local transformers checkpoint; a bitsandbytes 4-bit one keeps its 4-bit
    weights as they are (fused layers over the stored NF4 tensors), never requantized."""
    if path is None:
        return tiny_llama()[0]
    from transformers import AutoModelForCausalLM

    if is_bnb_4bit(path):
        return fl.load_quantized(path, dtype)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)


def is_bnb_4bit(path: str) -> bool:
    """Whether the checkpoint was saved by transformers with a bitsandbytes 4-bit quantization_config."""
    qc = check_model_dir(path).get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))


def check_seq_len(path: str | None, seq_len: int) -> None:
    """--seq-len against the model's max_position_embeddings, read from its config (before it loads)."""
    if path is None:
        limit, what = tiny_llama_config().max_position_embeddings, "the built-in model"
    else:
        doc = check_model_dir(path)
        limit = doc.get("max_position_embeddings", (doc.get("text_config") or {}).get("max_position_embeddings"))
        what = f"the model in {path}"
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"--seq-len: {seq_len} is longer than {what} allows (max_position_embeddings={limit})")
