"""`fusedlora plan`: its byte arithmetic against the tensors of the built-in tiny model, converted with LoRA on
all linears (dense, NF4 with double quantization, INT4), and the command line."""

import math

import pytest

import fusedlora as fl
from fusedlora import plan
from fusedlora.cli import main
from fusedlora.train.model import tiny_llama, tiny_llama_config

STORAGE = ("quant_data", "quant_absmax", "quant_nested_absmax", "quant_nested_code", "quant_scales", "quant_zeros")


def _frozen_base_bytes(model) -> int:
    """The bytes of the frozen base as the model holds it: dense parameters and the 4-bit storage tensors."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    for m in model.modules():
        if isinstance(m, fl.LoRALinear) and m.quantized:
            total += sum(getattr(m, n).numel() * getattr(m, n).element_size() for n in STORAGE
                         if getattr(m, n) is not None)
    return total


@pytest.mark.parametrize("fmt, quantize", [("none", None), ("nf4", "nf4"),
                                           ("int4", {"scheme": "int4", "group_size": 128})])
def test_base_and_adapter_bytes_match_the_tiny_model(fmt, quantize):
    arch = plan.Architecture.from_config(tiny_llama_config().to_dict())
    model = fl.inject(tiny_llama()[0], target_modules="all-linear", r=4, alpha=8, quantize=quantize)
    run = plan.Run(gpus=1, seq_len=16, batch_size=2, rank=4, dtype_bytes=4)  # the tiny model is fp32 on CPU
    assert plan.base_bytes(arch, fmt, run) == _frozen_base_bytes(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.lora_params(arch, 4) == trainable
    one = plan.plan(arch, fmt, run)
    assert one["base shard"] == _frozen_base_bytes(model) and one["all-gather buffers"] == 0
    assert one["adapters + grads + AdamW"] == 16 * trainable
    assert one["logits / loss"] == 2 * 16 * arch.vocab * (4 + 12)
    two = plan.plan(arch, fmt, plan.Run(gpus=2, seq_len=16, batch_size=2, rank=4, dtype_bytes=4))
    assert two["base shard"] == math.ceil(one["base shard"] / 2)
    assert two["adapters + grads + AdamW"] == 8 * trainable
    # the root unit (embeddings, final norm, head) plus two of the largest units
    assert two["all-gather buffers"] > 4 * (2 * arch.vocab * 128 + 128)
    assert one["total"] == sum(v for k, v in one.items() if k != "total")


def test_activations_with_and_without_checkpointing():
    arch = plan.Architecture.from_config(plan.PRESETS["llama-3.1-8b"])
    full = plan.plan(arch, "nf4", plan.Run(gpus=1, seq_len=1024, batch_size=1))
    ckpt = plan.plan(arch, "nf4", plan.Run(gpus=1, seq_len=1024, batch_size=1, gradient_checkpointing=True))
    per_layer = plan.activation_bytes_per_token(arch, 16) * 1024
    assert full["activations"] == 32 * per_layer
    assert ckpt["activations"] == 32 * 4096 * 2 * 1024 + per_layer


def test_parse_bytes():
    assert plan.parse_bytes("24GB") == 24 * 10**9
    assert plan.parse_bytes("80GiB") == 80 * 2**30
    assert plan.parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="--gpu-memory"):
        plan.parse_bytes("lots")


def test_cli(tmp_path, capsys):
    assert main(["plan", "--model", "llama-2-70b", "--gpus", "2", "--gpu-memory", "24GB", "--seq-len", "2048",
                 "--batch-size", "1", "--gradient-checkpointing", "--cpu-offload"]) == 0
    out = capsys.readouterr().out
    assert "NF4 base" in out and "fits in 22.4 GiB" in out and "all-gather buffers" in out
    (tmp_path / "config.json").write_text(tiny_llama_config().to_json_string())
    assert main(["plan", "--model", str(tmp_path), "--gpus", "1", "--seq-len", "16", "--batch-size", "1"]) == 0
    with pytest.raises(SystemExit, match="neither a preset"):
        main(["plan", "--model", str(tmp_path / "missing"), "--seq-len", "16"])
