"""Tiny transformers models built from configs (no downloads) and helpers shared by the LoRA layer tests."""

from __future__ import annotations

import copy

import pytest
import torch

# fp32 tolerance for comparing two fp32 evaluations of the same model whose only differences are the order
# of additions: each logit is a chain of a few dot products of length <= 96 through 2 layers; fp32
# round-off (6e-8 per add) over ~100 terms of O(1) values stays < 1e-5 on logits of magnitude ~1.
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def tiny_llama(seed: int = 0, layers: int = 2, intermediate: int = 96, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


BERT_TARGETS = ["query", "key", "value", "dense"]


def token_ids(seed: int = 1, batch: int = 2, seq: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, seq), generator=g)


def outputs(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_model(base, seed: int = 3, **lora_kwargs):
    """PEFT LoRA over a copy of ``base`` with A and B both random (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    return get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs)).eval()


def bnb_nf4_checkpoint(tmp_dir, seed: int = 0, double_quant: bool = True, tie: bool = False,
                       max_shard_size: str | None = None):
    """A tiny Llama quantized to NF4 (double quantization) by transformers + bitsandbytes on CPU and saved
    with save_pretrained; returns (its folder, the bitsandbytes model, the dense model it came from).

    intermediate_size is 128, not 96: bitsandbytes 0.50.2's CPU dequantize_4bit decodes a [64, 96] weight
    wrongly (blocks of 64 that cross rows; its bytes are right, fusedlora decodes them exactly), and its
    CPU Linear4bit forward uses that dequantize, so it is no oracle for such shapes.
    """
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    dense = tiny_llama(seed, intermediate=128, tie=tie)
    dense.save_pretrained(f"{tmp_dir}/dense")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                            bnb_4bit_compute_dtype=torch.float32)
    bnb_model = LlamaForCausalLM.from_pretrained(f"{tmp_dir}/dense", quantization_config=qc, device_map="cpu",
                                                 dtype=torch.float32)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    bnb_model.save_pretrained(f"{tmp_dir}/nf4", **kwargs)
    return f"{tmp_dir}/nf4", bnb_model, dense


def dequantized_twin(bnb_model, dense):
    """``dense`` with each 4-bit weight replaced by bitsandbytes' dequantization of the 4-bit state (read
    before any eval-mode forward, which would convert that state for bitsandbytes' CPU kernel)."""
    import bitsandbytes.functional as bnbf

    twin = copy.deepcopy(dense)
    with torch.no_grad():
        for name, module in bnb_model.named_modules():
            w = getattr(module, "weight", None)
            if getattr(w, "quant_state", None) is not None:
                twin.get_submodule(name).weight.copy_(bnbf.dequantize_4bit(w.data, w.quant_state))
    return twin


def trainer_run(model, out_dir, max_steps=4, resume=None, stop_after=None):
    """Trainer.train of 4 planned steps; ``stop_after``: the run is cut there (after its checkpoint)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_after:
                control.should_training_stop = True

    data = [{"input_ids": ids, "labels": ids} for ids in token_ids(seed=11, batch=8, seq=12)]
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Stop()] if stop_after else None)
    trainer.train(resume_from_checkpoint=resume)
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def record_dropout_masks(monkeypatch, seed: int = 7) -> list[torch.Tensor]:
    """torch.nn.functional.dropout replaced by one whose keep-masks come from a generator seeded with
    ``seed``; the returned list receives each mask, in call order (PEFT's dropout modules call it)."""
    real, gen, masks = torch.nn.functional.dropout, torch.Generator().manual_seed(seed), []

    def recorded(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return real(x, p, training, inplace)
        mask = torch.rand(x.shape, generator=gen) >= p
        masks.append(mask)
        return x * mask / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", recorded)
    return masks


def check_resumed_losses(rest: dict, full: dict) -> None:
    """A run resumed from checkpoint-2 against the uninterrupted one: the same computation from the saved
    adapter, optimizer, scheduler and RNG states, equal up to fp32 ordering of the same sums."""
    for step in (3, 4):
        assert rest[step] == pytest.approx(full[step], rel=1e-4, abs=1e-4)


def check_injected_checkpoints(run, make_model, out_dir):
    """``run`` (trainer_run, or the SFTTrainer one) on the injected model ``make_model()`` builds: its
    checkpoints hold the whole model, the last reloads with load_quantized to the same outputs bit for bit,
    and a run cut after step 2 and resumed reaches the uninterrupted losses. Returns (losses, reloaded)."""
    import fusedlora as fl

    trained = make_model()
    full = run(trained, out_dir / "full")
    assert (out_dir / "full" / "checkpoint-2" / "model.safetensors").is_file()
    reloaded = fl.load_quantized(out_dir / "full" / "checkpoint-4")
    ids = token_ids()
    torch.testing.assert_close(outputs(reloaded, ids), outputs(trained.eval(), ids), atol=0, rtol=0)
    assert sorted(run(make_model(), out_dir / "cut", stop_after=2)) == [1, 2]
    check_resumed_losses(run(make_model(), out_dir / "cut", resume=str(out_dir / "cut" / "checkpoint-2")), full)
    return full, reloaded


def check_accelerated_peft_checkpoints(run, base, out_dir) -> dict:
    """``run`` on accelerated PEFT LoRA models over ``base``: PEFT's adapter-only checkpoints, the last of
    which loads in plain PEFT to the same outputs, and a run cut after step 2 and resumed reaches the
    uninterrupted losses. Returns the uninterrupted run's losses."""
    from peft import PeftModel

    import fusedlora as fl

    def model():
        return fl.accelerate(peft_model(base, r=4, lora_alpha=8, target_modules="all-linear"))

    pm = model()
    full = run(pm, out_dir / "full")
    ckpt = out_dir / "full" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()  # PEFT's adapter-only checkpoint
    ids = token_ids()
    again = PeftModel.from_pretrained(copy.deepcopy(base), ckpt).eval()
    torch.testing.assert_close(outputs(again, ids), outputs(pm.eval(), ids), **FP32_TOL)
    assert sorted(run(model(), out_dir / "cut", stop_after=2)) == [1, 2]
    check_resumed_losses(run(model(), out_dir / "cut", resume=str(out_dir / "cut" / "checkpoint-2")), full)
    return full
