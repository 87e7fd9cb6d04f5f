"""Injected models in the workflows of transformers users: save_pretrained, a disabled adapter (DPO's
reference model), load_adapter that is all or nothing and can build the 4-bit base."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import (
    BERT_TARGETS,
    FP32_TOL,
    check_injected_checkpoints,
    outputs,
    peft_model,
    tiny_bert,
    tiny_llama,
    token_ids,
    trainer_run,
)
from safetensors import safe_open

import fusedlora as fl
from fusedlora.inject import CONFIG_ATTR, lora_layers


def test_save_pretrained_with_double_quant_has_no_shared_tensors(tmp_path):
    model = fl.inject(tiny_llama(), r=4, alpha=8, quantize="nf4", init_lora_weights=False)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        code = f.get_tensor("model.layers.1.self_attn.o_proj.quant_nested_code")
    assert "model.layers.0.mlp.down_proj.quant_nested_code" in keys and "model.layers.0.mlp.down_proj.lora_B" in keys
    q = lora_layers(model)["model.layers.1.self_attn.o_proj"]
    assert torch.equal(code, q.quant_nested_code)
    codes = {m.quant_nested_code.data_ptr() for m in lora_layers(model).values()}
    assert len(codes) == 14  # one code book per layer


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_disable_adapter_runs_the_base_alone(quantize):
    base = tiny_llama()
    model = fl.inject(copy.deepcopy(base), r=4, alpha=8, quantize=quantize, init_lora_weights=False)
    ids = token_ids()
    with_adapter = outputs(model, ids)
    reference = fl.inject(copy.deepcopy(base), r=4, alpha=8, quantize=quantize)  # B = 0: the base alone
    with fl.disable_adapter(model) as same:
        assert same is model
        # the same base and op with the update scaled by 0 (exactly 0 for finite A, B): bit for bit
        torch.testing.assert_close(outputs(model, ids), outputs(reference, ids), atol=0, rtol=0)
        with fl.disable_adapter(model):
            pass
        torch.testing.assert_close(outputs(model, ids), outputs(reference, ids), atol=0, rtol=0)
    torch.testing.assert_close(outputs(model, ids), with_adapter, atol=0, rtol=0)
    with pytest.raises(RuntimeError), fl.disable_adapter(model):
        raise RuntimeError("inside")
    torch.testing.assert_close(outputs(model, ids), with_adapter, atol=0, rtol=0)
    lora_layers(model)["model.layers.0.self_attn.q_proj"].merge()
    with pytest.raises(ValueError, match="merged"), fl.disable_adapter(model):
        pass


def _saved_adapter(tmp_path, r=4, **kwargs):
    pm = peft_model(tiny_llama(), r=r, lora_alpha=8, **kwargs)
    pm.save_pretrained(tmp_path)
    return pm


def test_load_adapter_with_quantize_builds_the_4bit_base(tmp_path):
    _saved_adapter(tmp_path, target_modules="all-linear")
    model = fl.load_adapter(tiny_llama(), tmp_path, quantize="nf4")
    layers = lora_layers(model)
    assert len(layers) == 14 and all(m.quantized and m.r == 4 for m in layers.values())
    # the same as quantizing first, then loading into that injected model
    by_hand = fl.inject(tiny_llama(), r=4, alpha=8, quantize="nf4")
    fl.load_adapter(by_hand, tmp_path)
    ids = token_ids()
    torch.testing.assert_close(outputs(model, ids), outputs(by_hand, ids), atol=0, rtol=0)


def test_load_adapter_failure_leaves_the_model_as_it_was(tmp_path):
    pm = _saved_adapter(tmp_path, target_modules=["q_proj", "down_proj"])
    plain = tiny_llama()
    modules = dict(plain.named_modules())
    # inject fails half way: q_proj (K = 64) quantizes in groups of 64, then down_proj (K = 96) cannot
    with pytest.raises(ValueError, match="quantizing model.layers.0.mlp.down_proj"):
        fl.load_adapter(plain, tmp_path, quantize={"scheme": "int4", "group_size": 64})
    assert dict(plain.named_modules()) == modules and not lora_layers(plain)
    assert not hasattr(plain, CONFIG_ATTR)
    assert all(p.requires_grad for p in plain.parameters())

    # an injected model keeps its adapter values when a second adapter does not fit
    model = fl.load_adapter(tiny_llama(), tmp_path)
    ids = token_ids()
    expected = outputs(model, ids)
    torch.testing.assert_close(expected, outputs(pm.eval(), ids), **FP32_TOL)
    other = tmp_path / "other"
    _saved_adapter(other, target_modules=["q_proj", "down_proj"], r=2)
    with pytest.raises(ValueError, match="r=4"):
        fl.load_adapter(model, other)
    torch.testing.assert_close(outputs(model, ids), expected, atol=0, rtol=0)


def test_an_adapter_for_another_base_names_it(tmp_path):
    from transformers import BertConfig, BertModel

    _saved_adapter(tmp_path, target_modules=["q_proj", "down_proj"])
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace('"base_model_name_or_path": null',
                                                 '"base_model_name_or_path": "org/llama-tiny"'))
    bert = BertModel(BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=96))
    bert.config._name_or_path = "org/bert-tiny"
    with pytest.raises(ValueError, match="trained on base model 'org/llama-tiny', this model is 'org/bert-tiny'"):
        fl.load_adapter(bert, tmp_path)
    assert not lora_layers(bert)


def test_trainer_checkpoints_and_resumes_an_injected_nf4_model(tmp_path):
    """transformers' Trainer saves an injected model (4-bit double-quant base, LoRA tensors) through its
    full state dict at each checkpoint and resumes from one to the same losses as an uninterrupted run."""

    def model():
        torch.manual_seed(3)
        return fl.inject(tiny_llama(), r=4, alpha=8, quantize="nf4", init_lora_weights=False)

    check_injected_checkpoints(trainer_run, model, tmp_path)


@pytest.mark.parametrize("quantize", [None, "nf4", {"scheme": "int4", "group_size": 64},
                                      {"scheme": "nf4", "double_quant": False}])
def test_save_pretrained_reloads_with_load_quantized(tmp_path, quantize):
    torch.manual_seed(5)
    targets = "all-linear" if quantize != {"scheme": "int4", "group_size": 64} else ["q_proj", "v_proj", "o_proj"]
    model = fl.inject(tiny_llama(), target_modules=targets, r=4, alpha=8, quantize=quantize,
                      init_lora_weights=False, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0},
                      use_rslora=True)
    layers = lora_layers(model)
    assert all(m.lora_B.abs().min() > 0 for m in layers.values())  # a non-zero update everywhere
    ids = token_ids()
    expected = outputs(model, ids)
    model.save_pretrained(tmp_path)

    reloaded = fl.load_quantized(tmp_path)
    again = lora_layers(reloaded)
    assert sorted(again) == sorted(layers)
    for name, layer in layers.items():
        new = again[name]
        assert (new.r, new.alpha, new.use_rslora, new.quantized) == (layer.r, layer.alpha, True, layer.quantized)
        assert new.scaling == layer.scaling
        assert torch.equal(new.lora_A, layer.lora_A) and torch.equal(new.lora_B, layer.lora_B)
    assert layers["model.layers.0.self_attn.q_proj"].r == 2 and again["model.layers.1.self_attn.v_proj"].alpha == 3.0
    # the same tensors, settings and op as the saved model: equal bit for bit
    torch.testing.assert_close(outputs(reloaded, ids), expected, atol=0, rtol=0)
    trainable = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # the reloaded model's adapter, saved alone, loads onto a fresh base (quantized the same way) to the
    # same outputs
    fl.save_adapter(reloaded, tmp_path / "adapter")
    by_adapter = fl.load_adapter(tiny_llama(), tmp_path / "adapter", quantize=quantize)
    torch.testing.assert_close(outputs(by_adapter, ids), expected, atol=0, rtol=0)


def test_load_quantized_refuses_lora_keys_without_settings(tmp_path):
    import json

    model = fl.inject(tiny_llama(), target_modules=["q_proj"], r=4, alpha=8, init_lora_weights=False)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["fusedlora_adapter"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lora_A: config.json has no 'fusedlora_adapter'"):
        fl.load_quantized(tmp_path)


def test_merged_model_saves_without_adapter_settings(tmp_path):
    from transformers import AutoModelForCausalLM

    model = fl.inject(tiny_llama(), r=4, alpha=8, init_lora_weights=False)
    ids = token_ids()
    expected = outputs(model, ids)
    fl.merge(model).save_pretrained(tmp_path)
    assert "fusedlora_adapter" not in (tmp_path / "config.json").read_text()
    torch.testing.assert_close(outputs(AutoModelForCausalLM.from_pretrained(tmp_path), ids), expected, **FP32_TOL)


def _trained_head(model):
    """Stands for a fine-tuned head: the classifier moved away from its initial values."""
    head = model.get_submodule("classifier")
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight))
        head.bias.add_(torch.randn_like(head.bias))
    return head


def test_modules_to_save_head_is_trained_saved_and_reloaded(tmp_path):
    from peft import PeftModel

    torch.manual_seed(7)
    model = fl.inject(tiny_bert(), target_modules=BERT_TARGETS, r=4, alpha=8, init_lora_weights=False,
                      modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or n.endswith(("lora_A", "lora_B")) for n in trainable)
    _trained_head(model)
    ids = token_ids()
    expected = outputs(model, ids)

    # the whole model: save_pretrained, then load_quantized (the head trainable again)
    model.save_pretrained(tmp_path / "full")
    reloaded = fl.load_quantized(tmp_path / "full")
    torch.testing.assert_close(outputs(reloaded, ids), expected, atol=0, rtol=0)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == trainable

    # the adapter alone: PEFT's format with the head; PEFT and load_adapter take it back. PEFT runs its
    # unfused LoRA (x·Aᵀ·Bᵀ after x·Wᵀ), the fused op sums in another order: fp32 tolerance
    fl.save_adapter(model, tmp_path / "adapter")
    pm = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval()
    torch.testing.assert_close(outputs(pm, ids), expected, **FP32_TOL)
    again = fl.load_adapter(tiny_bert(), tmp_path / "adapter")
    torch.testing.assert_close(outputs(again, ids), expected, atol=0, rtol=0)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable


def test_peft_sequence_classification_adapter_loads_with_its_head(tmp_path):
    pm = peft_model(tiny_bert(), r=4, lora_alpha=8, target_modules=BERT_TARGETS, task_type="SEQ_CLS")
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(3)  # a trained head
    pm.save_pretrained(tmp_path)
    ids = token_ids()
    model = fl.load_adapter(tiny_bert(), tmp_path)  # the config lists ["classifier", "score"]
    torch.testing.assert_close(outputs(model, ids), outputs(pm, ids), **FP32_TOL)

    # a head of another shape: refused, the model left as it was
    plain = tiny_bert()
    plain.classifier = torch.nn.Linear(64, 5)
    before = outputs(plain, ids)
    with pytest.raises(ValueError, match="classifier.weight.*modules_to_save"):
        fl.load_adapter(plain, tmp_path)
    assert not lora_layers(plain)
    torch.testing.assert_close(outputs(plain, ids), before, atol=0, rtol=0)


def test_modules_to_save_must_name_modules_outside_the_adapters():
    with pytest.raises(ValueError, match="no module is named 'head'"):
        fl.inject(tiny_bert(), target_modules=BERT_TARGETS, modules_to_save=["head"])
    with pytest.raises(ValueError, match="covers target layers"):
        fl.inject(tiny_bert(), target_modules=BERT_TARGETS + ["classifier"], modules_to_save=["classifier"])
