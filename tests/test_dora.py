"""DoRA: the fused path (Triton kernels under the interpreter, fp32/fp16) against the float64 oracle, the
column-scaling kernels on their own, the layer (merge, disable, cache of ‖W_n‖²) and the no-[N, K]-tensor
rule of the training path.

Tolerances. The oracle is PEFT's formula in float64 on the weight as the layer decodes it. fp32: the
kernels and the oracle differ by fp32 rounding of sums over K ≤ 512 (relative ~1e-7 each) and of the norm
expansion (‖W‖² + 2s·ΣB·(WAᵀ) + s²·ΣB·(B·AAᵀ), all terms positive-dominated here), so 1e-5 of the output's
scale leaves two orders of headroom. fp16: x, A, B, drop(x) and the outputs are rounded to fp16 (2^-11
relative each) before or after fp32 sums over K, and W·Aᵀ for the norm takes A rounded to fp16: a few
units of 2^-11 of the output's scale, so 2^-8 (8 units) bounds it, while a wrong mask, scale or
column is off by O(1). bf16 (GPU only): the same roundings at 2^-8 each, plus the folded weight g ⊙ W
rounded once (within one ulp of g times the oracle's bf16 weight, DESIGN.md's rule for the fast paths):
a few units of 2^-8, so 2^-6.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedlora as fl
from fusedlora.functional import dora_linear
from fusedlora.ops.dora import dora_linear_reference, dora_weight_norm, weight_row_sq_norms

TOL = {torch.float32: 1e-5, torch.float16: 2.0**-8, torch.bfloat16: 2.0**-6}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _layer(quant, n=96, k=256, r=8, dropout=0.0, bias=True, dtype=torch.float32, seed=0):
    """A DoRA layer whose every term matters: B and m away from their initial values."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias).to(_device())
    with torch.no_grad():
        lin.bias.normal_() if bias else None
    layer = fl.LoRALinear.from_linear(lin, r=r, alpha=2 * r, dropout=dropout, quantize=quant, use_dora=True,
                                      init_lora_weights=False)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.lora_magnitude_vector.weight.mul_(torch.rand(n, device=_device()) + 0.5)
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _oracle(layer, x, mask):
    """PEFT's formula in float64 on the weight as decoded in the compute dtype."""
    w = layer.dense_base_weight(x.dtype).double()
    xx = x.detach().double().requires_grad_(True)
    a = layer.lora_A.detach().to(x.dtype).double().requires_grad_(True)
    b = layer.lora_B.detach().to(x.dtype).double().requires_grad_(True)
    m = layer.lora_magnitude_vector.weight.detach().double().requires_grad_(True)
    bias = None if layer.bias is None else layer.bias.detach().to(x.dtype).double()
    y = dora_linear_reference(xx, w, a, b, layer.scaling, m, None, bias, layer.dropout, mask is not None, mask)
    return y, (xx, a, b, m)


@pytest.mark.parametrize("quant", [None, "nf4", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_dora_matches_float64_oracle(triton_backend, quant, dtype, p):
    layer = _layer(quant, dropout=p, dtype=dtype)
    x = torch.randn(3, 11, layer.in_features, device=_device(), dtype=dtype, requires_grad=True)
    mask = (torch.rand(x.shape, device=x.device) >= p) if p else None
    mag = layer.lora_magnitude_vector
    a, b = layer.lora_A.to(dtype), layer.lora_B.to(dtype)
    base = layer.base_weight if layer.quantized else layer.weight
    y = dora_linear(x, base, a, b, layer.scaling, mag.weight, mag.base_sq_norm(layer, dtype), layer.bias, p,
                    True, mask)
    assert y.dtype == dtype and y.shape == (3, 11, layer.out_features)
    _check_with_oracle(layer, x, y, mask)


def _check_with_oracle(layer, x, y, mask):
    """y and its gradients (x, A, B, magnitude) against ``_oracle`` with the same mask, within TOL."""
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector.weight], dy)
    y0, inputs = _oracle(layer, x, mask)
    grads0 = torch.autograd.grad(y0, inputs, dy.double())
    assert _rel(y, y0) < TOL[x.dtype]
    for name, g, g0 in zip(("x", "A", "B", "magnitude"), grads, grads0, strict=True):
        assert g.shape == g0.shape, name
        assert _rel(g, g0) < TOL[x.dtype], name


@pytest.mark.parametrize("quant, p", [("nf4", 0.0), ("int4", 0.3)])
def test_folded_route_without_bias_and_with_a_zero_magnitude(triton_backend, monkeypatch, quant, p):
    """A 4-bit base in fp32 takes g into its row scales and B: the fused op's output is the layer's, or with
    dropout u's GEMM adds it (no stream either way), the backward runs only column sums (no g ⊙ dy pass). A
    zero magnitude (folded as 2^-64) leaves its column at 0 (without dropout) and its gradient equal to the oracle's."""
    from fusedlora.kernels import dora as kernels_dora

    layer = _layer(quant, dropout=p, bias=False)
    with torch.no_grad():
        layer.lora_magnitude_vector.weight[5] = 0.0
    x = torch.randn(4, 9, layer.in_features, device=_device(), requires_grad=True)
    mask = (torch.rand(x.shape, device=x.device) >= p) if p else None
    streams = []
    for name, g_at in (("dora_scale_fwd", 1), ("dora_scale_bwd", 2)):  # (name, position of its g)
        real = getattr(kernels_dora, name)
        monkeypatch.setattr(kernels_dora, name, lambda *a, _n=name, _r=real, _i=g_at: streams.append(
            (_n, a[_i] is None)) or _r(*a))
    mag = layer.lora_magnitude_vector
    y = dora_linear(x, layer.base_weight, layer.lora_A, layer.lora_B, layer.scaling, mag.weight,
                    mag.base_sq_norm(layer, x.dtype), None, p, True, mask)
    if not p:  # (with dropout, column 5 is W_5·(x − drop(x)), the base term DoRA leaves unscaled)
        assert y[..., 5].abs().max() < 1e-12 * y.abs().max()
    _check_with_oracle(layer, x, y, mask)
    # no forward stream (with dropout, u's GEMM adds v in its epilogue); column sums without dz
    assert streams == [("dora_scale_bwd", True)]


def test_folded_output_in_place(triton_backend):
    """Without dropout or bias the folded route hands over the fused op's output itself (no copy): in-place
    changes to it work without gradients, and with them autograd reports the change (the output is what dm
    is computed from) instead of a custom-Function view error or a wrong gradient."""
    layer = _layer("nf4", bias=False)
    x = torch.randn(5, layer.in_features, device=_device())
    with torch.no_grad():
        y = layer(x)
        want = y.clone() * 2
        y.mul_(2.0)
    assert torch.equal(y, want)
    y = layer(x.requires_grad_(True))
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_gain_kernel_folds_g_into_scales_and_b(triton_backend):
    """``dora_gain`` (one launch): g = m / norm with a zero m counted as the given stand-in, 1 / m, g ⊙ B,
    and block scales times g that decode to g[n]·W[n, :] for a double-quantized NF4 and an INT4 weight
    (fp32 scales: one rounding of the product, so within 2 ulps of fp32), with NaN-poisoned outputs."""
    from fusedlora.formats import dequantize_reference
    from fusedlora.formats.int4 import quantize_int4
    from fusedlora.formats.nf4 import quantize_nf4
    from fusedlora.kernels.dora import dora_gain
    from fusedlora.ops.dora import _scales, with_scales

    n, r = 37, 5
    w = torch.randn(n, 256, device=_device())
    m = torch.rand(n, device=_device()) + 0.25
    m[3] = 0.0
    norm = torch.rand(n, device=_device()) + 0.5
    b = torch.randn(n, r, device=_device(), dtype=torch.float16)
    real = torch.empty
    for packed in (quantize_nf4(w, 64, double_quant=True), quantize_int4(w, 128)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "empty", lambda *a, **kw: real(*a, **kw).fill_(float("nan")))
            mp.setattr(torch, "empty_like",
                       lambda t, **kw: real(t.shape, dtype=t.dtype, device=t.device).fill_(float("nan")))
            g, inv_m, b_fold, folded = dora_gain(m, norm, b, *_scales(packed), 1e-3)
        m_used = torch.where(m == 0, 1e-3, m).double()
        assert _rel(g, m_used / norm.double()) < 1e-6 and _rel(inv_m, 1 / m_used) < 1e-6
        assert _rel(b_fold, b.double() * g.double()[:, None]) <= torch.finfo(torch.float16).eps
        want = dequantize_reference(packed, torch.float64) * g.double()[:, None]
        got = dequantize_reference(with_scales(packed, folded), torch.float64)
        assert _rel(got, want) < 2 * torch.finfo(torch.float32).eps, packed.scheme


@pytest.mark.gpu
def test_folded_route_bf16_gpu(triton_backend):
    """bf16 takes the folded route (g in a double-quantized NF4 weight's row scales): with dropout and bias
    (drop split, the rank-0 second product adding v and the bias), and without either (the op's output as
    it is), and with the mask drawn in the kernels (x's gradient from the second product's dX epilogue);
    outputs and gradients against the float64 oracle within TOL."""
    from fusedlora.kernels.dropout import dropout_mask
    from fusedlora.ops.lora_triton import draw_seed

    for p, bias, drawn in ((0.3, True, False), (0.0, False, False), (0.3, True, True)):
        layer = _layer("nf4", n=192, k=256, r=16, dropout=p, bias=bias, dtype=torch.bfloat16)
        x = torch.randn(64, layer.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        mask = (torch.rand(x.shape, device=x.device) >= p) if p and not drawn else None
        mag = layer.lora_magnitude_vector
        torch.manual_seed(321)
        y = dora_linear(x, layer.base_weight, layer.lora_A, layer.lora_B, layer.scaling, mag.weight,
                        mag.base_sq_norm(layer, x.dtype), layer.bias, p, True, mask)
        if drawn:
            torch.manual_seed(321)
            mask = dropout_mask(draw_seed(x.device), x.shape, p, x.device)
        _check_with_oracle(layer, x, y, mask)


def test_norm_from_the_expansion_equals_the_direct_norm(triton_backend):
    for quant in (None, "nf4"):
        layer = _layer(quant, n=64, k=128)
        with torch.no_grad():
            layer.lora_B.mul_(20.0)  # s·B·A comparable to W: the cross and square terms matter
        w = layer.dense_base_weight(torch.float32).double()
        delta = layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
        direct = torch.linalg.vector_norm(w + delta, dim=1)
        base = layer.base_weight.packed if layer.quantized else layer.weight
        sq = weight_row_sq_norms(base, torch.float32)
        assert _rel(sq, (w * w).sum(1)) < 1e-6
        got = dora_weight_norm(base, layer.lora_A, layer.lora_B, layer.scaling, sq, torch.float32)
        assert got.dtype == torch.float32 and _rel(got, direct) < 1e-5
        assert (delta.norm(dim=1) > 0.3 * w.norm(dim=1)).all()  # the expansion's extra terms were exercised


@pytest.mark.parametrize("quant, r", [(None, 8), ("nf4", 40)])
def test_norm_kernel_equals_the_direct_norm(triton_backend, quant, r):
    """The fast path's norm and g (the fused GEMM at M = r, then one kernel; r = 40 spans three rank slices of
    the kernel, the last partly masked)."""
    from fusedlora.ops.dora import _norm_and_scale_triton

    layer = _layer(quant, n=80, k=128, r=r)
    with torch.no_grad():
        layer.lora_B.mul_(20.0)
    w = layer.dense_base_weight(torch.float32).double()
    delta = layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    direct = torch.linalg.vector_norm(w + delta, dim=1)
    mag = layer.lora_magnitude_vector
    base = layer.base_weight.packed if layer.quantized else layer.weight
    norm, g = _norm_and_scale_triton(base, layer.lora_A, layer.lora_B, layer.scaling,
                                     mag.base_sq_norm(layer, torch.float32), mag.weight)
    assert norm.dtype == g.dtype == torch.float32 and norm.shape == g.shape == (80,)
    assert _rel(norm, direct) < 1e-5
    assert _rel(g, mag.weight.detach().double() / direct) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_kernels_write_every_element(triton_backend, monkeypatch, dtype):
    from fusedlora.kernels.dora import dora_scale_bwd, dora_scale_fwd

    m, n = 37, 70  # neither a multiple of the tiles
    dev = _device()
    z, u, dy = (torch.randn(m, n, device=dev, dtype=dtype) for _ in range(3))
    g = torch.rand(n, device=dev) + 0.5
    bias = torch.randn(n, device=dev, dtype=dtype)
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))
    y = dora_scale_fwd(z, g, u, bias)
    y_plain = dora_scale_fwd(z, g, None, None)
    dz, colsum = dora_scale_bwd(dy, z, g)
    zd, gd = z.double(), g.double()
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(y).all() and torch.isfinite(y_plain).all() and torch.isfinite(dz).all()
    assert _rel(y, zd * gd + u.double() + bias.double()) <= eps
    assert _rel(y_plain, zd * gd) <= eps
    assert _rel(dz, dy.double() * gd) <= eps
    assert colsum.dtype == torch.float32 and _rel(colsum, (dy.double() * zd).sum(0)) < 1e-6
    # g folded elsewhere: the add alone, and the column sums alone times a factor (no dz)
    y_add = dora_scale_fwd(z, None, u, bias)
    factor = torch.rand(n, device=dev) + 0.5
    no_dz, sums = dora_scale_bwd(dy, z, None, factor)
    assert torch.isfinite(y_add).all() and no_dz is None
    assert _rel(y_add, zd + u.double() + bias.double()) <= eps
    assert _rel(sums, (dy.double() * zd).sum(0) * factor.double()) < 1e-6


def test_layer_merge_disable_and_to_linear(triton_backend):
    layer = _layer("nf4")
    x = torch.randn(5, layer.in_features, device=_device())
    y = layer(x)
    base = torch.nn.functional.linear(x, layer.dense_base_weight(), layer.bias)
    assert _rel(y, base) > 1e-2  # DoRA changes the output
    with fl.disable_adapter(layer):
        assert _rel(layer(x), base) < 1e-5
    assert _rel(layer(x), y) < 1e-6
    assert _rel(layer.to_linear()(x), y) < 1e-5
    layer.merge()
    assert _rel(layer(x), y) < 1e-5
    layer.unmerge()
    assert layer.lora_magnitude_vector.merged_factor is None and _rel(layer(x), y) < 1e-6

    dense = _layer(None, dtype=torch.float64)
    xd = torch.randn(4, dense.in_features, device=_device(), dtype=torch.float64)
    w0, yd = dense.weight.detach().clone(), dense(xd)
    dense.merge()
    assert _rel(dense(xd), yd) < 1e-12
    dense.unmerge()
    assert _rel(dense.weight, w0) < 1e-12


def test_base_norm_cache_follows_the_base():
    layer = _layer(None, dtype=torch.float64)
    mag = layer.lora_magnitude_vector
    first = mag.base_sq_norm(layer, torch.float64)
    assert mag.base_sq_norm(layer, torch.float64) is first  # kept
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place change of the frozen base
    again = mag.base_sq_norm(layer, torch.float64)
    assert _rel(again, 4.0 * first) < 1e-12


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_opcheck_of_the_dora_ops(triton_backend, quant):
    """Each DoRA op's schema, fake impl and real outputs agree (torch.library.opcheck), with every optional
    argument given and left out."""
    from fusedlora.ops.dora import _scales
    from fusedlora.ops.lora_triton import draw_seed, weight_args

    ops = torch.ops.fusedlora
    dev = _device()
    layer = _layer(quant, n=40, k=128, r=4)
    weight = layer.base_weight.packed
    n, r, m = 40, 4, 9
    wa, b, z, u = torch.randn(r, n, device=dev) / 8, torch.randn(n, r, device=dev), *torch.randn(2, m, n, device=dev)
    aat, sq = torch.eye(r, device=dev) / 8, torch.rand(n, device=dev) + 1.0  # a norm² that stays above 0
    mag, g, bias = torch.rand(n, device=dev) + 0.5, torch.rand(n, device=dev) + 0.5, torch.randn(n, device=dev)
    x = torch.randn(m, 128, device=dev)
    xd, c, bits = ops.dora_drop_split(x, draw_seed(x.device), 0.25)
    scales, nested = _scales(weight)
    cases = [
        (ops.dora_norm, (wa, b, aat, sq, mag, 1.5)), (ops.dora_norm, (wa, b, aat, sq, None, 1.5)),
        (ops.dora_gain, (mag, sq, b, scales, *(nested or (None, None, 0.0)), 2.0**-64)),
        (ops.dora_scale_fwd, (z, g, u, bias)), (ops.dora_scale_fwd, (z, None, None, None)),
        (ops.dora_scale_bwd, (u, z, g, None)), (ops.dora_scale_bwd, (u, z, None, g)),
        (ops.dora_drop_split, (x, draw_seed(x.device), 0.25)),
        (ops.dora_drop_split_bwd, (xd, c, bits, 0.25)),
        (ops.row_sq_norms_4bit, (*weight_args(weight)[:5], weight_args(weight)[5], n, 128,
                                   *weight_args(weight)[6:], torch.float32)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("quant, k, block_k", [("nf4", 192, 64), ("nf4", 200, 64), ("int4", 256, 64),
                                               ("nf4", 192, 128), ("int4", 384, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_sq_norms_from_the_codes(triton_backend, monkeypatch, quant, k, block_k, dtype):
    """‖W_n‖² of a 4-bit base read from its codes equals that of W decoded to the compute dtype (each element
    rounded once, then squared and summed in fp32; float64 sums of the same values as the oracle), rows that
    start inside an NF4 block (K = 200) and K steps wider than the blocks (each element's own scale, the last
    step partial) included; the kernel's rows are poisoned first."""
    from fusedlora.kernels import dora as kernels_dora

    monkeypatch.setattr(kernels_dora, "_SQ_BLOCK_K", block_k)
    layer = _layer(quant, n=37, k=k, r=4, seed=k)
    real = torch.empty
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", lambda *a, **kw: real(*a, **kw).fill_(float("nan")))
        got = weight_row_sq_norms(layer.base_weight.packed, dtype)
    want = layer.dense_base_weight(dtype).double().square().sum(1)
    assert got.dtype == torch.float32 and got.shape == (37,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    if dtype != torch.float32:  # the rounding is the compute dtype's, not fp32's
        assert not torch.allclose(want, layer.dense_base_weight(torch.float32).double().square().sum(1),
                                  rtol=1e-6, atol=0)


@pytest.mark.parametrize("quant, p, bias, dtype, backend", [
    (None, 0.3, True, torch.float32, "aot_eager"),   # dense base: z, the dropout split and the scale streams
    ("nf4", 0.0, False, torch.float32, "aot_eager"),  # folded, the fused op's output handed over as the layer's
    ("nf4", 0.3, True, torch.float32, "aot_eager"),   # folded, dropout drawn in the kernels (one autograd node)
    ("nf4", 0.3, True, torch.float32, "inductor"),
    ("int4", 0.3, True, torch.float16, "aot_eager"),  # fp16 keeps the z-and-streams route on a 4-bit base
])
def test_torch_compile_fullgraph(triton_backend, quant, p, bias, dtype, backend):
    """A DoRA layer compiles with fullgraph (its kernels are torch.library ops) and gives eagerly's outputs and
    gradients for the same seed, over two steps with an optimizer step between: the compiled graph takes the
    norm of the current adapter (it cannot keep it), so a stale norm would show in the second step. (Inductor
    draws the dropout seed from its own random stream unless told to fall back to torch's.)"""
    import torch._inductor.config

    torch._dynamo.reset()
    layers = [_layer(quant, n=48, k=128, r=4, dropout=p, bias=bias, dtype=dtype, seed=3) for _ in range(2)]
    for layer in layers:
        layer.train()
    x = torch.randn(2, 5, 128, device=_device(), dtype=dtype)
    with torch.no_grad():
        layers[1](x)  # an eager call first: the layer's kept norms exist when the graph is traced
    runs = [layers[0], torch.compile(layers[1], fullgraph=True, backend=backend)]
    got = []
    for layer, run in zip(layers, runs, strict=True):
        params = [prm for prm in layer.parameters() if prm.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        steps = []
        for step in range(2):
            xx = x.clone().requires_grad_(True)
            torch.manual_seed(40 + step)  # the same dropout seed in both runs
            with torch._inductor.config.patch(fallback_random=True):
                y = run(xx)
            y.float().square().mean().backward()
            steps.append([y.detach(), xx.grad] + [prm.grad.clone() for prm in params])
            opt.step()
            opt.zero_grad()
        got.append(steps)
    assert got[0][0][0].shape == (2, 5, 48)
    for eager, compiled in zip(*got, strict=True):
        for e, c in zip(eager, compiled, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[0][0][0], got[0][1][0])  # the step changed the layer


def test_inject_and_state_dict():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16))
    fl.inject(model, target_modules=["0", "2"], r=4, alpha=8, use_dora=True)
    layer = model[0]
    assert layer.dora and layer.lora_magnitude_vector.weight.requires_grad
    # DoRA starts as the LoRA layer it wraps: m = ‖W + s·B·A‖ with B = 0 is ‖W‖
    w = layer.weight.detach()
    assert _rel(layer.lora_magnitude_vector.weight, w.norm(dim=1)) < 1e-6
    keys = model.state_dict().keys()
    assert "0.lora_magnitude_vector.weight" in keys and "2.lora_magnitude_vector.weight" in keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{t}" for i in (0, 2) for t in ("lora_A", "lora_B", "lora_magnitude_vector.weight")}
    assert "dora=True" in repr(layer)


def test_bad_arguments_name_themselves():
    layer = _layer(None)
    x = torch.randn(2, layer.in_features, device=_device())
    mag = layer.lora_magnitude_vector
    sq = mag.base_sq_norm(layer, torch.float32)
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, 1.0, mag.weight[:-1], sq)
    with pytest.raises(ValueError, match="base_sq_norm"):
        dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, 1.0, mag.weight, sq[:3])
    with pytest.raises(ValueError, match="use_dora"):
        fl.LoRALinear(torch.randn(4, 4), r=0, use_dora=True)
    with pytest.raises(ValueError, match="magnitude"):
        layer.adopt_adapter(layer.lora_A, layer.lora_B, 2.0, magnitude=torch.ones(3))


class _Sizes(TorchDispatchMode):
    """Records the bytes of every new storage an op returns (views of the ``known`` storages: the layer's own
    tensors and the shared scratch, are not allocations of the step)."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known = known
        self.largest: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.largest.append((t.untyped_storage().nbytes(), str(func)))
        return out


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_training_step_allocates_nothing_weight_sized(triton_backend, quant, p):
    layer = _layer(quant, n=256, k=512, r=8, dropout=p)
    layer.train()
    weight_bytes = 256 * 512 * 2  # the weight in a 16-bit dtype: what a decode or s·B·A would allocate
    x = torch.randn(8, 512, device=_device(), requires_grad=True)
    layer(x).sum().backward()  # first call: ‖W_n‖² decoded once (into the shared scratch), then kept
    from fusedlora.ops.scratch import _BUFFERS

    known = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers(), x,
                                                       *_BUFFERS.values()]}
    with _Sizes(known) as sizes:
        y = layer(x)
        y.square().sum().backward()
    big = [(b, f) for b, f in sizes.largest if b >= weight_bytes]
    assert sizes.largest and not big, big


def test_kept_norm_is_computed_once_per_adapter_state(triton_backend, monkeypatch):
    """The layer keeps ‖W + s·B·A‖ between forwards with the same A, B and base (inference, micro-batches
    of one step) and computes it again after an optimizer step; outputs equal an uncached forward."""
    from fusedlora.ops import dora as ops_dora

    layer = _layer("nf4", n=64, k=128, r=4)
    layer.train()
    calls = []
    real = ops_dora._norm_and_scale_triton
    monkeypatch.setattr(ops_dora, "_norm_and_scale_triton", lambda *a: calls.append(a[-1] is None) or real(*a))
    x = torch.randn(6, layer.in_features, device=_device())
    y1 = layer(x)
    y2 = layer(x)
    assert calls == [True] and torch.equal(y1, y2)  # once, kept (None: the norm alone, g formed by the op)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    y3 = layer(x)
    assert calls == [True, True]  # A and B changed: computed again
    mag = layer.lora_magnitude_vector
    a, b = layer.lora_A, layer.lora_B
    uncached = dora_linear(x, layer.base_weight, a, b, layer.scaling, mag.weight, mag.base_sq_norm(layer, x.dtype),
                           layer.bias, 0.0, True)
    assert len(calls) == 3  # the op computing the norm itself
    assert _rel(y3, uncached) < 1e-6 and _rel(y3, y1) > 1e-3


def test_inference_keeps_the_fold_until_b_or_m_changes(triton_backend, monkeypatch):
    """Without gradients (inference, generation) a folded layer keeps g ⊙ B, 1 / m and the folded block scales
    with the norm: its calls launch neither the norm's GEMM nor the gain kernel again until B or m changes;
    with gradients it folds at every call (B's gradient goes through the fold). Outputs equal an uncached
    call each time; a kept fold given where it cannot serve is an error naming ``fold``."""
    from fusedlora.kernels import dora as kernels_dora
    from fusedlora.ops import dora as ops_dora

    layer = _layer("nf4", n=64, k=128, r=4)
    layer.eval()
    gains, norms = [], []
    real_gain, real_norm = kernels_dora.dora_gain, ops_dora._norm_and_scale_triton
    monkeypatch.setattr(kernels_dora, "dora_gain", lambda *a: gains.append(1) or real_gain(*a))
    monkeypatch.setattr(ops_dora, "_norm_and_scale_triton", lambda *a: norms.append(1) or real_norm(*a))
    x = torch.randn(3, layer.in_features, device=_device())
    mag = layer.lora_magnitude_vector

    def uncached():
        with torch.no_grad():
            return dora_linear(x, layer.base_weight, layer.lora_A, layer.lora_B, layer.scaling, mag.weight,
                               mag.base_sq_norm(layer, x.dtype), layer.bias)

    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    assert (len(norms), len(gains)) == (1, 1) and torch.equal(y1, y2)
    with torch.no_grad():
        mag.weight.mul_(1.5)  # m changed: folded again, the norm kept
        y3 = layer(x)
    assert (len(norms), len(gains)) == (1, 2) and _rel(y3, y1) > 1e-3
    assert _rel(y3, uncached()) < 1e-6
    with torch.no_grad():
        layer.lora_B.add_(0.25)  # B changed: the norm and the fold again
        y4 = layer(x)
    assert len(gains) == 4 and _rel(y4, uncached()) < 1e-6 and _rel(y4, y3) > 1e-3
    before = len(gains)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert len(gains) == before + 2 and layer.lora_B.grad.abs().max() > 0  # with gradients: every call

    with torch.no_grad():
        packed, sq = layer.base_weight.packed, mag.base_sq_norm(layer, x.dtype)
        norm = mag.kept.norm(sq, [layer.lora_A, layer.lora_B], packed, layer.lora_A, layer.lora_B, layer.scaling,
                             x.dtype)
        fold = mag.kept.fold(norm, [layer.lora_B], packed, layer.lora_B, mag.weight, x.dtype)
    args = (x, layer.base_weight, layer.lora_A, layer.lora_B, layer.scaling, mag.weight,
            mag.base_sq_norm(layer, x.dtype))
    with pytest.raises(ValueError, match="fold: serves calls without gradients"):
        dora_linear(*args, weight_norm=norm, fold=fold)
    with torch.no_grad(), pytest.raises(ValueError, match="fold: given without the weight_norm"):
        dora_linear(*args, fold=fold)
    with torch.no_grad(), pytest.raises(ValueError, match=r"fold\[2\]: expected shape"):
        dora_linear(*args, weight_norm=norm, fold=(fold[0], fold[1], fold[2][:, :1]))


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_inference_mode_then_training(triton_backend, quant):
    """Calls under torch.inference_mode keep what they compute as normal tensors (inference tensors have no
    version counter to key on, and cannot be saved for backward), so a training step after them works and
    equals that of a layer never run in inference mode."""
    layers = [_layer(quant, n=48, k=128, r=4) for _ in range(2)]
    x = torch.randn(3, layers[0].in_features, device=_device())
    with torch.inference_mode():
        y_inf = layers[0](x)
        assert torch.equal(layers[0](x), y_inf)
    got = []
    for layer in layers:
        y = layer(x)
        y.square().sum().backward()
        got.append([y.detach(), layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.weight.grad])
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_inf, got[1][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("quant, dtype", [(None, torch.float32), ("nf4", torch.float16), ("nf4", torch.float32)])
def test_dropout_drawn_in_the_kernel_equals_the_oracle_with_its_mask(triton_backend, monkeypatch, quant, dtype):
    """Dropout without an explicit mask: drop(x) and x − drop(x) come from one kernel whose mask is drawn
    from a seed of torch's generator (kernels.dropout's scheme); re-drawing that seed and materializing the
    mask gives the oracle the same drop. Outputs and every gradient within the file's tolerances. On the
    folded route (a 4-bit base in fp32) x's gradient comes from the last dX GEMM's epilogue: the pass that
    mixes the two gradients otherwise never runs."""
    from fusedlora.kernels import dora as kernels_dora
    from fusedlora.kernels.dropout import dropout_mask
    from fusedlora.ops.lora_triton import draw_seed

    if quant and dtype == torch.float32:
        monkeypatch.setattr(kernels_dora, "drop_split_bwd", lambda *a: pytest.fail("the mixing pass ran"))

    p = 0.3
    layer = _layer(quant, dropout=p, dtype=dtype)
    layer.train()
    x = torch.randn(5, 7, layer.in_features, device=_device(), dtype=dtype, requires_grad=True)
    mag = layer.lora_magnitude_vector
    base = layer.base_weight if layer.quantized else layer.weight
    a, b = layer.lora_A.to(dtype), layer.lora_B.to(dtype)
    torch.manual_seed(123)
    y = dora_linear(x, base, a, b, layer.scaling, mag.weight, mag.base_sq_norm(layer, dtype), layer.bias, p, True)
    torch.manual_seed(123)
    mask = dropout_mask(draw_seed(x.device), x.shape, p, x.device)
    assert 0.2 < 1 - mask.float().mean().item() < 0.4  # about p of the elements dropped
    _check_with_oracle(layer, x, y, mask)
