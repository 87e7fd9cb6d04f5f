"""NF4 against bitsandbytes on the CPU: quantized bytes, absmax (plain and double-quantized) and dequantized
values must be identical, bit for bit. bitsandbytes is imported only here and the tests skip without it."""

import pytest
import torch

from fusedlora.formats import NF4_CODE, dequantize_reference, dynamic_map, quantize_nf4
from fusedlora.formats.nf4 import quantize_absmax_8bit
from fusedlora.formats.nibbles import pack_nibbles, unpack_nibbles

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 59x97 and 7x37: odd N*K (a padded last byte, a partial last block, blocks crossing rows);
# 129x64: blocks of 128/256 spanning 2 and 4 rows.
SHAPES = ((59, 97), (7, 37), (129, 64))


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bitsandbytes' torch fallback is wrapped in torch.compile: minutes of compiling on 2 cores for nothing.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_dequantize(data, state, dtype):
    """bitsandbytes' own dequantize, on the flat view of the weight: its CPU kernel indexes absmax per row
    when K is a multiple of 16, which is wrong for blocks that cross rows; flat, rows and blocks agree."""
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    n = state.shape[0] * state.shape[1]
    shape = (1, n) if n % 2 == 0 else (n,)
    out = torch.ops.bitsandbytes.dequantize_4bit(data, absmax, state.blocksize, "nf4", shape, dtype)
    return out.reshape(state.shape)


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed like trained weights, so block maxima vary and the absmax codes spread out
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 2 * 0.05
    return w.to(dtype)


def test_code_tables_match_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (64, 128, 256))
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_match_bitsandbytes(shape, double_quant, blocksize, dtype):
    w = weight(shape, dtype)
    data, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    p = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert p.data.shape == data.shape and torch.equal(p.data, data)
    assert torch.equal(p.absmax, state.absmax)
    if double_quant:
        assert torch.equal(p.nested_absmax, state.state2.absmax)
        assert torch.equal(p.nested_code, state.state2.code)
        assert p.nested_offset == state.offset.item()
    ours = dequantize_reference(p, dtype)
    theirs = bnb_dequantize(data, state, dtype)
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, theirs)


def test_double_quant_codes_match_bitsandbytes_on_many_blocks():
    # 24 nested blocks of absmax values, including values next to the offset (the hardest to encode)
    w = weight((96, 1024), torch.float32, seed=1)
    data, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    p = quantize_nf4(w, 64, True)
    assert torch.equal(p.absmax, state.absmax) and torch.equal(p.nested_absmax, state.state2.absmax)
    x = torch.randn(256 * 40 + 77, generator=torch.Generator().manual_seed(2)) * torch.rand(256 * 40 + 77) ** 6
    q, state8 = bnbf.quantize_blockwise(x, blocksize=256)
    q2, absmax2 = quantize_absmax_8bit(x)
    assert torch.equal(q2, q.reshape(-1)) and torch.equal(absmax2, state8.absmax)


def test_ties_and_zero_blocks_match_bitsandbytes():
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    mids = (code[:-1] + code[1:]) / 2
    # a block of max 1.0 whose values sit exactly on the midpoints (a tie goes to the lower code),
    # then an all-zero block and a partial last block
    block = torch.cat([mids, -mids, torch.ones(1), torch.zeros(64 - 31)])
    w = torch.cat([block, torch.zeros(64), torch.full((6,), 0.3)]).reshape(2, 67)
    data, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    p = quantize_nf4(w, 64, False)
    assert torch.equal(p.data, data) and torch.equal(p.absmax, state.absmax)
    assert torch.equal(dequantize_reference(p, torch.float32), bnb_dequantize(data, state, torch.float32))


def test_dequantize_is_code_times_absmax_in_float64():
    w = weight((33, 50), torch.float32)
    p = quantize_nf4(w, 64, True)
    q = unpack_nibbles(p.data, 33 * 50).long()
    a = p.nested_code.double()[p.absmax.long()] * p.nested_absmax.double()[torch.arange(26) // 256]
    a = a.float().double() + p.nested_offset  # the stored absmax is an fp32 product, then an fp32 sum
    want = torch.tensor(NF4_CODE, dtype=torch.float64)[q] * a.float().double()[torch.arange(33 * 50) // 64]
    # one fp32 product rounded once: exactly float64's product rounded to fp32
    assert torch.equal(dequantize_reference(p, torch.float32).reshape(-1), want.float())
    assert torch.equal(dequantize_reference(p, torch.float64).reshape(-1), want.float().double())


def test_nibble_layout_first_element_high():
    q = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    assert pack_nibbles(q).tolist() == [0x12, 0x34, 0x50]
    assert torch.equal(unpack_nibbles(pack_nibbles(q), 5), q)
    with pytest.raises(ValueError, match="data: expected 2 bytes for 3 codes"):
        unpack_nibbles(torch.zeros(3, dtype=torch.uint8), 3)


def test_quantize_errors_name_the_argument():
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        quantize_nf4(torch.randn(4, 64), blocksize=32)
    with pytest.raises(ValueError, match=r"shape: expected a 2-D weight"):
        quantize_nf4(torch.randn(64), blocksize=64)
    with pytest.raises(TypeError, match="w: expected dtype"):
        quantize_nf4(torch.randint(0, 3, (4, 64)), blocksize=64)
