"""from_peft and load_quantized against PEFT, transformers and bitsandbytes on CPU (tiny models, no downloads)."""

import copy

import pytest
import torch
from lora_models import (
    BERT_TARGETS,
    FP32_TOL,
    bnb_nf4_checkpoint,
    dequantized_twin,
    outputs,
    peft_model,
    tiny_bert,
    tiny_llama,
    token_ids,
)

import fusedlora as fl
from fusedlora.inject import lora_layers
from fusedlora.modules import LoRALinear

pytest.importorskip("peft")


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
        ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                       rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})),
        ("bert", dict(r=3, lora_alpha=5, target_modules=BERT_TARGETS, rank_pattern={"query": 6},
                      lora_dropout=0.1)),
    ],
)
def test_from_peft_equal_outputs(arch, kwargs):
    base = tiny_llama() if arch == "llama" else tiny_bert()
    ids = token_ids()
    pm = peft_model(base, **kwargs)
    expected = outputs(pm, ids)
    assert (expected - outputs(base, ids)).abs().max() > 1e-2  # random A and B: the adapters matter
    peft_layers = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    params = {n: m.lora_A["default"].weight for n, m in peft_layers.items()}
    model = fl.from_peft(pm)
    assert type(model) is type(base)
    layers = lora_layers(model)
    assert set(layers) == set(peft_layers)
    for name, layer in layers.items():
        assert layer.lora_A is params[name]  # the same Parameter objects: optimizers keep working
        assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"])
        assert layer.dropout == kwargs.get("lora_dropout", 0.0)
    # the same fp32 math up to summation order, see FP32_TOL
    torch.testing.assert_close(outputs(model, ids), expected, **FP32_TOL)


def test_from_peft_refuses_what_it_cannot_convert():
    from peft import LoraConfig

    base = tiny_llama()
    alora = dict(alora_invocation_tokens=[5], task_type="CAUSAL_LM")  # a LoRA variant with no fused equivalent
    with pytest.raises(ValueError, match=r"q_proj: it uses a LoRA variant other than DoRA \(ALoraLinearVariant\)"):
        fl.from_peft(peft_model(base, r=4, target_modules=["q_proj"], **alora))

    pm = peft_model(base, r=4, target_modules=["q_proj"])
    pm.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = token_ids()
    expected = outputs(pm, ids)  # "default" is active
    pm.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="exactly one active adapter"):
        fl.from_peft(pm)
    pm.base_model.set_adapter("default")
    model = fl.from_peft(pm)  # the inactive adapter is dropped (v_proj back to its nn.Linear), reported
    assert type(model.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    assert lora_layers(model).keys() == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    torch.testing.assert_close(outputs(model, ids), expected, **FP32_TOL)

    pm = peft_model(base, r=4, target_modules=["q_proj", "embed_tokens"])
    expected = outputs(pm, ids)
    with pytest.raises(ValueError, match=r"model\.embed_tokens: it is a Embedding LoRA layer"):
        fl.from_peft(copy.deepcopy(pm))
    model = fl.from_peft(pm, strict=False)  # left in place, reported, function unchanged
    assert "model.embed_tokens" in model.fusedlora_unconverted
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    torch.testing.assert_close(outputs(model, ids), expected, **FP32_TOL)

    pm = peft_model(tiny_bert(), r=4, target_modules=["query"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="classifier: a trainable modules_to_save copy"):
        fl.from_peft(pm)
    with pytest.raises(TypeError, match="peft_model"):
        fl.from_peft(base)


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return bnb_nf4_checkpoint(tmp_path_factory.mktemp("nf4"))


def test_from_peft_over_bnb_nf4_keeps_the_4bit_base(nf4_checkpoint):
    _, bnb_model, dense = nf4_checkpoint
    reference = dequantized_twin(bnb_model, dense)  # read before any eval forward of the bnb model
    pm = peft_model(bnb_model, r=4, lora_alpha=8, target_modules="all-linear")
    ref_pm = peft_model(reference, r=4, lora_alpha=8, target_modules="all-linear")  # same seed: same A, B
    ids = token_ids()
    # bitsandbytes' CPU forward in train mode is dequantize + matmul on the untouched state (eval mode
    # would convert the state for its CPU kernel first); dropout is 0, so train mode changes nothing else.
    pm.train()
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    torch.testing.assert_close(outputs(ref_pm, ids), expected, **FP32_TOL)
    bnb_q = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    model = fl.from_peft(pm).eval()
    q = model.model.layers[0].self_attn.q_proj
    assert q.quantized and q.quant_scheme == "nf4" and q.quant_nested_absmax is not None
    assert q.quant_data.data_ptr() == bnb_q.data.data_ptr()  # carried over, not requantized
    torch.testing.assert_close(outputs(model, ids), expected, **FP32_TOL)


def test_load_quantized_equals_bitsandbytes(nf4_checkpoint, tmp_path):
    path, bnb_model, dense = nf4_checkpoint
    model = fl.load_quantized(path)
    layers = lora_layers(model)
    assert len(layers) == 14 and all(m.quantized and m.r == 0 for m in layers.values())
    assert type(model.lm_head) is torch.nn.Linear  # bitsandbytes leaves the output head dense
    assert not hasattr(model.config, "quantization_config")
    bnb_q = bnb_model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(layers["model.layers.1.mlp.down_proj"].quant_data, bnb_q.data)
    ids = token_ids()
    # exact NF4 decoding on both sides, then the same fp32 model: see FP32_TOL
    torch.testing.assert_close(outputs(model, ids), outputs(dequantized_twin(bnb_model, dense), ids), **FP32_TOL)
    # an adapter goes on top: the 4-bit layers take it in place
    fl.inject(model, r=4, alpha=8, init_lora_weights=False)
    assert all(m.quantized and m.r == 4 for m in lora_layers(model).values())
    fl.save_adapter(model, tmp_path / "adapter")
    again = fl.load_adapter(fl.load_quantized(path), tmp_path / "adapter")
    torch.testing.assert_close(outputs(again, ids), outputs(model, ids), atol=0, rtol=0)


def test_load_quantized_tied_sharded_without_double_quant(tmp_path):
    path, bnb_model, dense = bnb_nf4_checkpoint(tmp_path, double_quant=False, tie=True, max_shard_size="20KB")
    assert (tmp_path / "nf4" / "model.safetensors.index.json").is_file()
    model = fl.load_quantized(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    q = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert q.quant_nested_absmax is None and q.quant_absmax.dtype == torch.float32
    ids = token_ids()
    torch.testing.assert_close(outputs(model, ids), outputs(dequantized_twin(bnb_model, dense), ids), **FP32_TOL)


def test_load_quantized_errors(nf4_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        fl.load_quantized(tmp_path)
    dense_dir = tmp_path / "dense"
    nf4_checkpoint[2].save_pretrained(dense_dir)
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit quantization_config"):
        fl.load_quantized(dense_dir)


def test_bnb_layers_inject_in_place_and_converted_state_is_refused(nf4_checkpoint):
    _, bnb_model, dense = nf4_checkpoint
    ids = token_ids()
    expected = outputs(dequantized_twin(bnb_model, dense), ids)
    model = fl.inject(copy.deepcopy(bnb_model), r=4, alpha=8)  # B = 0: the base function alone
    assert all(m.quantized for m in lora_layers(model).values())
    torch.testing.assert_close(outputs(model, ids), expected, **FP32_TOL)
    used = copy.deepcopy(bnb_model).eval()
    outputs(used, ids)  # bitsandbytes' CPU eval forward converts the 4-bit state in place
    if not getattr(used.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes build does not convert its CPU state")
    with pytest.raises(ValueError, match="converted in place by a bitsandbytes CPU forward"):
        fl.inject(used, r=4)


def test_peft_qlora_adapter_loads_onto_load_quantized(nf4_checkpoint, tmp_path):
    """The QLoRA round trip without bitsandbytes at load time: PEFT over the bitsandbytes model saves an
    adapter; load_quantized + load_adapter reproduce that PEFT model's outputs."""
    path, bnb_model, _ = nf4_checkpoint
    pm = peft_model(bnb_model, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True)
    ids = token_ids()
    pm.train()  # bitsandbytes' CPU train-mode forward leaves the 4-bit state as it is; dropout is 0
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    model = fl.load_adapter(fl.load_quantized(path), tmp_path)
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(model) if lora_layers(model)[n].r} == {"q_proj", "down_proj"}
    torch.testing.assert_close(outputs(model, ids), expected, **FP32_TOL)  # exact NF4 on both sides
