"""The plain-torch reference LoRA linear: the CPU path and the oracle every kernel is compared against."""

import pytest
import torch

import fusedlora as fl
from fusedlora.ops.lora import draw_dropout_mask_reference


def _inputs(m, k, n, r, dtype, bias=True, lead=()):
    x = torch.randn(*lead, m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    a = torch.randn(r, k, dtype=dtype) / k**0.5
    b = torch.randn(n, r, dtype=dtype)  # random, never PEFT's zero init: a zero B would hide the LoRA term
    bias_t = torch.randn(n, dtype=dtype) if bias else None
    return x, w, a, b, bias_t


def _f64(x, w, a, b, bias, scale, mask=None, p=0.0):
    x, w, a, b = (t.double() for t in (x, w, a, b))
    xd = x if mask is None else x * mask.double() / (1 - p)
    y = x @ w.T + scale * (xd @ a.T) @ b.T
    return y if bias is None else y + bias.double()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n,r", [(1, 64, 48, 4), (59, 97, 129, 16)])
def test_forward_matches_float64(dtype, m, k, n, r):
    x, w, a, b, bias = _inputs(m, k, n, r, dtype)
    y = fl.lora_linear(x, w, a, b, 2.0, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    exact = _f64(x, w, a, b, bias, 2.0)
    # The bound: at most 2x the error of torch doing the same math naively in this dtype (plus a floor of
    # one fp64 ulp-scale term for fp64, where the naive error is itself ~1e-16).
    naive = (x @ w.T + 2.0 * (x @ a.T) @ b.T + bias).to(dtype)
    assert _rel(y, exact) <= 2 * _rel(naive, exact) + 1e-14


def test_fp32_accumulation_for_half_inputs():
    # fp32 accumulation means the only error left is the final rounding to fp16: <= half an ulp, 2^-11.
    x, w, a, b, bias = _inputs(37, 256, 64, 8, torch.float16)
    y = fl.lora_linear(x, w, a, b, 0.5, bias)
    exact = _f64(x, w, a, b, bias, 0.5)
    assert ((y.double() - exact).abs() <= exact.abs() * 2.0**-11 + 1e-6).all()


def test_leading_batch_dimensions():
    x, w, a, b, bias = _inputs(5, 32, 24, 4, torch.float64, lead=(2, 3))
    y = fl.lora_linear(x, w, a, b, 1.5, bias)
    assert y.shape == (2, 3, 5, 24)
    torch.testing.assert_close(y, _f64(x, w, a, b, bias, 1.5), rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    x, w, a, b, bias = _inputs(7, 11, 13, 3, torch.float64)
    for t in (x, a, b, bias):
        t.requires_grad_(True)
    mask = torch.rand(7, 11) > 0.3
    fn = lambda x, a, b, bias: fl.lora_linear(x, w, a, b, 0.7, bias, 0.3, True, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b, bias))


def test_explicit_mask_is_exact():
    p = 0.25
    x, w, a, b, bias = _inputs(31, 40, 20, 8, torch.float64)
    mask = torch.rand(31, 40) >= p
    y = fl.lora_linear(x, w, a, b, 2.0, bias, p, True, mask)
    torch.testing.assert_close(y, _f64(x, w, a, b, bias, 2.0, mask, p), rtol=1e-12, atol=1e-12)


def test_dropout_off_in_eval_and_at_p_zero():
    x, w, a, b, bias = _inputs(9, 16, 8, 4, torch.float64)
    exact = _f64(x, w, a, b, bias, 1.0)
    torch.testing.assert_close(fl.lora_linear(x, w, a, b, 1.0, bias, 0.5, False), exact)
    torch.testing.assert_close(fl.lora_linear(x, w, a, b, 1.0, bias, 0.0, True), exact)


def test_dropout_seeded_draws():
    p = 0.1
    x, w, a, b, bias = _inputs(64, 48, 32, 8, torch.float32)
    torch.manual_seed(123)
    y1 = fl.lora_linear(x, w, a, b, 2.0, bias, p, True)
    torch.manual_seed(123)
    y2 = fl.lora_linear(x, w, a, b, 2.0, bias, p, True)
    torch.manual_seed(124)
    y3 = fl.lora_linear(x, w, a, b, 2.0, bias, p, True)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    # The random draw is exactly the mask function's draw from the same generator state.
    torch.manual_seed(123)
    mask = draw_dropout_mask_reference(x, p)
    torch.testing.assert_close(y1, fl.lora_linear(x, w, a, b, 2.0, bias, p, True, mask))


def test_dropout_statistics_match_inverted_dropout():
    # PEFT applies nn.Dropout: keep with probability 1-p, scale kept elements by 1/(1-p).
    p = 0.1
    mask = draw_dropout_mask_reference(torch.empty(1000, 1000), p)
    kept = mask.double().mean().item()
    # 1e6 Bernoulli draws: std of the mean is sqrt(p(1-p)/1e6) = 3e-4; 5 sigma.
    assert abs(kept - (1 - p)) < 1.5e-3
    # Scale: with A = B = I the LoRA term is s·drop(x): x/(1-p) where kept, 0 where dropped.
    k = 16
    x = torch.randn(50, k, dtype=torch.float64)
    w = torch.randn(k, k, dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    m = torch.rand(50, k) >= p
    lora_term = fl.lora_linear(x, w, eye, eye, 1.0, None, p, True, m) - x @ w.T
    torch.testing.assert_close(lora_term, torch.where(m, x / (1 - p), 0.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "case,exc,msg",
    [
        ("a_shape", ValueError, r"lora_A: expected shape \[r, K=32\]"),
        ("b_shape", ValueError, r"lora_B: expected shape \(24, 4\), got \(24, 5\)"),
        ("x_shape", ValueError, r"x: expected last dimension K=32"),
        ("dtype", TypeError, r"lora_B: expected dtype torch.float32 \(the dtype of x\), got torch.float16"),
        ("int_x", TypeError, r"x: expected dtype in"),
        ("bias", ValueError, r"bias: expected shape \(24,\), got \(23,\)"),
        ("device", ValueError, r"lora_A: expected a tensor on cpu"),
        ("p", ValueError, r"dropout_p: expected a float in \[0, 1\), got 1.0"),
        ("mask_off", ValueError, r"dropout_mask: given, but dropout is off"),
        ("weight_type", TypeError, r"weight: expected a torch.Tensor, got list"),
    ],
)
def test_bad_input_names_the_argument(case, exc, msg):
    x, w, a, b, bias = _inputs(3, 32, 24, 4, torch.float32)
    kw = dict(x=x, weight=w, lora_A=a, lora_B=b, scale=1.0, bias=bias)
    if case == "a_shape":
        kw["lora_A"] = torch.randn(4, 31)
    elif case == "b_shape":
        kw["lora_B"] = torch.randn(24, 5)
    elif case == "x_shape":
        kw["x"] = torch.randn(3, 33)
    elif case == "dtype":
        kw["lora_B"] = b.half()
    elif case == "int_x":
        kw["x"] = torch.ones(3, 32, dtype=torch.int32)
    elif case == "bias":
        kw["bias"] = torch.randn(23)
    elif case == "device":
        kw["lora_A"] = a.to("meta")
    elif case == "p":
        kw.update(dropout_p=1.0, training=True)
    elif case == "mask_off":
        kw.update(dropout_mask=torch.ones(3, 32, dtype=torch.bool))
    elif case == "weight_type":
        kw["weight"] = w.tolist()
    with pytest.raises(exc, match=msg):
        fl.lora_linear(**kw)
