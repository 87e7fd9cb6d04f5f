"""The hand-written CUDA decode kernels (4-bit GEMV + LoRA, M <= 16; tensor cores, 16 rows per block up to
M = 16, 128 rows per block up to 64) against the reference, on a GPU, and the dispatch rule that picks
them."""

import pytest
import torch

import fusedlora as fl
from fusedlora.formats import dequantize_reference


def _poison_allocator():
    # The kernel's output comes from torch's caching allocator: fill a freed block with NaN first so an
    # element the kernel fails to write shows up as NaN instead of a lucky zero.
    torch.full((64 << 20,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def _ulp(w, dtype):
    """One ulp of ``dtype`` at |w| (float64): 2^floor(log2|w|) x eps, the subnormal spacing below the
    normal range."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(w.abs().clamp(min=info.tiny)))) * info.eps


def _decode_bound(x, wd, A, B, scale, bias, dtype):
    """Per-element bound on |y - exact| from DESIGN.md's rule for the fast paths: each weight element within
    one ulp of ``dtype`` of its exact value (the kernels hold the NF4 table in ``dtype`` and scale fp32
    partial sums), fp32 accumulation of K + r + 2 terms in any order (doubled: the rounded xa and the
    per-step scaling), one rounding into ``dtype``."""
    xd, bd = x.double(), (bias.double() if bias is not None else 0.0)
    magnitude = xd.abs() @ wd.abs().T + scale * (xd.abs() @ A.double().abs().T) @ B.double().abs().T
    if bias is not None:
        magnitude = magnitude + bd.abs()
    exact = xd @ wd.T + scale * (xd @ A.double().T) @ B.double().T + bd
    unit_roundoff = torch.finfo(dtype).eps / 2
    k, r = x.shape[1], A.shape[0]
    tol = (unit_roundoff * exact.abs() + xd.abs() @ _ulp(wd, dtype).T + 2 * (k + r + 2) * 2.0**-24 * magnitude
           + 2.0**-24)
    return exact, tol


@pytest.mark.skipif(not fl.extension_loaded(), reason="the CUDA extension fusedlora._C is not built")
@pytest.mark.parametrize("dq", [False, True])
def test_decode_op_schema_and_fake_on_meta_tensors(dq):
    from fusedlora.formats import nf4_code

    m, k, n, r = 3, 256, 97, 8
    p = fl.quantize(torch.randn(n, k), scheme="nf4", blocksize=64, double_quant=dq).packed
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    args = (meta(torch.randn(m, k, dtype=torch.bfloat16)), meta(p.data), None if dq else meta(p.absmax),
            meta(p.absmax) if dq else None, meta(p.nested_absmax), meta(p.nested_code), p.nested_offset,
            meta(nf4_code()), None, None, 0, 64, n, k, meta(torch.randn(r, k, dtype=torch.bfloat16)),
            meta(torch.randn(n, r, dtype=torch.bfloat16)), None, 2.0, 3)
    out = torch.ops.fusedlora.decode_lora_cuda(*args)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    torch.library.opcheck(torch.ops.fusedlora.decode_lora_cuda.default, args)


# K = 96 (a multiple of 32, not of 64) always takes the GEMV, so it serves M <= 16 only; INT4 groups (64, 128)
# must divide K, so INT4 leaves out K = 96 (the device check lets no test skip).
DECODE_SHAPES = [
    (quant, k, n)
    for quant in ("nf4", "nf4-dq", "int4")
    for k, n in ((4096, 4096), (384, 97), (1024, 1029), (320, 33), (96, 50))
    if not (quant == "int4" and k % 64)
]


def _decode_lora_cpu(seen: dict):
    """A CPU implementation of fusedlora::decode_lora_cuda for tests without a GPU: it takes its arguments by
    the schema's names (recording some in ``seen``), rebuilds the weight from them and computes the op in
    float64."""
    from fusedlora.formats import Packed4bit

    def decode_lora_cpu(x, w, absmax, absmax_q, nested_absmax, nested_code, nested_offset, code, scales, zeros,
                        scheme, block, n, k, lora_A, lora_B, bias, scale, mma_min_m, tickets=None, splits=1,
                        wide_min_m=17):  # torch leaves out trailing arguments equal to their defaults
        seen.update(scheme=scheme, mma_min_m=mma_min_m, code=code, tickets=tickets, splits=splits,
                    wide_min_m=wide_min_m, calls=seen.get("calls", 0) + 1)
        # the binding's contracts: fp32 absmax or uint8 absmax_q (+ nested), uint8 codes, fp32 scales
        assert w.dtype == torch.uint8 and x.shape == (x.shape[0], k)
        if scheme == 0:
            assert (absmax is None) != (absmax_q is None)
            assert absmax is None or absmax.dtype == torch.float32
            assert absmax_q is None or (absmax_q.dtype == torch.uint8 and nested_absmax is not None)
            packed = Packed4bit("nf4", w, (n, k), block, absmax if absmax is not None else absmax_q,
                                nested_absmax if absmax_q is not None else None,
                                nested_code if absmax_q is not None else None, nested_offset)
        else:
            assert scales.dtype == torch.float32 and zeros.dtype == torch.uint8
            packed = Packed4bit("int4", w, (n, k), block, scales=scales, zeros=zeros)
        wd = dequantize_reference(packed, torch.float64)
        y = x.double() @ wd.T + scale * (x.double() @ lora_A.double().T) @ lora_B.double().T
        if bias is not None:
            y = y + bias.double()
        return y.to(x.dtype)

    return decode_lora_cpu


@pytest.mark.skipif(not fl.extension_loaded(), reason="the CUDA extension fusedlora._C is not built")
def test_decode_dispatch_compiles_fullgraph(use_backend, monkeypatch):
    """Under torch.compile the decode call is one op (fusedlora::decode_lora) whose body takes the pointer
    checks when it runs, which a traced graph cannot: fullgraph compiles, gives the eager result (the CPU
    stand-in of the kernel above), and codes that start off a 16-byte boundary take the Triton path inside
    it, eagerly and compiled alike."""
    from dataclasses import replace

    from fusedlora.ops import decode

    use_backend("triton")  # (the Triton path below runs under the interpreter without a GPU)
    seen, triton_calls = {}, []
    real_triton = decode._triton
    monkeypatch.setattr(decode, "_triton", lambda *a, **kw: triton_calls.append(1) or real_triton(*a, **kw))
    torch.manual_seed(12)
    k, n, r = 256, 40, 8
    packed = fl.quantize(torch.randn(n, k), scheme="nf4", blocksize=64, double_quant=True).packed
    x = torch.randn(3, k, dtype=torch.float16)
    A = torch.randn(r, k, dtype=torch.float16) / 16
    B = torch.randn(n, r, dtype=torch.float16)
    bias = torch.randn(n, dtype=torch.float16)
    wd = dequantize_reference(packed, torch.float64)
    exact = x.double() @ wd.T + 1.5 * (x.double() @ A.double().T) @ B.double().T + bias.double()
    shifted = torch.empty(packed.data.numel() + 1, dtype=torch.uint8)[1:].view(-1, 1)
    shifted.copy_(packed.data)
    assert shifted.data_ptr() % 16 and packed.data.data_ptr() % 16 == 0
    lib = torch.library.Library("fusedlora", "IMPL")
    try:
        lib.impl("decode_lora_cuda", _decode_lora_cpu(seen), "CPU")
        for weight, kernel in ((packed, True), (replace(packed, data=shifted), False)):
            def layer(x, A, B, bias, weight=weight):
                return decode.lora_linear_cuda(x, weight, A, B, 1.5, bias, 0.0, False, None)

            torch._dynamo.reset()
            seen.clear()
            triton_calls.clear()
            with torch.no_grad():
                eager = layer(x, A, B, bias)
                compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, A, B, bias)
            assert (seen.get("calls", 0), len(triton_calls)) == ((2, 0) if kernel else (0, 2))
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
            # the stand-in rounds the float64 result once; the Triton path in fp16, within 2^-9 of the scale
            assert (eager.double() - exact).abs().max() <= 2.0**-9 * exact.abs().max()
            w = weight
            torch.library.opcheck(torch.ops.fusedlora.decode_lora.default,
                                  (x, w.data, w.absmax, w.nested_absmax, w.nested_code, w.nested_offset, w.scales,
                                   w.zeros, w.scheme, w.block, n, k, A, B, bias, 1.5))
    finally:
        lib._destroy()


@pytest.mark.skipif(not fl.extension_loaded(), reason="the CUDA extension fusedlora._C is not built")
@pytest.mark.parametrize("quant,m", [("nf4", 3), ("nf4-dq", 3), ("int4", 3), ("nf4-dq", 20)])
def test_decode_glue_passes_each_argument_where_the_schema_names_it(quant, m):
    # No GPU needed: a CPU implementation of fusedlora::decode_lora_cuda, registered for this test only,
    # takes its arguments by the schema's names, rebuilds the weight from them and computes the op in
    # float64. The op's Python side (decode_lora_linear) calling it on CPU tensors must then give the
    # reference result: an argument in the wrong slot breaks the rebuild or the numbers.
    from fusedlora.formats import nf4_code
    from fusedlora.ops import decode

    seen = {}
    lib = torch.library.Library("fusedlora", "IMPL")
    try:
        lib.impl("decode_lora_cuda", _decode_lora_cpu(seen), "CPU")
        torch.manual_seed(11)
        k, n, r = (256 if m < 17 else 1024), 40, 8
        w = torch.randn(n, k)
        qw = (fl.quantize(w, scheme="int4", group_size=64) if quant == "int4"
              else fl.quantize(w, scheme="nf4", blocksize=64, double_quant=quant == "nf4-dq"))
        x = torch.randn(m, k, dtype=torch.bfloat16)
        A = torch.randn(r, k, dtype=torch.bfloat16) / 16
        B = torch.randn(n, r, dtype=torch.bfloat16)
        bias = torch.randn(n, dtype=torch.bfloat16)
        y = decode.decode_lora_linear(x, qw.packed, A, B, 1.5, bias)
    finally:
        lib._destroy()
    assert seen["scheme"] == (1 if quant == "int4" else 0) and seen["mma_min_m"] == decode.DECODE_MMA_MIN_M
    # the 128-row kernel (M >= 17 here) splits K over 4 blocks (4 "SMs" for CPU tensors, one 128-row block,
    # 16 steps of 64 codes), with its zeroed counters; fewer tokens run the 16-row kernel, unsplit
    assert seen["wide_min_m"] == decode.wide_min_m(k, n) == 17
    assert seen["splits"] == (4 if m >= 17 else 1)
    assert (seen["tickets"] is None) == (m < 17)
    if m >= 17:
        assert seen["tickets"].dtype == torch.int32 and seen["tickets"].numel() >= 1 and not seen["tickets"].any()
    assert (seen["code"] is None) == (quant == "int4")
    if seen["code"] is not None:
        assert torch.equal(seen["code"], nf4_code(torch.device("cpu")))
    wd = dequantize_reference(qw.packed, torch.float64)
    exact = (x.double() @ wd.T + 1.5 * (x.double() @ A.double().T) @ B.double().T + bias.double()).to(y.dtype)
    torch.testing.assert_close(y, exact, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant,k,n", DECODE_SHAPES)
@pytest.mark.parametrize("m,mma_min_m,wide_from", [
    (1, 1, 17), (2, 1, 17), (3, 1, 17), (8, 1, 17), (16, 1, 17), (17, 1, 17), (31, 1, 17), (33, 1, 17), (48, 1, 17),
    (64, 1, 17), (9, 1, 9), (16, 1, 9), (1, 17, 17), (3, 17, 17), (16, 17, 17)])
def test_decode_matches_reference(dtype, quant, m, mma_min_m, wide_from, k, n, monkeypatch):
    # mma_min_m 1: the tensor-core kernels for every M (K a multiple of 64; K = 96 takes the GEMV): 16 rows
    # per block with 1 or 2 token tiles, 128 rows per block (its K split over blocks where N is small) from
    # wide_from on, with 2, 4 or 8; mma_min_m 17: the CUDA-core GEMV for every M.
    from fusedlora.kernels import split_sum
    from fusedlora.ops import decode

    if m > decode.DECODE_GEMV_MAX_M and k % decode.MMA_STEP:
        return  # the GEMV is not built for this M: test_decode_serves_m_up_to_the_cutover checks the dispatch
    monkeypatch.setattr(decode, "DECODE_MMA_MIN_M", mma_min_m)
    monkeypatch.setattr(decode, "wide_min_m", lambda k, n: wide_from)
    monkeypatch.setattr(decode, "X_REREAD_BUDGET", 1 << 62)  # every M the kernel serves
    torch.manual_seed(m * 1000 + n)
    r = 16
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    if quant == "int4":
        qw = fl.quantize(w, scheme="int4", group_size=128 if k % 128 == 0 else 64)
    else:
        qw = fl.quantize(w, scheme="nf4", blocksize=64, double_quant=quant == "nf4-dq")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    A = torch.randn(r, k, device="cuda", dtype=dtype) * k**-0.5
    B = torch.randn(n, r, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    _poison_allocator()
    with torch.no_grad():
        y = fl.lora_linear(x, qw, A, B, 1.5, bias)
    assert fl.backend() == "cuda"
    assert torch.isfinite(y).all()
    wd = dequantize_reference(qw.packed, torch.float64)
    exact, tol = _decode_bound(x, wd, A, B, 1.5, bias, dtype)
    err = (y.double() - exact).abs()
    assert (err <= tol).all(), f"worst error {(err / tol).max().item():.3g} of the bound"
    assert not split_sum.tickets(x.device, 1).any()  # the K split's counters are back at 0


@pytest.mark.gpu
def test_decode_is_the_path_taken_and_training_is_not():
    from fusedlora.ops.decode import decode_applies

    k, n = 256, 64
    qw = fl.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), scheme="nf4")
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(8, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(n, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        assert decode_applies(x, qw.packed, A, B, None, 0.0, False)
        assert not decode_applies(x, qw.packed, A, B, None, 0.1, True)  # dropout: training path
        assert not decode_applies(torch.randn(65, k, device="cuda", dtype=torch.bfloat16), qw.packed, A, B, None,
                                  0.0, False)
    assert not decode_applies(x, qw.packed, A, B, None, 0.0, False)  # grads needed: Triton forward/backward


@pytest.mark.gpu
def test_decode_takes_misaligned_views():
    # x and A starting one element past a 16-byte boundary are copied to aligned buffers, so the result is
    # the aligned inputs' result bit for bit.
    k, n, m, r = 256, 64, 2, 8
    qw = fl.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), scheme="nf4")
    x_buf = torch.randn(m * k + 1, device="cuda", dtype=torch.bfloat16)
    a_buf = torch.randn(r * k + 1, device="cuda", dtype=torch.bfloat16)
    x, A = x_buf[1:].view(m, k), a_buf[1:].view(r, k)
    assert x.data_ptr() % 16 and A.data_ptr() % 16
    B = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = fl.lora_linear(x, qw, A, B, 2.0)
        y_aligned = fl.lora_linear(x.clone(), qw, A.clone(), B, 2.0)
    torch.testing.assert_close(y, y_aligned, rtol=0, atol=0)


def test_kernel_limit_matches_the_cuda_source():
    """ops.decode's copy of the kernel's largest M is csrc's, and the dispatcher stays within it."""
    import re
    from pathlib import Path

    from fusedlora.ops import decode

    header = (Path(__file__).resolve().parents[1] / "csrc" / "decode_lora.h").read_text()
    assert int(re.search(r"kDecodeMaxM = (\d+);", header).group(1)) == decode.DECODE_KERNEL_MAX_M
    assert int(re.search(r"kDecodeWideRows = (\d+);", header).group(1)) == decode.WIDE_ROWS
    # the rule's cut-overs on the Llama-3-8B projections (ops.decode derives them) and its bounds: the
    # 128-row kernel keeps x's re-reads within the budget up to the kernel's largest M, and takes over from
    # the 16-row one where that one's would pass it
    llama = ((4096, 4096), (4096, 14336), (14336, 4096))
    assert [decode.decode_max_m(k, n) for k, n in llama] == [64, 64, 64]
    assert [decode.wide_min_m(k, n) for k, n in llama] == [17, 10, 10]
    for k, n in llama:
        assert decode.rows_reread_bytes(decode.wide_min_m(k, n) - 1, k, n, 16) <= decode.X_REREAD_BUDGET
        assert decode.x_reread_bytes(64, k, n) <= decode.X_REREAD_BUDGET < decode.rows_reread_bytes(64, k, n, 16)
    # at most one block per SM (no second wave), at least 4 steps of 64 codes per split
    assert [decode.wide_splits(n, k, 132) for k, n in llama] == [4, 1, 4]
    assert decode.wide_splits(4096 * 8, 4096, 132) == 1  # more row blocks than SMs
    assert decode.wide_splits(4096, 256, 132) == 1
    assert decode.decode_max_m(256, 33) == decode.DECODE_KERNEL_MAX_M
    assert decode.decode_max_m(256, 33, tensor_cores=False) == decode.DECODE_GEMV_MAX_M


@pytest.mark.parametrize("k,block", [(256, 64), (4096, 128), (320, 64), (96, 64)])
def test_decode_serves_m_up_to_the_cutover(k, block):
    # No GPU needed: the rule of ops.decode. The tensor-core kernel (K and block multiples of 64; every NF4
    # block size is) serves M up to decode_max_m, the GEMV (K = 96) up to DECODE_GEMV_MAX_M; past them the
    # Triton path runs.
    from fusedlora.ops import decode

    qw = fl.quantize(torch.randn(33, k), scheme="nf4", blocksize=block)
    A, B = torch.randn(8, k, dtype=torch.bfloat16), torch.randn(33, 8, dtype=torch.bfloat16)
    tensor_cores = k % 64 == 0 and block % 64 == 0
    last = decode.decode_max_m(k, 33, tensor_cores)
    with torch.no_grad():
        for m in (1, 16, 17, last, last + 1):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            assert decode.decode_applies(x, qw.packed, A, B, None, 0.0, False) == (m <= last), m
