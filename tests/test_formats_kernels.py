"""The dequantize ops: Triton under the interpreter bit for bit against the reference, op registration
(opcheck, fake impls, torch.compile), and on a GPU the Triton and CUDA kernels in bf16/fp16/fp32."""

import dataclasses
import functools

import pytest
import torch

import fusedlora as fl
from fusedlora.formats import dequantize_reference, quantize_int4, quantize_nf4
from fusedlora.ops import dequantize, select
from fusedlora.ops.backend import triton_interpreted
from fusedlora.ops.dequant import quantize_nf4 as quantize_nf4_op

# sizes that leave partial programs (2048 elements each), odd N*K, blocks crossing rows
NF4_SHAPES = ((59, 97), (129, 64), (3, 5))

interpreter = pytest.mark.skipif(not triton_interpreted(), reason="needs TRITON_INTERPRET=1 (Triton on CPU)")


def weight(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype).to(device)


@interpreter
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("blocksize", (64, 256))
@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_triton_nf4_equals_reference_bitwise(shape, blocksize, double_quant, dtype, monkeypatch):
    p = quantize_nf4(weight(shape), blocksize, double_quant)
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    assert select("dequantize_nf4", torch.device("cpu"), dtype)[0] == "triton"
    out = dequantize(p, dtype)
    assert torch.equal(out, dequantize_reference(p, dtype))


@interpreter
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
@pytest.mark.parametrize("group_size", (64, 128))
def test_triton_int4_equals_reference_bitwise(group_size, dtype, monkeypatch):
    p = quantize_int4(weight((37, 384)), group_size)
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    assert torch.equal(dequantize(p, dtype), dequantize_reference(p, dtype))


def _same_packed(a, b):
    fields = ("data", "absmax", "nested_absmax", "nested_code")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields) and a.nested_offset == b.nested_offset


@interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("blocksize", (64, 256))
@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_triton_quantize_nf4_equals_reference_bytes(shape, blocksize, dtype, monkeypatch):
    w = weight(shape, dtype)
    w.view(-1)[:70] = 0  # an all-zero block: code 7 everywhere, absmax 0
    want = quantize_nf4(w, blocksize, True)
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    assert select("quantize_nf4", torch.device("cpu"), dtype)[0] == "triton"
    assert _same_packed(quantize_nf4_op(w, blocksize, True), want)


def test_cpu_default_is_reference_and_float64_works():
    p = quantize_nf4(weight((5, 64)), 64, True)
    assert select("dequantize_nf4", torch.device("cpu"), torch.float32)[0] == "reference"
    assert torch.equal(dequantize(p, torch.float64), dequantize_reference(p, torch.float64))


def test_op_checks_name_the_argument():
    p = quantize_nf4(weight((5, 64)), 64, True)
    with pytest.raises(TypeError, match="absmax: expected dtype uint8, got float32"):
        dequantize(dataclasses.replace(p, absmax=p.absmax.float()), torch.float32)
    with pytest.raises(ValueError, match="data: expected 160 bytes"):
        dequantize(dataclasses.replace(p, data=p.data[:-1]), torch.float32)
    with pytest.raises(TypeError, match="dtype: expected one of"):
        dequantize(p, torch.int8)


def test_custom_ops_pass_opcheck_and_compile():
    p = quantize_nf4(weight((7, 37)), 64, True)
    args = (p.data, p.absmax, p.nested_absmax, p.nested_code, p.nested_offset, 64, 7, 37, torch.float16)
    torch.library.opcheck(torch.ops.fusedlora.dequantize_nf4.default, args)
    q = quantize_int4(weight((4, 128)), 64)
    torch.library.opcheck(torch.ops.fusedlora.dequantize_int4.default, (q.data, q.scales, q.zeros, 64, torch.float32))
    torch.library.opcheck(torch.ops.fusedlora.quantize_nf4.default, (weight((7, 37)), 64))
    qw = fl.QuantizedWeight(p, torch.float32)
    compiled = torch.compile(lambda: qw.dequantize(torch.float16), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(), dequantize_reference(p, torch.float16))


@pytest.mark.skipif(not fl.extension_loaded(), reason="the CUDA extension fusedlora._C is not built")
def test_cuda_op_schema_and_fake_on_meta_tensors():
    p = quantize_nf4(weight((59, 97)), 64, True)
    meta = [t.to("meta") for t in (p.data, p.absmax, p.nested_absmax, p.nested_code)]
    args = (*meta, p.nested_offset, 64, 59, 97, torch.bfloat16)
    out = torch.ops.fusedlora.dequantize_nf4_cuda(*args)
    assert out.shape == (59, 97) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    torch.library.opcheck(torch.ops.fusedlora.dequantize_nf4_cuda.default, args)


# ---- GPU ------------------------------------------------------------------------------------------------

GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# 1024x4096: many programs / thread blocks; 59x97 and 1x31 take the scalar tail only
GPU_SHAPES = ((1024, 4096), (1000, 1030), (59, 97), (1, 31))


@functools.cache
def _gpu_case(shape, double_quant, dtype):
    """(CPU packed weight, its CUDA copy, the reference dequantization): shared by both families."""
    p = quantize_nf4(weight(shape), 64, double_quant)
    return p, fl.QuantizedWeight(p, dtype).to("cuda").packed, dequantize_reference(p, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ("triton", "cuda"))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_nf4_kernels_equal_reference(shape, double_quant, dtype, family, monkeypatch):
    if family == "cuda" and not fl.extension_loaded():
        pytest.fail("the CUDA extension is not loaded on a GPU machine")
    p, pc, want = _gpu_case(shape, double_quant, dtype)
    monkeypatch.setenv("FUSEDLORA_BACKEND", family)
    assert select("dequantize_nf4", torch.device("cuda"), dtype)[0] == family
    out = dequantize(pc, dtype)
    assert torch.equal(out.cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gpu_cuda_nf4_unaligned_input_and_blocksizes(dtype):
    if not fl.extension_loaded():
        pytest.fail("the CUDA extension is not loaded on a GPU machine")
    for blocksize in (128, 256):
        p = quantize_nf4(weight((300, 301)), blocksize, True)
        # a buffer starting 1 byte into an allocation: the kernel must take the scalar path
        buf = torch.empty(p.data.numel() + 1, dtype=torch.uint8, device="cuda")
        buf[1:] = p.data.reshape(-1).cuda()
        out = torch.ops.fusedlora.dequantize_nf4_cuda(
            buf[1:], p.absmax.cuda(), p.nested_absmax.cuda(), p.nested_code.cuda(), p.nested_offset,
            blocksize, 300, 301, dtype)
        assert torch.equal(out.cpu(), dequantize_reference(p, dtype))


@pytest.mark.gpu
def test_gpu_cuda_op_checks_name_the_tensor():
    if not fl.extension_loaded():
        pytest.fail("the CUDA extension is not loaded on a GPU machine")
    p = quantize_nf4(weight((8, 64)), 64, False)
    with pytest.raises(ValueError, match="data: expected a CUDA tensor"):
        torch.ops.fusedlora.dequantize_nf4_cuda(p.data, p.absmax, None, None, 0.0, 64, 8, 64, torch.float16)
    with pytest.raises(ValueError, match="absmax: expected 8 elements"):
        torch.ops.fusedlora.dequantize_nf4_cuda(p.data.cuda(), p.absmax[:-1].cuda(), None, None, 0.0, 64, 8, 64,
                                                torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_triton_int4_equals_reference(dtype):
    p = quantize_int4(weight((515, 1024)), 128)
    pc = fl.QuantizedWeight(p, dtype).to("cuda").packed
    assert torch.equal(dequantize(pc, dtype).cpu(), dequantize_reference(p, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", ((1024, 4096), (59, 97)))
def test_gpu_triton_quantize_nf4_equals_reference(shape, dtype):
    w = weight(shape, dtype)
    want = quantize_nf4(w, 64, False)  # on the CPU: the bytes bitsandbytes writes there
    got = quantize_nf4_op(w.cuda(), 64, False)
    assert torch.equal(got.data.cpu(), want.data) and torch.equal(got.absmax.cpu(), want.absmax)
