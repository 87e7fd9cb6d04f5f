"""The model a run trains: the built-in tiny Llama-architecture model, or a local Hugging Face checkpoint."""

from __future__ import annotations

import json
import os

import torch

import fusedlora as fl

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


def load_hf(path: str, dtype: torch.dtype):
    """(model, tokenizer) from a local transformers checkpoint directory (never the network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model: {path} is not a directory (expected a local Hugging Face checkpoint)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model: {path} has no config.json (expected a Hugging Face checkpoint)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if is_bnb_4bit(path):
        # Its 4-bit weights are kept as they are (fused layers over the stored NF4 tensors), never requantized.
        model = fl.load_quantized(path, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model, HFTokenizer(tok)


def is_bnb_4bit(path: str) -> bool:
    """Whether the checkpoint was saved by transformers with a bitsandbytes 4-bit quantization_config."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_seq_len(model, seq_len: int, what: str) -> None:
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len: {seq_len} is longer than {what} allows (max_position_embeddings={limit})")
