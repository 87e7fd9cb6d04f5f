"""fusedlora.accelerate: a PEFT model kept as it is, with the fused op under its LoRA layers.

Every comparison is against the same PEFT model running PEFT's own forward, with A and B both random
(init_lora_weights=False), so the LoRA update is never zero.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from lora_models import (
    FP32_TOL,
    bnb_nf4_checkpoint,
    check_accelerated_peft_checkpoints,
    outputs,
    peft_model,
    record_dropout_masks,
    tiny_bert,
    tiny_llama,
    token_ids,
    trainer_run,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fusedlora as fl
import fusedlora.peft_accelerate as accel


class CallLog:
    """Records the arguments of every ``lora_linear`` call the accelerated layers make."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = accel.lora_linear

        def record(x, weight, lora_A, lora_B, scale, bias=None, **kwargs):
            self.calls.append((weight, lora_A, lora_B, scale, bias, kwargs))
            return original(x, weight, lora_A, lora_B, scale, bias, **kwargs)

        monkeypatch.setattr(accel, "lora_linear", record)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach(), lora_grads(model)


def assert_same(got, expected, **tol):
    (y1, g1), (y2, g2) = got, expected
    torch.testing.assert_close(y1, y2, **tol)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kwargs", [dict(r=4, lora_alpha=8), dict(r=3, lora_alpha=5, use_rslora=True)])
def test_dense_base_outputs_and_gradients_equal_peft(monkeypatch, backend, kwargs):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    pm = peft_model(tiny_llama(), target_modules="all-linear", **kwargs).train()
    plain = copy.deepcopy(pm)
    ids = token_ids()
    keys = list(pm.state_dict())
    log = CallLog(monkeypatch)
    assert fl.accelerate(pm) is pm
    assert pm.fusedlora_not_accelerated == {}
    # The same fp32 math in another order of additions (triton's K loop, fp32 under the interpreter).
    assert_same(loss_and_grads(pm, ids), loss_and_grads(plain, ids), **FP32_TOL)
    assert len(log.calls) == 14  # every LoRA layer, once
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    weight, a, b, scale, bias, kw = log.calls[0]
    assert weight is q.base_layer.weight and a is q.lora_A["default"].weight and b is q.lora_B["default"].weight
    assert scale == q.scaling["default"] and kw == dict(dropout_p=0.0, training=True)
    assert list(pm.state_dict()) == keys and isinstance(pm, type(plain))


def test_enable_false_restores_peft_forward(monkeypatch):
    pm = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    log = CallLog(monkeypatch)
    fl.accelerate(pm)
    fl.accelerate(pm)  # twice is once
    ids = token_ids()
    fused = outputs(pm, ids)
    assert len(log.calls) == 4
    assert fl.accelerate(pm, enable=False) is pm
    assert not any("forward" in m.__dict__ for m in pm.modules())
    assert not hasattr(pm, accel.NOT_ACCELERATED_ATTR)
    torch.testing.assert_close(outputs(pm, ids), fused, **FP32_TOL)
    assert len(log.calls) == 4
    with pytest.raises(TypeError, match="enable"):
        fl.accelerate(pm, enable="no")
    with pytest.raises(TypeError, match="peft_model"):
        fl.accelerate(tiny_llama())


def test_peft_features_keep_working(monkeypatch, tmp_path):
    """disable_adapter, named adapters and set_adapter, save_pretrained / from_pretrained, merge_and_unload."""
    from peft import LoraConfig, PeftModel

    base = tiny_llama()
    ids = token_ids()
    pm = peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"])
    torch.manual_seed(5)
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "up_proj"],
                                       init_lora_weights=False))
    plain = copy.deepcopy(pm)
    log = CallLog(monkeypatch)
    fl.accelerate(pm)
    torch.testing.assert_close(outputs(pm, ids), outputs(plain, ids), **FP32_TOL)
    assert len(log.calls) == 6
    with pm.disable_adapter():
        torch.testing.assert_close(outputs(pm, ids), outputs(base, ids), **FP32_TOL)
    assert len(log.calls) == 6  # the base alone is PEFT's path
    pm.set_adapter("other")
    plain.set_adapter("other")
    torch.testing.assert_close(outputs(pm, ids), outputs(plain, ids), **FP32_TOL)
    assert len(log.calls) == 10 and log.calls[-1][1].shape[0] == 2  # rank 2: the other adapter's A
    pm.set_adapter("default")

    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "other").is_dir()
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(outputs(again, ids), outputs(pm, ids), **FP32_TOL)

    expected = outputs(pm, ids)
    merged = pm.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    # W + s·B·A folded in fp32 changes the order of additions only: FP32_TOL
    torch.testing.assert_close(outputs(merged, ids), expected, **FP32_TOL)


def _unsupported_cases():
    return {
        "alora": (tiny_llama, dict(target_modules=["q_proj"], alora_invocation_tokens=[5], task_type="CAUSAL_LM"),
                  "LoRA variant other than DoRA (ALoraLinearVariant)"),
        "lora_bias": (tiny_llama, dict(target_modules=["q_proj"], lora_bias=True), "lora_bias=True"),
        "embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"]), "base is Embedding"),
        "conv1d": (_tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True), "fan_in_fan_out"),
    }


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=1, n_head=4, n_positions=64)).eval()


@pytest.mark.parametrize("case", list(_unsupported_cases()))
def test_unsupported_layers_keep_peft_forward_and_are_listed(case, caplog):
    make, kwargs, reason = _unsupported_cases()[case]
    pm = peft_model(make(), r=4, lora_alpha=8, **kwargs)
    plain = copy.deepcopy(pm)
    with caplog.at_level(logging.INFO, logger="fusedlora"):
        fl.accelerate(pm)
    left = pm.fusedlora_not_accelerated
    assert left and all(reason in why for why in left.values()), left
    assert any("keep PEFT's forward" in r.message and reason in r.message for r in caplog.records)
    for name in left:  # one line per layer that keeps PEFT's forward
        assert sum(f"{name} keeps" in r.message for r in caplog.records) == 1
    ids = token_ids()
    torch.testing.assert_close(outputs(pm, ids), outputs(plain, ids), atol=0, rtol=0)


def test_several_active_adapters_keep_peft_forward(monkeypatch, caplog):
    from peft import LoraConfig

    pm = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.base_model.set_adapter(["default", "b"])
    plain = copy.deepcopy(pm)
    log = CallLog(monkeypatch)
    with caplog.at_level(logging.INFO, logger="fusedlora"):
        fl.accelerate(pm)
    assert all("2 adapters are active at once" in why for why in pm.fusedlora_not_accelerated.values())
    ids = token_ids()
    torch.testing.assert_close(outputs(pm, ids), outputs(plain, ids), atol=0, rtol=0)
    assert not log.calls
    pm.base_model.set_adapter("b")  # one adapter again: fused from the next call on
    plain.base_model.set_adapter("b")
    torch.testing.assert_close(outputs(pm, ids), outputs(plain, ids), **FP32_TOL)
    assert len(log.calls) == 2


def test_dropout_with_the_same_masks_equals_peft(monkeypatch):
    """Dropout on: PEFT's masks (drawn from a seeded generator) are handed to the reference op in the
    same order, so both compute the same function exactly up to fp32 ordering."""
    import fusedlora.ops.lora as lora_ops

    pm = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.3).train()
    plain = copy.deepcopy(pm)
    ids = token_ids()
    masks = record_dropout_masks(monkeypatch)
    expected = loss_and_grads(plain, ids)
    assert len(masks) == 14
    monkeypatch.setattr(lora_ops, "draw_dropout_mask_reference", lambda x, p: masks.pop(0))
    fl.accelerate(pm)
    assert_same(loss_and_grads(pm, ids), expected, **FP32_TOL)
    assert not masks


def test_bert_modules_to_save_and_classifier_head(tmp_path):
    from peft import PeftModel

    base = tiny_bert()
    pm = peft_model(base, r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(2)  # a trained head
    fl.accelerate(pm)
    ids = token_ids()
    expected = outputs(pm, ids)
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(outputs(again, ids), expected, **FP32_TOL)


# ------------------------------------------------------------------------------------ bitsandbytes NF4
@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return bnb_nf4_checkpoint(tmp_path_factory.mktemp("nf4"))


def test_bnb_nf4_outputs_gradients_and_no_copy(nf4_checkpoint, monkeypatch):
    _, bnb_model, _ = nf4_checkpoint
    # bitsandbytes' CPU forward in train mode is dequantize + fp32 matmul on its untouched state (an eval
    # forward would repack the state for its CPU kernel); lora_dropout is 0, so train mode changes nothing
    pm = peft_model(bnb_model, r=4, lora_alpha=8, target_modules="all-linear").train()
    plain = copy.deepcopy(pm)
    ids = token_ids()
    log = CallLog(monkeypatch)
    fl.accelerate(pm)
    # Both sides decode NF4 exactly (fusedlora's decode is bit-exact with bitsandbytes), then run the same
    # fp32 matmuls in another order: FP32_TOL
    assert_same(loss_and_grads(pm, ids), loss_and_grads(plain, ids), **FP32_TOL)
    assert len(log.calls) == 14
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    qw = log.calls[0][0]
    assert isinstance(qw, fl.QuantizedWeight) and qw.packed.double_quant
    assert qw.packed.data.data_ptr() == q.base_layer.weight.data_ptr()  # PEFT's bytes, not a copy
    assert qw.packed.absmax.data_ptr() == q.base_layer.weight.quant_state.absmax.data_ptr()
    loss_and_grads(pm, ids)
    assert log.calls[14][0] is qw  # the view is built once per weight


def test_bnb_nf4_twenty_steps_same_loss_curve(nf4_checkpoint):
    _, bnb_model, _ = nf4_checkpoint
    runs = []
    for fused in (False, True):
        pm = peft_model(bnb_model, r=4, lora_alpha=8, target_modules="all-linear").train()
        if fused:
            fl.accelerate(pm)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        ids = token_ids(batch=4)
        for _ in range(20):
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    # Same start, same data, same fp32 math up to the order of additions (1e-6 relative per step); Adam
    # normalizes updates, so such differences grow slowly over 20 steps but stay far below 1e-4.
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-4, atol=1e-4)
    assert runs[0][-1] < runs[0][0]


class AllocationLog(TorchDispatchMode):
    """The largest tensor (in elements) that an aten op returns in new memory (not a view of an input)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_no_weight_sized_tensor_is_allocated(nf4_checkpoint, monkeypatch, base):
    """At a few tokens, a fused forward allocates nothing as large as the weight (dense: reference backend,
    whose fp32 path uses W as it is; NF4: the triton backend, which decodes W tile by tile in its loop)."""
    _, bnb_model, dense = nf4_checkpoint
    model = bnb_model if base == "nf4" else dense
    if base == "nf4":
        monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    pm = peft_model(model, r=4, lora_alpha=8, target_modules=["down_proj"]).train()
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    fl.accelerate(pm)
    x = torch.randn(1, 3, 128)
    expected = type(layer).forward(layer, x)
    with AllocationLog() as log, torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, expected, **FP32_TOL)
    # down_proj is W [64, 128] (8192 elements); the output is [3, 64] and xa [3, 4]. Anything from 1/8
    # of the weight up would be a decoded or copied weight (or a tile buffer far too large to be one).
    assert 0 < log.largest < 64 * 128 // 8, log.largest


def test_bnb_nf4_save_pretrained_loads_in_plain_peft(nf4_checkpoint, tmp_path):
    from peft import PeftModel

    _, bnb_model, _ = nf4_checkpoint
    pm = peft_model(bnb_model, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]).train()
    fl.accelerate(pm)
    ids = token_ids()
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(copy.deepcopy(bnb_model), tmp_path).train()
    with torch.no_grad():
        got = again(input_ids=ids).logits
    torch.testing.assert_close(got, expected, **FP32_TOL)  # exact NF4 decode on both sides


# ------------------------------------------------------------------------------------ transformers Trainer
def test_trainer_checkpoints_resume_and_reload_in_plain_peft(tmp_path, monkeypatch):
    """transformers' Trainer trains an accelerated PEFT model, saves PEFT adapter checkpoints, and a run
    resumed from one reaches the same losses as an uninterrupted run; a checkpoint loads in plain PEFT."""
    log = CallLog(monkeypatch)
    full = check_accelerated_peft_checkpoints(trainer_run, tiny_llama(), tmp_path)
    assert log.calls and len(full) == 4


def test_autocast_bf16_matches_peft_under_autocast(monkeypatch):
    pm = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules="all-linear")
    plain = copy.deepcopy(pm)
    log = CallLog(monkeypatch)
    fl.accelerate(pm)
    ids = token_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = outputs(pm, ids), outputs(plain, ids)
    assert len(log.calls) == 14 and log.calls[0][1].dtype == torch.bfloat16
    # Both run every linear in bf16 (autocast casts PEFT's; the op gets bf16 operands), rounding at different
    # points (fp32 accumulation inside the op; bf16 outputs between PEFT's three matmuls). Each layer's
    # output then differs by a few bf16 ulps (2^-8 relative); through 2 layers on logits of magnitude ~1,
    # 3e-2 covers that with margin, while a missing or doubled LoRA update moves logits by ~1e-1 or more.
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)
