"""inject / merge on tiny transformers models: PEFT's target words, freezing, training, torch.compile."""

import copy
import logging

import pytest
import torch
from lora_models import BERT_TARGETS, FP32_TOL, outputs, tiny_bert, tiny_llama, token_ids
from torch import nn

import fusedlora as fl
from fusedlora.inject import find_targets, lora_layers

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_all_linear_skips_the_output_head_and_freezes_the_rest(caplog):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="fusedlora"):
        fl.inject(model, r=4, alpha=8)
    layers = lora_layers(model)
    assert len(layers) == 2 * 7 and {n.rsplit(".", 1)[-1] for n in layers} == LLAMA_LINEARS
    assert type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    expected = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    n_trainable, n_total = fl.trainable_parameters(model)
    assert n_trainable == expected and n_total == sum(p.numel() for p in model.parameters())
    assert f"trainable params: {expected:,}" in caplog.text


def test_list_suffixes_regex_and_patterns():
    model = fl.inject(tiny_llama(), target_modules=["q_proj", "v_proj"], r=4, alpha=8,
                      rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    layers = lora_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))
    assert layers["model.layers.1.self_attn.q_proj"].r == 2 and layers["model.layers.0.self_attn.q_proj"].r == 4
    assert layers["model.layers.0.self_attn.v_proj"].alpha == 3 and layers["model.layers.0.self_attn.q_proj"].alpha == 8
    names = find_targets(tiny_llama(), r"model\.layers\.0\.mlp\.(up|down)_proj")
    assert names == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match=r"'q_prj'.*did you mean 'q_proj'"):
        fl.inject(tiny_llama(), target_modules=["q_prj", "v_proj"])
    with pytest.raises(ValueError, match="matches no module"):
        fl.inject(tiny_llama(), target_modules=r"q_proj")  # a regex must match the full name
    with pytest.raises(ValueError, match=r"embed_tokens \(Embedding\)"):
        fl.inject(tiny_llama(), target_modules=["embed_tokens"])
    with pytest.raises(TypeError, match="target_modules"):
        fl.inject(tiny_llama(), target_modules=3)
    with pytest.raises(ValueError, match=r"q_proj: expected a rank r >= 1"):
        fl.inject(tiny_llama(), target_modules=["q_proj"], rank_pattern={"q_proj": 0})
    model = fl.inject(tiny_llama(), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already have an adapter"):
        fl.inject(model, target_modules=["q_proj"])


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_merge_gives_plain_linears_with_equal_outputs(arch):
    model = tiny_llama() if arch == "llama" else tiny_bert()
    targets = "all-linear" if arch == "llama" else BERT_TARGETS
    ids = token_ids()
    base_out = outputs(model, ids)
    fl.inject(model, target_modules=targets, r=4, alpha=8, init_lora_weights=False)
    y = outputs(model, ids)
    assert (y - base_out).abs().max() > 1e-2  # the random adapters really change the outputs
    fl.merge(model)
    assert not lora_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("q_proj", "query")))
    torch.testing.assert_close(outputs(model, ids), y, **FP32_TOL)


def _peft_twin(model_ours, base):
    """A PEFT model over ``base`` with the same adapters (A and B copied) as the injected ``model_ours``."""
    from peft import LoraConfig, get_peft_model

    twin = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours = lora_layers(model_ours)
    with torch.no_grad():
        for name, module in twin.base_model.model.named_modules():
            if name in ours:
                module.lora_A["default"].weight.copy_(ours[name].lora_A)
                module.lora_B["default"].weight.copy_(ours[name].lora_B)
    return twin


def test_training_moves_only_lora_and_matches_peft_step_by_step():
    base = tiny_llama(seed=5)
    ours = fl.inject(copy.deepcopy(base), r=4, alpha=8, init_lora_weights=False)
    twin = _peft_twin(ours, base)
    frozen_before = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(6)
    # two batches of learnable sequences (each token = the previous + 3 mod 97), alternated: the frozen
    # random base leaves the adapters little to learn from fresh data in 20 steps, but they can fit these
    data = [(torch.randint(0, 97, (4, 1), generator=g) + 3 * torch.arange(12)) % 97 for _ in range(2)]
    batches = [data[i % 2] for i in range(20)]

    def train(model):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        losses = []
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    ours_losses, peft_losses = train(ours), train(twin)
    # Same fp32 math in both (the reference op vs PEFT's modules) up to summation order: ~1e-7 relative
    # per step; Adam's division by √v can amplify it where v is tiny, so compound over 20 steps to a
    # bound 100× the per-step noise. A wrong scale, dropout or gradient differs by > 1e-2 from step 1.
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(peft_losses), atol=1e-5, rtol=1e-5)
    assert ours_losses[-1] < ours_losses[0] - 0.1  # it learns (4.57 -> 4.32 here)
    for n, p in ours.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
        else:
            assert not torch.equal(p, lora_before[n]), n


def test_torch_compile_fullgraph_of_an_injected_llama():
    model = fl.inject(tiny_llama(), r=4, alpha=8, init_lora_weights=False)
    ids = token_ids()
    eager = model(input_ids=ids).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids).logits
    torch.testing.assert_close(out, eager, **FP32_TOL)
    out.square().mean().backward()
    assert all(m.lora_B.grad is not None for m in lora_layers(model).values())


def test_inject_quantized_base():
    model = tiny_llama()
    fl.inject(model, target_modules=["up_proj", "down_proj"], quantize="nf4", init_lora_weights=False)
    layers = lora_layers(model)
    assert all(m.quantized and m.quant_scheme == "nf4" for m in layers.values())
    ids = token_ids()
    y = outputs(model, ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids=ids).logits, y, **FP32_TOL)
    fl.merge(model)  # dequantized + adapter folded: the same function as plain linears
    torch.testing.assert_close(outputs(model, ids), y, **FP32_TOL)


def test_inject_int4_names_the_layer_that_cannot_be_quantized():
    with pytest.raises(ValueError, match=r"quantizing model\.layers\.0\.self_attn\.q_proj: .*multiple of group_size"):
        fl.inject(tiny_llama(), target_modules=["q_proj"], quantize={"scheme": "int4", "group_size": 128})
    model = fl.inject(tiny_llama(), target_modules=["q_proj"], quantize={"scheme": "int4", "group_size": 64})
    assert lora_layers(model)["model.layers.0.self_attn.q_proj"].quant_block == 64


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_injected_model_on_the_triton_kernels_matches_the_reference(quantize, monkeypatch):
    """The layers run whatever backend the op table picks; under TRITON_INTERPRET=1 the Triton kernels
    run on CPU, so the whole model's forward and backward can be compared with the reference here."""
    from fusedlora.ops.backend import triton_interpreted

    if not triton_interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernels on CPU")
    model = fl.inject(tiny_llama(layers=1), r=4, alpha=8, quantize=quantize, init_lora_weights=False).train()
    ids = token_ids(batch=1, seq=7)

    def run():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out.logits.detach(), grads

    ref_logits, ref_grads = run()
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    logits, grads = run()
    # fp32 in both (the interpreter's dots are fp32): only summation order differs, see FP32_TOL
    torch.testing.assert_close(logits, ref_logits, **FP32_TOL)
    assert grads.keys() == ref_grads.keys() and len(grads) == 14
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.gpu
def test_injected_nf4_llama_on_cuda_runs_the_fused_kernels(monkeypatch):
    model = fl.inject(tiny_llama(), r=4, alpha=8, quantize="nf4", init_lora_weights=False)
    model = model.to("cuda", torch.bfloat16).train()
    ids = token_ids(batch=4, seq=64).cuda()
    assert fl.backend("cuda") in ("cuda", "triton")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    torch.cuda.synchronize()
    kernels = {e.name for e in prof.key_averages()}
    assert any("lora_fwd" in k for k in kernels) and any("lora_d" in k for k in kernels), sorted(kernels)
    assert not any("dequant" in k for k in kernels), "a training step dequantized a weight to memory"
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setenv("FUSEDLORA_BACKEND", "reference")
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    # bf16 activations between layers: both paths round each layer's output to bf16 (relative 2^-8),
    # so logits agree to a few bf16 ulps of their magnitude and the losses to ~1e-2.
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), atol=5e-2, rtol=5e-2)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-2
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad.float(), atol=5e-2, rtol=5e-2, msg=n)


def test_plain_torch_model_and_shared_modules():
    torch.manual_seed(0)
    shared = nn.Linear(59, 59)
    model = nn.Sequential(nn.Linear(97, 59), nn.ReLU(), shared, nn.ReLU(), shared)
    x = torch.randn(3, 97)
    fl.inject(model, r=3, alpha=6, init_lora_weights=False)
    assert isinstance(model[0], fl.LoRALinear) and model[2] is model[4]  # still one module, one adapter
    y = model(x)
    fl.merge(model)
    assert type(model[0]) is nn.Linear and model[2] is model[4]
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)  # fp32 re-association only
