"""INT4 group-wise asymmetric: layout, error bound, exactness of the reference dequantize, errors."""

import pytest
import torch

import fusedlora as fl
from fusedlora.formats import dequantize_reference, quantize_int4
from fusedlora.formats.nibbles import unpack_nibbles


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("group_size", (64, 128))
def test_quantize_within_half_a_step(group_size, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 256, generator=g) * 0.02 + 0.003).to(dtype)
    p = quantize_int4(w, group_size)
    assert p.data.shape == (37, 128) and p.data.dtype == torch.uint8
    assert p.scales.shape == (37, 256 // group_size) and p.scales.dtype == torch.float32
    assert p.zeros.dtype == torch.uint8 and int(p.zeros.max()) <= 15
    w2 = dequantize_reference(p, torch.float32)
    step = p.scales.repeat_interleave(group_size, dim=1)
    # round-to-nearest: |w - deq| <= step/2, plus fp32 rounding of w/scale and of the product (a few ulps)
    assert ((w.float() - w2).abs() <= step * (0.5 + 1e-5)).all()


def test_layout_row_major_first_element_high():
    w = torch.randn(3, 128)
    p = quantize_int4(w, 64)
    q = unpack_nibbles(p.data, 3 * 128).view(3, 128).long()
    assert torch.equal(p.data.long(), q[:, 0::2] * 16 + q[:, 1::2])
    # w = (q - zero) * scale, in float64 (exact: small integers times an fp32 scale), rounded once to fp32
    z = p.zeros.long().repeat_interleave(64, dim=1)
    s = p.scales.double().repeat_interleave(64, dim=1)
    assert torch.equal(dequantize_reference(p, torch.float32), ((q - z).double() * s).float())


def test_zero_is_exact_and_constant_groups_survive():
    w = torch.zeros(2, 128)
    w[0, :64] = 0.5
    w[1, 64:] = torch.linspace(-1, 1, 64)
    w[1, 70] = 0.0
    out = dequantize_reference(quantize_int4(w, 64), torch.float32)
    assert torch.equal(out[w == 0], torch.zeros(int((w == 0).sum())))
    assert torch.allclose(out[0, :64], torch.full((64,), 0.5))


def test_k_not_multiple_of_group_is_a_clear_error():
    with pytest.raises(ValueError, match=r"multiple of group_size=128, got shape \(4, 192\)"):
        fl.quantize(torch.randn(4, 192), scheme="int4", group_size=128)
    with pytest.raises(ValueError, match="group_size: expected one of"):
        quantize_int4(torch.randn(4, 96), 32)


def test_quantize_api_and_dequantize():
    w = torch.randn(5, 128, dtype=torch.bfloat16)
    qw = fl.quantize(w, scheme="int4", group_size=64)
    assert qw.scheme == "int4" and qw.dtype == torch.bfloat16 and tuple(qw.shape) == (5, 128)
    assert torch.equal(qw.dequantize(), dequantize_reference(qw.packed, torch.bfloat16))
    with pytest.raises(ValueError, match="scheme: expected one of"):
        fl.quantize(w, scheme="fp4")
