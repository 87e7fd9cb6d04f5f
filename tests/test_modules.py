"""LoRALinear: forward/backward against float64 math, init, scaling, merge, state dict, dtypes, errors."""

import math

import pytest
import torch
from torch import nn

import fusedlora as fl
from fusedlora.modules import LoRALinear

K, N, R = 59, 97, 5


def random_layer(bias=True, dtype=torch.float32, **kw) -> LoRALinear:
    lin = nn.Linear(K, N, bias=bias, dtype=dtype)
    layer = LoRALinear.from_linear(lin, r=R, alpha=7, init_lora_weights=False, **kw)
    return layer


def f64_reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    w = layer.dense_base_weight(torch.float64)
    y = x.double() @ w.T + layer.scaling * (x.double() @ layer.lora_A.double().T) @ layer.lora_B.double().T
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_backward_match_float64(bias, use_rslora):
    torch.manual_seed(0)
    layer = random_layer(bias=bias, use_rslora=use_rslora)
    assert layer.scaling == pytest.approx(7 / math.sqrt(R) if use_rslora else 7 / R)
    x = torch.randn(3, 7, K, requires_grad=True)
    y = layer(x)
    ref = f64_reference(layer, x)
    # fp32 dot products of length K=59 of O(1) values: |error| <~ K * 6e-8 * |terms| ~ 1e-5.
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    xa = x.detach().double()
    ref_ga = layer.scaling * (gy.double().flatten(0, 1) @ layer.lora_B.double()).T @ xa.flatten(0, 1)
    torch.testing.assert_close(layer.lora_A.grad.double(), ref_ga, atol=1e-4, rtol=1e-5)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_default_and_gaussian_init():
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    layer = LoRALinear.from_linear(lin, r=R, alpha=7)
    assert torch.count_nonzero(layer.lora_B) == 0
    # kaiming_uniform with a = √5 draws from U(-1/√K, 1/√K) (nn.Linear's default, PEFT's default for A)
    bound = 1 / math.sqrt(K)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    x = torch.randn(4, K)
    torch.testing.assert_close(layer(x), lin(x))  # B = 0: the layer starts as its base
    g = LoRALinear.from_linear(nn.Linear(256, 64), r=4, alpha=8, init_lora_weights="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 4) < 0.02  # 1024 samples: std error ≈ 0.25/√2048 ≈ 0.006
    assert torch.count_nonzero(g.lora_B) == 0


def test_from_linear_shares_the_base_and_lora_params_are_fp32():
    lin = nn.Linear(K, N, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(lin, r=R)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    # A bf16 input: the fp32 adapter is cast to bf16 for the op, the output stays bf16 and the
    # gradient reaches the fp32 parameters.
    layer.lora_B.data.normal_()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_autocast_bf16_with_fp32_parameters():
    torch.manual_seed(5)
    layer = random_layer()
    x = torch.randn(4, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    # bf16 rounding of x, A, B and W (relative 2^-8 each) on outputs of magnitude ~1
    torch.testing.assert_close(y.double(), f64_reference(layer, x), atol=5e-2, rtol=2e-2)


def test_merge_unmerge_and_to_linear():
    torch.manual_seed(1)
    layer = random_layer()
    x = torch.randn(5, K)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)  # fp32 re-association only
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=1e-6)  # one fp32 add and subtract
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and not lin.weight.requires_grad
    torch.testing.assert_close(lin(x), y, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_and_no_adapter_layer():
    torch.manual_seed(2)
    a = random_layer()
    b = LoRALinear(torch.zeros(N, K), torch.zeros(N), r=R, alpha=7)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, K)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    assert set(a.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    plain = LoRALinear(a.weight.detach(), a.bias.detach(), r=0)
    assert plain.lora_A is None
    torch.testing.assert_close(plain(x), nn.functional.linear(x, a.weight, a.bias))
    plain.reset_adapter(3, 6, init_lora_weights=False)
    assert plain.lora_A.shape == (3, K) and plain.scaling == 2.0


def test_dropout_reproducible_and_off_in_eval():
    torch.manual_seed(3)
    layer = random_layer(dropout=0.5)
    x = torch.randn(8, K)
    layer.train()
    torch.manual_seed(10)
    y1 = layer(x)
    torch.manual_seed(10)
    y2 = layer(x)
    torch.manual_seed(11)
    y3 = layer(x)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    assert (y1 - y3).abs().max() > 1e-3
    layer.eval()
    torch.testing.assert_close(layer(x), f64_reference(layer, x).float(), atol=1e-5, rtol=1e-5)


def test_extra_repr():
    text = repr(random_layer(use_rslora=True))
    for part in ("r=5", "alpha=7", "rslora=True", "base=dense float32", "backend=reference"):
        assert part in text


def test_bad_inputs():
    with pytest.raises(TypeError, match="weight"):
        LoRALinear([[1.0]])
    with pytest.raises(ValueError, match="weight"):
        LoRALinear(torch.zeros(3))
    with pytest.raises(ValueError, match="bias"):
        LoRALinear(torch.zeros(N, K), torch.zeros(N + 1))
    with pytest.raises(ValueError, match="r:"):
        LoRALinear(torch.zeros(N, K), r=-1)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(torch.zeros(N, K), dropout=1.0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear(torch.zeros(N, K), init_lora_weights="pissa")
    with pytest.raises(TypeError, match="linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="quantize"):
        LoRALinear.from_linear(nn.Linear(K, N), quantize="nf3")
    with pytest.raises(ValueError, match="x: expected last dimension"):
        random_layer()(torch.randn(2, K + 1))


# ------------------------------------------------------------------------------- 4-bit base


def quantized_layer(scheme: str, seed: int = 4, **kw) -> LoRALinear:
    torch.manual_seed(seed)
    lin = nn.Linear(128, N, bias=True)
    return LoRALinear.from_linear(lin, r=R, alpha=7, init_lora_weights=False, quantize=scheme, **kw)


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_quantized_base_matches_dequantized_math(scheme):
    layer = quantized_layer(scheme)
    assert dict(layer.named_parameters()).keys() == {"bias", "lora_A", "lora_B"}
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x).double(), f64_reference(layer, x), atol=1e-5, rtol=1e-5)
    assert scheme in repr(layer)


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_quantized_state_dict_to_and_merge(scheme):
    layer = quantized_layer(scheme)
    x = torch.randn(3, 128)
    y = layer(x)
    sd = layer.state_dict()
    assert sd["quant_data"].dtype == torch.uint8
    other = quantized_layer(scheme, seed=5)  # different bytes, scales and adapter until loaded
    assert not torch.equal(other.quant_data, layer.quant_data)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), y, atol=0, rtol=0)
    # .to(dtype) keeps the 4-bit tensors bit for bit and changes the compute dtype only
    before = {k: v.clone() for k, v in other.state_dict().items() if k.startswith("quant_")}
    other.to(torch.bfloat16)
    assert other.compute_dtype == torch.bfloat16 and other.lora_A.dtype == torch.bfloat16
    for k, v in before.items():
        if k != "quant_meta":
            assert other.state_dict()[k].dtype == v.dtype and torch.equal(other.state_dict()[k], v), k
    assert other(x.bfloat16()).dtype == torch.bfloat16
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), y, atol=0, rtol=0)
    lin = fl.merge(layer)
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(x), y, atol=1e-5, rtol=1e-5)


def test_ddp_wraps_a_4bit_layer(tmp_path):
    """DDP broadcasts buffers (the 4-bit tensors) and reduces only the trainable LoRA parameters."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    layer = quantized_layer("nf4")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(layer)
        x = torch.randn(3, 128)
        ddp(x).sum().backward()
        assert layer.lora_A.grad is not None and layer.quant_data.dtype == torch.uint8
        torch.testing.assert_close(ddp(x), layer(x), atol=0, rtol=0)
    finally:
        dist.destroy_process_group()
