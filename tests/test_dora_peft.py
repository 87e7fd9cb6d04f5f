"""DoRA adapters and PEFT, both ways: a fused DoRA layer against PEFT's DoRA layer on the same weights (dense
fp32 and bitsandbytes NF4 bases; dropout off, on with one mask on both sides, and eval mode), 20 training
steps, adapter files PEFT writes and reads, from_peft and accelerate on PEFT DoRA models, and load_adapter's
all-or-nothing rule.

Every adapter here has B random (init_lora_weights=False) and its magnitude m scaled away from the row
norms ‖W + s·B·A‖ it starts at, so the factor g = m / ‖W + s·B·A‖ is not 1 and every DoRA term matters.

Tolerances. Both sides compute in fp32 on the same fp32 operands (an NF4 base decodes to the same fp32
values on both sides: fusedlora's decode is bit-exact with bitsandbytes'). They differ in the order of the
additions (the Triton kernels' K loop; the fused path's g ⊙ (W·x + s·B·A·x) against PEFT's W·x + (g − 1) ⊙
W·x + ...) and in how the row norms are formed: PEFT sums W + s·B·A [N, K] and takes its norms, the fused
op expands ‖W_n‖² + 2s·Σ B·(W·Aᵀ) + s²·Σ B·(B·A·Aᵀ). Every one is an fp32 sum of at most K = 128 terms
(or the 21 rows of a gradient), which rounding moves by ~√K·2^-24 ≈ 1e-6 of the sum's scale (≤ 3e-7 seen
here). A layer's outputs and gradients are therefore compared as max |got − PEFT| ≤ LAYER_TOL · max |PEFT|
per tensor, LAYER_TOL = 1e-5 in fp32: 30 times what rounding gives, while a wrong factor g, a dropped term or a
different mask is off by more than 1e-1 of the scale (asserted per test). Elementwise tolerances would be
the wrong yardstick: a gradient element near 0 carries the rounding of sums of terms up to max |PEFT|.
fp16 base (one layer): PEFT computes the update from fp32 adapters and x cast to fp32 and rounds the sum to
fp16 once; the fused op takes A, B and x in fp16 (A and B rounded, 2^-11 relative each), accumulates in
fp32 and rounds its outputs to fp16. A few such roundings of 2^-11 land on each value (≤ 1.5 · 2^-11 of
the scale seen), so 2^-8 (8 units) bounds them with margin, far below a wrong term's 1e-1.
Through the tiny Llama, FP32_TOL (2e-5, tests/lora_models.py) bounds the same differences carried through
two blocks, as in the other PEFT tests.
"""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch
from lora_models import (
    FP32_TOL,
    bnb_nf4_checkpoint,
    outputs,
    peft_model,
    record_dropout_masks,
    tiny_llama,
    token_ids,
)
from safetensors.torch import load_file, save_file
from torch import nn

import fusedlora as fl
import fusedlora.adapters as adapters_module
import fusedlora.ops.dora as dora_ops
import fusedlora.peft_accelerate as accel
from fusedlora.adapters import CONFIG_NAME, WEIGHTS_NAME
from fusedlora.functional import dora_linear
from fusedlora.inject import lora_layers
from fusedlora.modules import LoRALinear, linear_base

pytest.importorskip("peft")

LAYER_TOL = {torch.float32: 1e-5, torch.float16: 2.0**-8}
BACKENDS = ["reference", "triton"]


def perturb_magnitudes(model: nn.Module, seed: int = 4) -> None:
    """m scaled by factors in [0.5, 1.5): g = m / ‖W + s·B·A‖ away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)


def dora_model(base, seed: int = 3, **kwargs):
    kwargs = dict(dict(r=4, lora_alpha=8, target_modules="all-linear"), **kwargs)
    pm = peft_model(base, seed=seed, use_dora=True, **kwargs)
    perturb_magnitudes(pm, seed)
    return pm


def our_name(peft_name: str) -> str:
    """PEFT's parameter name -> the name of the same tensor in the converted model."""
    name = peft_name.removeprefix("base_model.model.")
    name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)
    return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.weight")


def loss_and_grads(model, ids, rename=lambda n: n):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    grads = {rename(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_same(got, expected, **tol):
    (y1, g1), (y2, g2) = got, expected
    torch.testing.assert_close(y1, y2, **tol)
    assert g1.keys() == g2.keys() and any("lora_magnitude_vector" in n for n in g1), sorted(g1)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------ one layer
class FixedMask(nn.Module):
    """PEFT's dropout module replaced: drops the elements of a given mask (scaled by 1 / (1 - p))."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1.0 - self.p)


def fused_twin(peft_layer) -> LoRALinear:
    """A LoRALinear over the PEFT layer's base (shared, as from_peft takes it) with copies of its A, B, m."""
    weight, bias = linear_base(peft_layer.get_base_layer())
    layer = LoRALinear(weight, bias, r=0)
    drop = peft_layer.lora_dropout["default"]
    layer.adopt_adapter(
        peft_layer.lora_A["default"].weight.detach().clone(), peft_layer.lora_B["default"].weight.detach().clone(),
        peft_layer.lora_alpha["default"], dropout=drop.p if isinstance(drop, nn.Dropout) else 0.0,
        magnitude=peft_layer.lora_magnitude_vector["default"].weight.detach().clone(),
    )
    assert layer.dora and layer.scaling == peft_layer.scaling["default"]
    return layer


def run_layer(forward, params, x, dy):
    """y and the gradients of x and ``params`` for the upstream gradient dy."""
    for p in params:
        p.grad = None
    x = x.clone().requires_grad_(True)
    y = forward(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [p.grad.clone() for p in params]


def compare_layer(peft_layer, mode: str, dtype: torch.dtype = torch.float32):
    """Our layer against PEFT's in ``mode``: "dropout 0" (training, PEFT's Identity dropout), "mask"
    (training, one fixed mask on both sides) or "eval" (a Dropout module, eval mode: nothing dropped);
    inputs in ``dtype`` (the base's)."""
    ours = fused_twin(peft_layer)
    x = torch.randn(3, 7, ours.in_features).to(dtype)
    mask = None
    if mode == "mask":
        p = ours.dropout
        mask = torch.rand(x.shape) >= p
        peft_layer.lora_dropout["default"] = FixedMask(mask, p)
    training = mode != "eval"
    peft_layer.train(training)
    ours.train(training)
    peft_params = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                   peft_layer.lora_magnitude_vector["default"].weight]
    our_params = [ours.lora_A, ours.lora_B, ours.lora_magnitude_vector.weight]
    dy = torch.randn(3, 7, ours.out_features).to(dtype)
    expected = run_layer(peft_layer, peft_params, x, dy)

    def fused(xx):
        if mask is None:
            return ours(xx)
        # the layer's own forward call, with the mask given instead of drawn
        mag = ours.lora_magnitude_vector
        a, b, bias = (None if t is None else t.to(xx.dtype) for t in (ours.lora_A, ours.lora_B, ours.bias))
        return dora_linear(xx, ours.base_weight, a, b, ours.scaling, mag.weight, mag.base_sq_norm(ours, xx.dtype),
                           bias, ours.dropout, True, dropout_mask=mask)

    got = run_layer(fused, our_params, x, dy)
    for name, g, g0 in zip(("y", "grad of x", "grad of A", "grad of B", "grad of magnitude"),
                           [got[0]] + got[1], [expected[0]] + expected[1], strict=True):
        assert g.shape == g0.shape and g.dtype == g0.dtype, name
        err = ((g - g0).abs().max() / g0.abs().max()).item()
        assert err <= LAYER_TOL[dtype], f"{name}: max |difference| is {err:.2e} of max |PEFT's|"

    # DoRA's terms matter: plain LoRA on the same tensors (or the same DoRA with g = 1) is far off
    w, xf, y0 = ours.dense_base_weight(torch.float32), x.float(), expected[0].float()
    xd = xf if mask is None else xf * mask / (1 - ours.dropout)
    lora = xf @ w.t() + ours.scaling * (xd @ ours.lora_A.detach().t()) @ ours.lora_B.detach().t()
    if ours.bias is not None:
        lora = lora + ours.bias.float()
    assert (lora - y0).abs().max() > 0.1 * y0.abs().max()
    if mask is not None:  # and the mask matters: DoRA without dropout is far off too
        peft_layer.lora_dropout["default"] = nn.Identity()
        with torch.no_grad():
            undropped = peft_layer(x).float()
        assert (undropped - y0).abs().max() > 0.1 * y0.abs().max()


def dense_peft_layer(dropout: float):
    """PEFT's DoRA over an nn.Linear [64, 128] with a bias."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(128, 64))
    with torch.no_grad():
        base[0].bias.normal_()
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["0"], use_dora=True, init_lora_weights=False,
                        lora_dropout=dropout)
    pm = get_peft_model(base, config)
    perturb_magnitudes(pm)
    return pm.base_model.model[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["dropout 0", "mask", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_equals_peft_dora_dense(use_backend, backend, mode, dtype):
    """fp16: the base in fp16, PEFT's adapters kept in fp32 (as PEFT keeps them over a 16-bit base)."""
    use_backend(backend)
    layer = dense_peft_layer(0.0 if mode == "dropout 0" else 0.3)
    layer.get_base_layer().to(dtype)
    compare_layer(layer, mode, dtype)


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return bnb_nf4_checkpoint(tmp_path_factory.mktemp("nf4"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["dropout 0", "mask"])
def test_layer_equals_peft_dora_over_bnb_nf4(nf4_checkpoint, use_backend, backend, mode):
    """PEFT's DoRA over bitsandbytes' own Linear4bit on CPU. Training mode only: there bitsandbytes' CPU
    forward is dequantize + matmul on the untouched 4-bit state (an eval-mode forward would repack the state
    for its CPU kernel); PEFT's DoRA decodes the weight with bitsandbytes' dequantize_4bit."""
    use_backend(backend)
    _, bnb_model, _ = nf4_checkpoint
    pm = dora_model(bnb_model, r=8, lora_alpha=16, target_modules=["down_proj"],
                    lora_dropout=0.0 if mode == "dropout 0" else 0.3)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj  # [64, 128]
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    compare_layer(layer, mode)


# ------------------------------------------------------------------------------- from_peft, accelerate
class DoraCallLog:
    """Records the arguments of every ``dora_linear`` call the accelerated layers make."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = accel.dora_linear

        def record(x, weight, lora_A, lora_B, scale, magnitude, base_sq_norm, bias=None, **kwargs):
            self.calls.append(dict(weight=weight, a=lora_A, b=lora_B, scale=scale, magnitude=magnitude,
                                   sq=base_sq_norm, bias=bias, **kwargs))
            return original(x, weight, lora_A, lora_B, scale, magnitude, base_sq_norm, bias, **kwargs)

        monkeypatch.setattr(accel, "dora_linear", record)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_peft_equals_peft_dora(use_backend, backend):
    use_backend(backend)
    pm = dora_model(tiny_llama()).train()
    plain = copy.deepcopy(pm)
    ids = token_ids()
    peft_layers = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_magnitude_vector")}
    magnitudes = {n: m.lora_magnitude_vector["default"].weight for n, m in peft_layers.items()}
    model = fl.from_peft(pm)
    layers = lora_layers(model)
    assert set(layers) == set(magnitudes) and len(layers) == 14
    for name, layer in layers.items():
        assert layer.dora and layer.lora_magnitude_vector.weight is magnitudes[name]  # the same Parameter
    assert model.fusedlora_adapter_config["use_dora"] is True
    expected = loss_and_grads(plain, ids, our_name)
    assert_same(loss_and_grads(model, ids), expected, **FP32_TOL)
    with torch.no_grad(), plain.disable_adapter():
        assert (plain(input_ids=ids).logits - expected[0]).abs().max() > 0.1  # the adapters matter


@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerate_equals_peft_dora_and_restores(use_backend, backend, monkeypatch, caplog):
    use_backend(backend)
    pm = dora_model(tiny_llama(), target_modules=["q_proj", "v_proj", "down_proj"]).train()
    plain = copy.deepcopy(pm)
    ids = token_ids()
    log = DoraCallLog(monkeypatch)
    with caplog.at_level(logging.INFO, logger="fusedlora"):
        assert fl.accelerate(pm) is pm
    assert pm.fusedlora_not_accelerated == {}
    assert any(r.message == "fusedlora.accelerate: 6 of 6 LoRA layers run the fused op (6 of them DoRA)"
               for r in caplog.records)
    assert_same(loss_and_grads(pm, ids), loss_and_grads(plain, ids), **FP32_TOL)
    assert len(log.calls) == 6  # every DoRA layer, once
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    call = log.calls[0]
    assert call["weight"] is q.base_layer.weight  # PEFT's weight, not a copy
    assert call["a"] is q.lora_A["default"].weight and call["b"] is q.lora_B["default"].weight
    assert call["magnitude"] is q.lora_magnitude_vector["default"].weight
    assert call["scale"] == q.scaling["default"] and call["dropout_p"] == 0.0 and call["training"] is True
    torch.testing.assert_close(call["sq"], q.base_layer.weight.detach().square().sum(1), rtol=1e-6, atol=0)

    # ‖W_n‖² is computed once per layer, and again after the base changes in place
    loss_and_grads(pm, ids)
    assert log.calls[6]["sq"] is call["sq"]
    with torch.no_grad():
        q.base_layer.weight.mul_(1.5)
        plain.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    got, expected = loss_and_grads(pm, ids), loss_and_grads(plain, ids)
    assert log.calls[12]["sq"] is not call["sq"]
    torch.testing.assert_close(log.calls[12]["sq"], 2.25 * call["sq"], rtol=1e-6, atol=0)
    assert_same(got, expected, **FP32_TOL)

    # eval mode: PEFT's eval path (no dropout anywhere), fused too
    pm.eval()
    plain.eval()
    torch.testing.assert_close(outputs(pm, ids), outputs(plain, ids), **FP32_TOL)
    assert len(log.calls) == 24

    assert fl.accelerate(pm, enable=False) is pm
    assert not any("forward" in m.__dict__ for m in pm.modules())
    assert not any(accel._KEPT_ATTR in m.__dict__ for m in pm.modules())
    torch.testing.assert_close(outputs(pm, ids), outputs(plain, ids), atol=0, rtol=0)  # PEFT's own forward
    assert len(log.calls) == 24


def test_accelerated_peft_dora_model_compiles_fullgraph(use_backend):
    """torch.compile(fullgraph=True) of a PEFT DoRA model run by ``fl.accelerate`` on the Triton kernels: the
    graph holds the fused ops (no break), and its loss and gradients equal PEFT's own eager ones, also after
    the base changed in place (the compiled graph takes ‖W_n‖² at every call)."""
    use_backend("triton")
    torch._dynamo.reset()
    pm = dora_model(tiny_llama(), target_modules=["q_proj", "v_proj", "down_proj"]).train()
    plain = copy.deepcopy(pm)
    fl.accelerate(pm)
    ids = token_ids()
    loss_and_grads(pm, ids)  # an eager step first: the layers' kept ‖W_n‖² exist when the graph is traced
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    unwrap = lambda name: name.removeprefix("_orig_mod.")  # noqa: E731  (the compiled module's names)
    assert_same(loss_and_grads(compiled, ids, unwrap), loss_and_grads(plain, ids), **FP32_TOL)
    for model in (pm, plain):
        with torch.no_grad():
            model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    assert_same(loss_and_grads(compiled, ids, unwrap), loss_and_grads(plain, ids), **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerate_dropout_with_the_same_masks_equals_peft(use_backend, backend, monkeypatch):
    """Dropout on: the masks PEFT's dropout modules draw (from a seeded generator) are handed, in the same
    order, to the op (the reference draws through draw_dropout_mask_reference, the fused path through its
    dropout split), so both compute the same function up to fp32 ordering."""
    use_backend(backend)
    pm = dora_model(tiny_llama(), target_modules=["q_proj", "up_proj"], lora_dropout=0.3).train()
    plain = copy.deepcopy(pm)
    ids = token_ids()
    real_dropout = torch.nn.functional.dropout
    masks = record_dropout_masks(monkeypatch)
    expected = loss_and_grads(plain, ids)
    assert len(masks) == 4
    replay = list(masks)

    def replayed_dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return real_dropout(x, p, training, inplace)
        return x * replay.pop(0) / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", replayed_dropout)
    monkeypatch.setattr(dora_ops, "draw_dropout_mask_reference", lambda x, p: replay.pop(0))

    def replayed_split(x, p):
        xd = replayed_dropout(x, p)
        return xd, x - xd

    monkeypatch.setattr(dora_ops._DropSplit, "apply", replayed_split)
    fl.accelerate(pm)
    assert_same(loss_and_grads(pm, ids), expected, **FP32_TOL)
    assert not replay
    # PEFT's DoRA drops nothing while the LoRA layer is in eval mode, even with its dropout module in
    # training mode (a draw now would find no mask to replay)
    for model in (pm, plain):
        for module in model.modules():
            if hasattr(module, "lora_magnitude_vector"):
                module.training = False
    undropped = outputs(pm, ids)
    torch.testing.assert_close(undropped, outputs(plain, ids), **FP32_TOL)
    assert (undropped - expected[0]).abs().max() > 1e-2  # the masks mattered


def test_bnb_nf4_from_peft_and_accelerate_equal_peft(nf4_checkpoint, monkeypatch):
    """PEFT's DoRA over bitsandbytes' Linear4bit, training mode (see the layer test), dropout 0."""
    _, bnb_model, _ = nf4_checkpoint
    pm = dora_model(bnb_model).train()
    plain = copy.deepcopy(pm)
    converted = copy.deepcopy(pm)
    ids = token_ids()
    expected = loss_and_grads(plain, ids)
    log = DoraCallLog(monkeypatch)
    fl.accelerate(pm)
    assert_same(loss_and_grads(pm, ids), expected, **FP32_TOL)
    assert len(log.calls) == 14
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    qw = log.calls[0]["weight"]
    assert isinstance(qw, fl.QuantizedWeight) and qw.packed.data.data_ptr() == q.base_layer.weight.data_ptr()
    loss_and_grads(pm, ids)
    assert log.calls[14]["sq"] is log.calls[0]["sq"]  # kept for the 4-bit base too

    model = fl.from_peft(converted)
    q = model.model.layers[0].self_attn.q_proj
    assert q.dora and q.quantized
    assert_same(loss_and_grads(model, ids), loss_and_grads(plain, ids, our_name), **FP32_TOL)


def test_twenty_training_steps_give_peft_loss_curve():
    base = tiny_llama()
    ids = token_ids(batch=4)
    runs, moved = {}, {}
    for way in ("peft", "from_peft", "accelerate"):
        pm = dora_model(base).train()
        model = fl.from_peft(pm) if way == "from_peft" else (fl.accelerate(pm) if way == "accelerate" else pm)
        params = [p for p in model.parameters() if p.requires_grad]
        mags = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
        start = [m.detach().clone() for m in mags]
        opt = torch.optim.AdamW(params, lr=3e-3)
        losses = []
        for _ in range(20):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[way] = torch.tensor(losses)
        moved[way] = max((m.detach() - s).abs().max().item() for m, s in zip(mags, start, strict=True))
    # Same start, data and fp32 math up to the order of additions (~1e-6 relative per step). Adam divides
    # each update by the gradient's running size, so where the loss turns chaotic a rounding-sized difference
    # becomes an lr-sized one: at lr = 1e-2 PEFT's own fp32 curve leaves its fp64 one by 1e-3 after 15 steps
    # (and which CPU runs it decides where). At 3e-3 the curves differ by ~2e-6 over the 20 steps.
    for way in ("from_peft", "accelerate"):
        torch.testing.assert_close(runs[way], runs["peft"], rtol=1e-4, atol=1e-4)
        assert moved[way] > 1e-2  # the magnitudes were trained
    assert runs["peft"][-1] < 0.95 * runs["peft"][0]


# ----------------------------------------------------------------------------------------- adapter files
def peft_load(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


def test_accelerated_bnb_nf4_dora_inference_keeps_norm_and_fold(nf4_checkpoint, use_backend, monkeypatch):
    """Calls without gradients through ``fl.accelerate`` (generation with a DoRA policy, evaluation; here under
    torch.inference_mode) keep each layer's norm and g's fold, as our own layer does: a second pass launches
    neither the norm's GEMM nor the gain kernel, a changed magnitude folds again, the outputs stay PEFT's,
    and a training step afterwards too."""
    from fusedlora.kernels import dora as kernels_dora
    from fusedlora.ops import dora as ops_dora

    use_backend("triton")
    _, bnb_model, _ = nf4_checkpoint
    pm = dora_model(bnb_model, target_modules=["q_proj", "down_proj"]).train()  # (bnb repacks in eval on CPU)
    plain = copy.deepcopy(pm)
    fl.accelerate(pm)
    gains, norms = [], []
    real_gain, real_norm = kernels_dora.dora_gain, ops_dora._norm_and_scale_triton
    monkeypatch.setattr(kernels_dora, "dora_gain", lambda *a: gains.append(1) or real_gain(*a))
    monkeypatch.setattr(ops_dora, "_norm_and_scale_triton", lambda *a: norms.append(1) or real_norm(*a))
    ids = token_ids()
    with torch.inference_mode():
        first, second = outputs(pm, ids), outputs(pm, ids)
        assert (len(norms), len(gains)) == (4, 4)  # 2 layers x 2 modules, once each
        torch.testing.assert_close(first, outputs(plain, ids), **FP32_TOL)
        assert torch.equal(first, second)
        for model in (pm, plain):
            model.base_model.model.model.layers[1].mlp.down_proj.lora_magnitude_vector["default"].weight.mul_(1.5)
        changed = outputs(pm, ids)
    assert (len(norms), len(gains)) == (4, 5)
    torch.testing.assert_close(changed, outputs(plain, ids), **FP32_TOL)
    assert (changed - first).abs().max() > 1e-3
    # what the inference-mode calls kept are normal tensors: a training step after them is PEFT's
    assert_same(loss_and_grads(pm, ids), loss_and_grads(plain, ids), **FP32_TOL)


def test_accelerated_bnb_nf4_dora_model_compiles_fullgraph(nf4_checkpoint, use_backend):
    """PEFT's DoRA over bitsandbytes' Linear4bit, run by ``fl.accelerate`` and compiled with fullgraph: the
    graph takes the NF4 views built by ``fl.accelerate`` (it cannot build them itself: their checks go
    through bitsandbytes' JSON state), and equals PEFT's eager loss and gradients. A base whose view is gone
    is a clear error, not a graph break."""
    use_backend("triton")
    torch._dynamo.reset()
    _, bnb_model, _ = nf4_checkpoint
    pm = dora_model(bnb_model, target_modules=["q_proj", "down_proj"]).train()
    plain = copy.deepcopy(pm)
    fl.accelerate(pm)
    ids = token_ids()
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    unwrap = lambda name: name.removeprefix("_orig_mod.")  # noqa: E731
    assert_same(loss_and_grads(compiled, ids, unwrap), loss_and_grads(plain, ids), **FP32_TOL)

    torch._dynamo.reset()
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    del q.base_layer.weight.quant_state.__dict__["_fusedlora_view"]
    with pytest.raises(Exception, match="has no view of its NF4 state"):
        torch.compile(pm, fullgraph=True, backend="aot_eager")(input_ids=ids)
    fl.accelerate(pm)  # builds it again
    assert_same(loss_and_grads(torch.compile(pm, fullgraph=True, backend="aot_eager"), ids, unwrap),
                loss_and_grads(plain, ids), **FP32_TOL)


def test_peft_dora_adapter_loads_here_and_ours_loads_in_peft(tmp_path):
    base = tiny_llama()
    ids = token_ids()
    kwargs = dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2})
    pm = dora_model(base, **kwargs)
    expected = outputs(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    peft_tensors = load_file(tmp_path / "peft" / WEIGHTS_NAME)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert peft_tensors[key].shape == (64,)

    # PEFT's files -> a plain model: injected with use_dora from the config
    ours = fl.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    layers = lora_layers(ours)
    assert len(layers) == 6 and all(m.dora for m in layers.values())
    torch.testing.assert_close(outputs(ours, ids), expected, **FP32_TOL)
    assert (outputs(base, ids) - expected).abs().max() > 0.1
    # ... into a model injected without DoRA: its layers gain the magnitudes, A and B stay the same objects
    injected = fl.inject(copy.deepcopy(base), kwargs["target_modules"], r=4, rank_pattern={"v_proj": 2},
                         init_lora_weights=False)
    a_params = {n: m.lora_A for n, m in lora_layers(injected).items()}
    fl.load_adapter(injected, tmp_path / "peft")
    assert all(m.dora and m.lora_A is a_params[n] for n, m in lora_layers(injected).items())
    assert all(m.lora_magnitude_vector.weight.requires_grad for m in lora_layers(injected).values())
    torch.testing.assert_close(outputs(injected, ids), expected, **FP32_TOL)
    # ... into a DoRA model: the magnitude Parameters stay the same objects (an optimizer keeps them)
    dora = fl.inject(copy.deepcopy(base), kwargs["target_modules"], r=4, rank_pattern={"v_proj": 2},
                     use_dora=True)
    mags = {n: m.lora_magnitude_vector.weight for n, m in lora_layers(dora).items()}
    fl.load_adapter(dora, tmp_path / "peft")
    assert all(m.lora_magnitude_vector.weight is mags[n] for n, m in lora_layers(dora).items())
    torch.testing.assert_close(outputs(dora, ids), expected, **FP32_TOL)

    # our files -> PEFT
    fl.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["use_dora"] is True
    ours_tensors = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert ours_tensors.keys() == peft_tensors.keys()
    assert torch.equal(ours_tensors[key], peft_tensors[key])
    back = peft_load(base, tmp_path / "ours")
    assert back.peft_config["default"].use_dora
    torch.testing.assert_close(outputs(back, ids), expected, atol=0, rtol=0)  # PEFT both times, same tensors

    # our own DoRA adapter (trained magnitudes), saved and loaded by PEFT
    model = fl.inject(copy.deepcopy(base), ["o_proj", "down_proj"], r=3, alpha=5, use_dora=True,
                      init_lora_weights=False)
    perturb_magnitudes(model)
    fl.save_adapter(model, tmp_path / "trained")
    torch.testing.assert_close(outputs(peft_load(base, tmp_path / "trained"), ids), outputs(model, ids),
                               **FP32_TOL)


def test_plain_lora_adapter_turns_dora_layers_plain(tmp_path):
    base = tiny_llama()
    ids = token_ids()
    pm = peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm.save_pretrained(tmp_path)
    model = fl.inject(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, use_dora=True)
    fl.load_adapter(model, tmp_path)
    assert not any(m.dora for m in lora_layers(model).values())
    assert model.fusedlora_adapter_config["use_dora"] is False
    torch.testing.assert_close(outputs(model, ids), outputs(pm, ids), **FP32_TOL)


def test_mixed_dora_and_plain_layers_cannot_be_saved(tmp_path):
    model = fl.inject(tiny_llama(), ["q_proj"], r=4, use_dora=True)
    layer = model.model.layers[1].self_attn.q_proj
    layer.reset_adapter(4, 8)  # plain LoRA again
    with pytest.raises(ValueError, match=r"mix DoRA \(model\.layers\.0\.self_attn\.q_proj\) and plain LoRA "
                                         r"adapters \(model\.layers\.1\.self_attn\.q_proj\)"):
        fl.save_adapter(model, tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


@pytest.fixture
def dora_saved(tmp_path):
    model = fl.inject(tiny_llama(), ["q_proj", "v_proj"], r=4, use_dora=True, init_lora_weights=False)
    perturb_magnitudes(model)
    fl.save_adapter(model, tmp_path)
    return tmp_path


def test_bad_magnitudes_are_named(dora_saved):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    good = load_file(dora_saved / WEIGHTS_NAME)
    cases = [
        ({k: v for k, v in good.items() if k != key}, KeyError, "has no tensor '" + key + "' (the DoRA magnitude"),
        (dict(good, **{key: torch.rand(31)}), ValueError, key + r"' is torch.float32 of shape \(31,\), expected "
                                                              r"a floating-point tensor of shape \(32,\)"),
        (dict(good, **{key: torch.ones(32, dtype=torch.int32)}), ValueError, "torch.int32 of shape"),
        (dict(good, **{key: torch.full((32,), float("nan"))}), ValueError, key + "' .* holds 32 non-finite"),
    ]
    for tensors, exc, match in cases:
        save_file(tensors, dora_saved / WEIGHTS_NAME)
        model = tiny_llama()
        with pytest.raises(exc, match=re.escape(match) if exc is KeyError else match):
            fl.load_adapter(model, dora_saved)
        assert not lora_layers(model)  # nothing injected
    save_file(good, dora_saved / WEIGHTS_NAME)
    config = json.loads((dora_saved / CONFIG_NAME).read_text())
    (dora_saved / CONFIG_NAME).write_text(json.dumps(dict(config, use_dora=False)))
    with pytest.raises(ValueError, match=r"holds DoRA magnitudes \(\['base_model.*lora_magnitude_vector'.*does "
                                         r"not set use_dora"):
        fl.load_adapter(tiny_llama(), dora_saved)
    (dora_saved / CONFIG_NAME).write_text(json.dumps(dict(config, use_dora="yes")))
    with pytest.raises(ValueError, match="'use_dora' must be true or false, got 'yes'"):
        fl.load_adapter(tiny_llama(), dora_saved)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before, params, ids, expected):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    now = dict(model.named_parameters())
    assert now.keys() == params.keys() and all(now[n] is p for n, p in params.items())  # the same objects
    torch.testing.assert_close(outputs(model, ids), expected, atol=0, rtol=0)


def test_load_adapter_with_a_misshaped_magnitude_leaves_the_model_unchanged(dora_saved):
    model = fl.inject(tiny_llama(), ["q_proj", "v_proj"], r=4, use_dora=True, init_lora_weights=False)
    perturb_magnitudes(model, seed=9)
    ids = token_ids()
    before, params, expected = _state(model), dict(model.named_parameters()), outputs(model, ids)
    tensors = load_file(dora_saved / WEIGHTS_NAME)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file(dict(tensors, **{key: torch.rand(64, 1)}), dora_saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=re.escape(key) + r".*shape \(64, 1\)"):
        fl.load_adapter(model, dora_saved)
    _assert_unchanged(model, before, params, ids, expected)


@pytest.mark.parametrize("model_dora, file_dora", [(False, True), (True, False)])
def test_load_adapter_failing_late_restores_modules_magnitudes_and_values(tmp_path, monkeypatch, model_dora,
                                                                          file_dora):
    """A failure after the adapters were copied in (here: recording the config) puts back the magnitude
    modules (gained or lost), the Parameter objects and their values."""
    source = fl.inject(tiny_llama(seed=1), ["q_proj", "v_proj"], r=4, use_dora=file_dora, init_lora_weights=False)
    fl.save_adapter(source, tmp_path)
    model = fl.inject(tiny_llama(), ["q_proj", "v_proj"], r=4, use_dora=model_dora, init_lora_weights=False)
    perturb_magnitudes(model, seed=9)
    ids = token_ids()
    before, params, expected = _state(model), dict(model.named_parameters()), outputs(model, ids)
    modules = {n: m.lora_magnitude_vector for n, m in lora_layers(model).items()}
    real = adapters_module.record_adapter_config
    calls = []

    def fail_once(m, config):
        calls.append(config)
        if len(calls) == 1:
            assert all(layer.dora == file_dora for layer in lora_layers(m).values())  # changed by then
            raise RuntimeError("recording failed")
        return real(m, config)

    monkeypatch.setattr(adapters_module, "record_adapter_config", fail_once)
    with pytest.raises(RuntimeError, match="recording failed"):
        fl.load_adapter(model, tmp_path)
    assert all(m.lora_magnitude_vector is modules[n] for n, m in lora_layers(model).items())
    _assert_unchanged(model, before, params, ids, expected)
    assert model.fusedlora_adapter_config["use_dora"] is model_dora
