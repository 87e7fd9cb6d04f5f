"""save_adapter / load_adapter in PEFT's file format, both ways, plus corrupted and unsupported files."""

import copy
import json

import pytest
import torch
from lora_models import BERT_TARGETS, FP32_TOL, outputs, peft_model, tiny_bert, tiny_llama, token_ids
from safetensors.torch import load_file, save_file

import fusedlora as fl
from fusedlora.adapters import CONFIG_NAME, WEIGHTS_NAME
from fusedlora.inject import lora_layers

pytest.importorskip("peft")

CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
                   rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6}, alpha_pattern={"q_proj": 3})),
    ("bert", dict(r=3, lora_alpha=5, target_modules=BERT_TARGETS, rank_pattern={"query": 6})),
]


def base_of(arch):
    return tiny_llama() if arch == "llama" else tiny_bert()


def peft_load(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


@pytest.mark.parametrize("arch, kwargs", CASES)
def test_peft_adapter_loads_here_and_ours_loads_in_peft(arch, kwargs, tmp_path):
    base = base_of(arch)
    ids = token_ids()
    pm = peft_model(base, **kwargs)
    expected = outputs(pm, ids)
    pm.save_pretrained(tmp_path / "peft")

    # PEFT's files -> a plain model (load_adapter injects what the config names)
    ours = fl.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(outputs(ours, ids), expected, **FP32_TOL)  # same fp32 math, see FP32_TOL
    # ... and into an already injected model (adapters randomly initialized first)
    injected = fl.inject(copy.deepcopy(base), kwargs["target_modules"], r=kwargs["r"], alpha=1,
                         rank_pattern=kwargs.get("rank_pattern"), init_lora_weights=False)
    fl.load_adapter(injected, tmp_path / "peft")
    torch.testing.assert_close(outputs(injected, ids), expected, **FP32_TOL)

    # our files -> PEFT
    fl.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    peft_config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type", "lora_dropout"):
        assert config[key] == peft_config[key], key
    assert sorted(config["target_modules"]) == sorted(peft_config["target_modules"])
    assert load_file(tmp_path / "ours" / WEIGHTS_NAME).keys() == load_file(tmp_path / "peft" / WEIGHTS_NAME).keys()
    back = peft_load(base, tmp_path / "ours")
    torch.testing.assert_close(outputs(back, ids), expected, **FP32_TOL)
    # every layer's effective rank and scale survived the round trip
    for name, module in back.base_model.model.named_modules():
        if hasattr(module, "lora_A"):
            assert module.r["default"] == lora_layers(ours)[name].r
            assert module.scaling["default"] == pytest.approx(lora_layers(ours)[name].scaling)
    # merge equals the adapter model too
    torch.testing.assert_close(outputs(fl.merge(ours), ids), expected, **FP32_TOL)


def test_saved_from_layers_without_recorded_settings(tmp_path):
    """Adapters changed after inject (other ranks, alphas, rsLoRA) are described from the layers."""
    base = tiny_llama()
    ids = token_ids()
    model = fl.inject(copy.deepcopy(base), ["q_proj", "o_proj"], r=4, alpha=8, init_lora_weights=False)
    layers = lora_layers(model)
    for name, layer in layers.items():
        if "layers.1" in name:
            layer.reset_adapter(2, 5, use_rslora=True, init_lora_weights=False)
        else:
            layer.set_scaling(6, use_rslora=True)
    expected = outputs(model, ids)
    fl.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["use_rslora"] is True and config["rank_pattern"]
    torch.testing.assert_close(outputs(peft_load(base, tmp_path), ids), expected, **FP32_TOL)
    torch.testing.assert_close(outputs(fl.load_adapter(copy.deepcopy(base), tmp_path), ids), expected, **FP32_TOL)


def test_writes_are_atomic_and_overwrite(tmp_path):
    model = fl.inject(tiny_llama(), ["q_proj"], r=4, init_lora_weights=False)
    fl.save_adapter(model, tmp_path)
    lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_B.data.add_(1)
    fl.save_adapter(model, tmp_path, task_type="CAUSAL_LM", base_model_name_or_path="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary left
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "tiny"
    saved = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    torch.testing.assert_close(saved[key], lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_B.detach())


@pytest.fixture
def saved(tmp_path):
    model = fl.inject(tiny_llama(), ["q_proj", "v_proj"], r=4, init_lora_weights=False)
    fl.save_adapter(model, tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def test_missing_and_corrupted_files_are_named(saved):
    (saved / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} is not a readable safetensors file"):
        fl.load_adapter(tiny_llama(), saved)
    (saved / WEIGHTS_NAME).unlink()
    (saved / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"only safetensors is read"):
        fl.load_adapter(tiny_llama(), saved)
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=f"{CONFIG_NAME} is not valid JSON"):
        fl.load_adapter(tiny_llama(), saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        fl.load_adapter(tiny_llama(), saved)


def test_missing_extra_and_misshaped_tensors_are_named(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    good = dict(tensors)
    del tensors[key]
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        fl.load_adapter(tiny_llama(), saved)
    tensors = dict(good, **{key: torch.randn(4, 63)})
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"v_proj\.lora_A\.weight.*shape \(4, 63\).*\(4, 64\)"):
        fl.load_adapter(tiny_llama(), saved)
    extra = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"
    save_file(dict(good, **{extra: torch.randn(64)}), saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        fl.load_adapter(tiny_llama(), saved)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(peft_type="IA3"), "peft_type"),
        (dict(use_dora="true"), "'use_dora' must be true or false"),
        (dict(modules_to_save="lm_head"), "modules_to_save"),
        (dict(r=0), "'r' must be a positive int"),
        (dict(target_modules=["q_prj"]), "did you mean 'q_proj'"),
    ],
)
def test_unsupported_or_bad_configs(saved, changes, match):
    _edit_config(saved, **changes)
    with pytest.raises(ValueError, match=match):
        fl.load_adapter(tiny_llama(), saved)


def test_injected_model_must_match_the_config(saved):
    other = fl.inject(tiny_llama(), ["q_proj"], r=4)
    with pytest.raises(ValueError, match="differ from those"):
        fl.load_adapter(other, saved)
    other = fl.inject(tiny_llama(), ["q_proj", "v_proj"], r=2)
    with pytest.raises(ValueError, match="has r=2"):
        fl.load_adapter(other, saved)
    with pytest.raises(ValueError, match="no LoRALinear layer with an adapter"):
        fl.save_adapter(tiny_llama(), saved)
