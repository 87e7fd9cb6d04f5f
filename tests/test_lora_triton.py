"""The fused Triton LoRA kernels (forward, dX, dA, dB, dbias) against the reference op.

On CPU they run under TRITON_INTERPRET=1 with FUSEDLORA_BACKEND=triton (fp16 and fp32: the interpreter has
no bf16 dot); the ``gpu`` tests add bf16 and sizes whose offsets cross 2^31.

Tolerance rule (flash-attention's): for every output and gradient, the kernel's max error against the
float64 oracle (the reference op run in fp64 on the same, exactly decoded weight) is at most twice the
error of plain torch doing the same math in the input dtype, plus a floor of one ulp of the dtype at the
result's scale (guards the rare case where torch's own error happens to be near zero). The kernels
accumulate in fp32 like torch does, but round different intermediates (the decoded weight, and s·xa
unless the dtype is fp16, go to the input dtype before the tensor-core dots, and the sums run in a
different order), so bit equality is not expected; a wrong mask, index or scale shows up as errors
orders of magnitude above the bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedlora.formats.packed import Packed4bit
from fusedlora.ops.lora import lora_linear_reference

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


@pytest.fixture(autouse=True)
def _triton_backend(triton_backend):
    pass


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------------
# 4-bit weights built by hand from the layouts (common to every kernel), decoded exactly in float64

def _pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes, flat -> bytes with the first element of each pair in the HIGH nibble."""
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return (q[0::2] << 4) | q[1::2]


def nf4_weight(n, k, block=64, double_quant=False, device="cpu"):
    """(Packed4bit, W float64) with random codes and random scales (never a trivial all-equal pattern)."""
    numel = n * k
    nb = -(-numel // block)
    q = torch.randint(0, 16, (numel,))
    data = _pack(q).reshape(-1, 1)
    if double_quant:
        qa = torch.randint(0, 256, (nb,), dtype=torch.uint8)
        code = torch.sort(torch.rand(256) * 2 - 1).values
        nested = torch.rand(-(-nb // 256)) * 0.02 + 0.01
        offset = 0.03
        absmax = (code[qa.long()] * nested.repeat_interleave(256)[:nb] + offset).double()
        packed = Packed4bit("nf4", data.to(device), (n, k), block, absmax=qa.to(device),
                            nested_absmax=nested.to(device), nested_code=code.to(device), nested_offset=offset)
    else:
        absmax32 = torch.rand(nb) * 0.05 + 0.01
        absmax = absmax32.double()
        packed = Packed4bit("nf4", data.to(device), (n, k), block, absmax=absmax32.to(device))
    w = NF4_CODE.double()[q] * absmax.repeat_interleave(block)[:numel]
    return packed, w.reshape(n, k)


def int4_weight(n, k, group=64, device="cpu"):
    q = torch.randint(0, 16, (n, k))
    scales = torch.rand(n, k // group) * 0.01 + 0.002
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8)
    data = _pack(q).reshape(n, k // 2)
    packed = Packed4bit("int4", data.to(device), (n, k), group, scales=scales.to(device), zeros=zeros.to(device))
    w = (q.double() - zeros.double().repeat_interleave(group, 1)) * scales.double().repeat_interleave(group, 1)
    return packed, w


def make_weight(kind, n, k, dtype, device="cpu"):
    """(weight the op takes, W float64, W in the dtype torch's plain path would use)."""
    if kind == "dense":
        w = (torch.randn(n, k) / k**0.5).to(dtype).to(device)
        return w, w.double(), w
    if kind == "int4":
        packed, w64 = int4_weight(n, k, device=device)
    else:
        packed, w64 = nf4_weight(n, k, double_quant=kind == "nf4-dq", device=device)
    w64 = w64.to(device)
    return packed, w64, w64.float().to(dtype)


# ------------------------------------------------------------------------------------------------------
# helpers

def lora_inputs(m, k, n, r, dtype, bias=True, lead=(), device="cpu"):
    x = torch.randn(*lead, m, k, dtype=dtype, device=device)
    a = (torch.randn(r, k) / k**0.5).to(dtype).to(device)
    b = torch.randn(n, r, dtype=dtype, device=device)  # random: a zero B (PEFT's init) hides the LoRA term
    bias_t = torch.randn(n, dtype=dtype, device=device) if bias else None
    return x, a, b, bias_t


def run(fn, x, a, b, bias, dy):
    """(y, dx, dA, dB, dbias) of fn(x, a, b, bias) with upstream gradient dy."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, a, b, bias)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def poison_new_tensors(monkeypatch):
    """Every float tensor torch.empty makes from now on starts as NaN, so an element a kernel leaves
    unwritten shows in the result."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def no_ticket_left(device="cpu") -> bool:
    """Whether every ``split_sum`` counter of the device is back at 0 (each launch resets what it took)."""
    from fusedlora.kernels import split_sum

    counters = split_sum._TICKETS.get((torch.device(device), 0))
    return counters is None or not counters.any()


def plain(w, scale, p=0.0, mask=None):
    """torch doing the same math in the inputs' dtype (the error yardstick)."""

    def fn(x, a, b, bias):
        xd = x if mask is None else x * mask.to(x.dtype) / (1 - p)
        return F.linear(x, w, bias) + scale * F.linear(F.linear(xd, a), b)

    return fn


def oracle(w64, scale, p=0.0, mask=None):
    def fn(x, a, b, bias):
        return lora_linear_reference(x.double(), w64, a.double(), b.double(), scale,
                                     None if bias is None else bias.double(), p, mask is not None, mask)

    return fn


def assert_within(ours, ref64, lowp, what, dtype):
    floor = torch.finfo(dtype).eps * ref64.abs().max().item()
    err = (ours.double() - ref64).abs().max().item()
    bound = 2 * (lowp.double() - ref64).abs().max().item() + floor
    assert err <= bound, f"{what}: max error {err:.3e} above the bound {bound:.3e}"


def check_all(ours, ref64, lowp, dtype):
    for name, o, r, lp in zip(("y", "dx", "dA", "dB", "dbias"), ours, ref64, lowp, strict=True):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name}: non-finite values (an unwritten or poisoned element)"
        assert_within(o, r, lp, name, dtype)


def triton_fn(weight, scale, p=0.0, training=False):
    import fusedlora as fl

    return lambda x, a, b, bias: fl.lora_linear(x, weight, a, b, scale, bias, p, training)


# ------------------------------------------------------------------------------------------------------
# forward and gradients, every weight format

SHAPES = [
    # (M, K, N, r, bias): several 32-wide tiles with ragged edges; M = 1; odd K (NF4 rows start mid-byte,
    # blocks cross rows: the per-element scale path); r not a power of two
    (37, 192, 97, 4, True),
    (1, 64, 48, 16, False),
    (21, 59, 33, 5, True),
]


# (weight kind, training path): a 4-bit weight runs both paths (decoded in the GEMM's loop, or decoded into
# the scratch buffer and read as a dense weight), whatever M the rule of ops.paths would pick
KIND_PATHS = [("dense", None)] + [(kind, path) for kind in ("nf4", "nf4-dq", "int4")
                                  for path in ("inloop", "dequant")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind,path", KIND_PATHS)
@pytest.mark.parametrize("m,k,n,r,bias", SHAPES)
def test_matches_reference(dtype, kind, path, m, k, n, r, bias):
    from fusedlora.ops.paths import forced_path

    if kind == "int4" and k % 64:
        pytest.skip("INT4 needs K to be a multiple of the group size")
    torch.manual_seed(m * 1000 + k + n)
    weight, w64, wlow = make_weight(kind, n, k, dtype)
    x, a, b, bias_t = lora_inputs(m, k, n, r, dtype, bias)
    dy = torch.randn(m, n, dtype=dtype)
    scale = 1.75
    with forced_path(path):
        ours = run(triton_fn(weight, scale), x, a, b, bias_t, dy)
    check_all(ours, run(oracle(w64, scale), x, a, b, bias_t, dy), run(plain(wlow, scale), x, a, b, bias_t, dy),
              dtype)


def test_fused_xa_rule(monkeypatch):
    # the forward makes xa itself without dropout up to 64 tokens at any N, up to 128 where 64-row tiles over
    # N fit in one wave, never for ranks above one slice or unaligned weights; its configs leave out the
    # 128 x 128 and 256 x 128 tiles (which spill with xa's accumulator), the plain forward's keep them
    from fusedlora.kernels import lora_fwd

    r, sms = 16, 132
    assert lora_fwd.fuses_xa(64, 14336, r, 0.0, True, sms) and not lora_fwd.fuses_xa(65, 14336, r, 0.0, True, sms)
    assert lora_fwd.fuses_xa(128, 4096, r, 0.0, True, sms) and not lora_fwd.fuses_xa(129, 4096, r, 0.0, True, sms)
    assert lora_fwd.fuses_xa(100, 64 * sms, r, 0.0, True, sms) and not lora_fwd.fuses_xa(100, 64 * sms + 1, r, 0.0,
                                                                                        True, sms)
    assert not lora_fwd.fuses_xa(9, 4096, lora_fwd.RANK_SLICE + 1, 0.0, True, sms)
    assert not lora_fwd.fuses_xa(9, 4096, r, 0.0, False, sms) and not lora_fwd.fuses_xa(9, 4096, r, 0.0, True, sms,
                                                                                       hopper=False)
    monkeypatch.setattr(lora_fwd, "interpreted", lambda: False)
    tiles = lambda **kw: {(c["BLOCK_M"], c["BLOCK_N"]) for c in lora_fwd.gemm_configs("fwd", False, **kw)}  # noqa: E731
    assert tiles(fused_xa=True) == tiles() - {(128, 128), (256, 128)} and {(128, 128), (256, 128)} <= tiles()


@pytest.mark.parametrize("kind", ["nf4-dq", "int4"])
@pytest.mark.parametrize("m,sms", [(9, 64), (40, 1), (128, 64)])
def test_forward_makes_xa_at_few_tokens(monkeypatch, kind, m, sms):
    # up to FUSED_XA_MAX_M tokens without dropout the 4-bit forward makes xa = x·Aᵀ in its own K loop (no
    # pre-kernel launched), each K slice adding the LoRA term of its own share; y, the xa it keeps for the
    # backward (through dA and dB) and dx equal the reference, all buffers NaN-poisoned when allocated.
    # sms = 64: a GPU-sized machine, so K is sliced; 1: one slice
    from fusedlora.kernels import lora_fwd
    from fusedlora.ops.paths import forced_path

    def refuse(*_a, **_k):
        raise AssertionError("the low-rank pre-kernel was launched")

    monkeypatch.setitem(lora_fwd._SMS, torch.device("cpu"), sms)
    k, n, r = 512, 96, 16
    assert lora_fwd.fuses_xa(m, n, r, 0.0, True, sms) and not lora_fwd.fuses_xa(m, n, r, 0.1, True, sms)
    assert not lora_fwd.fuses_xa(lora_fwd.FUSED_XA_MAX_M + 1, n, r, 0.0, True, sms)
    assert (lora_fwd.reduction_splits(m, n, k, sms) > 1) == (sms == 64)
    torch.manual_seed(m + sms)
    weight, w64, wlow = make_weight(kind, n, k, torch.float32)
    x, a, b, bias = lora_inputs(m, k, n, r, torch.float32)
    dy = torch.randn(m, n)
    monkeypatch.setattr(lora_fwd, "_lowrank_kernel", refuse)
    poison_new_tensors(monkeypatch)
    with forced_path("inloop"):
        ours = run(triton_fn(weight, 0.75), x, a, b, bias, dy)
    check_all(ours, run(oracle(w64, 0.75), x, a, b, bias, dy), run(plain(wlow, 0.75), x, a, b, bias, dy),
              torch.float32)
    assert no_ticket_left()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind,path", [("dense", None), ("nf4-dq", "inloop"), ("int4", "dequant")])
@pytest.mark.parametrize("added", [False, True])
def test_base_product_at_rank_zero(monkeypatch, dtype, kind, path, added):
    """``base_linear``: the fused GEMMs with no low-rank term give x·Wᵀ and dX (within the file's rule), with
    no low-rank pre-kernel and no g pass launched, on NaN-poisoned outputs; ``added``: a residual [M, N]
    (row stride wider than N) and a bias added in the forward's epilogue, their gradients dY and its column
    sums."""
    from fusedlora.kernels import lora_bwd, lora_fwd
    from fusedlora.ops.lora_triton import base_linear
    from fusedlora.ops.paths import forced_path

    def refuse(*_a, **_k):
        raise AssertionError("a low-rank kernel was launched at rank 0")

    monkeypatch.setattr(lora_fwd, "_lowrank_kernel", refuse)
    monkeypatch.setattr(lora_bwd, "_g_db_kernel", refuse)
    m, k, n = 37, 192, 97
    torch.manual_seed(7 + added)
    weight, w64, wlow = make_weight(kind, n, k, dtype)
    x = torch.randn(2, m, k, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, m, n, dtype=dtype)
    res = torch.randn(2, m, n + 3, dtype=dtype)[..., :n].requires_grad_(True) if added else None
    bias = torch.randn(n, dtype=dtype, requires_grad=True) if added else None
    poison_new_tensors(monkeypatch)
    with forced_path(path):
        y = base_linear(x, weight, residual=res, bias=bias)
        grads = torch.autograd.grad(y, [t for t in (x, res, bias) if t is not None], dy)
    x64 = x.detach().double().requires_grad_(True)
    extra64 = 0.0 if not added else res.detach().double() + bias.detach().double()
    y64 = F.linear(x64, w64) + extra64
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    xl = x.detach().clone().requires_grad_(True)
    yl = F.linear(xl, wlow) + (0.0 if not added else res.detach() + bias.detach())
    (dxl,) = torch.autograd.grad(yl, xl, dy)
    for name, o, r, lp in (("y", y, y64, yl), ("dx", grads[0], dx64, dxl)):
        assert o.dtype == dtype and torch.isfinite(o).all(), name
        assert_within(o, r, lp, name, dtype)
    if added:
        assert torch.equal(grads[1], dy)
        db64 = dy.double().sum((0, 1))
        assert_within(grads[2], db64, dy.sum((0, 1)), "dbias", dtype)


@pytest.mark.parametrize("kind", ["nf4-dq", "int4"])
def test_residual_added_once_across_k_slices(monkeypatch, kind):
    """At few tokens the 4-bit forward slices K over programs (``split_sum``); the residual is added by one
    slice only, so y = x·Wᵀ + residual exactly once, and the tickets end at 0."""
    from fusedlora.kernels import lora_fwd
    from fusedlora.ops.lora_triton import base_linear
    from fusedlora.ops.paths import forced_path

    monkeypatch.setitem(lora_fwd._SMS, torch.device("cpu"), 64)
    m, k, n = 9, 512, 96
    assert lora_fwd.reduction_splits(m, n, k, 64) > 1
    torch.manual_seed(11)
    weight, w64, wlow = make_weight(kind, n, k, torch.float32)
    x, res = torch.randn(m, k), torch.randn(m, n) * 4
    poison_new_tensors(monkeypatch)
    with forced_path("inloop"):
        y = base_linear(x, weight, residual=res)
    assert_within(y, F.linear(x.double(), w64) + res.double(), F.linear(x, wlow) + res, "y", torch.float32)
    assert no_ticket_left()


@pytest.mark.parametrize("kind,path,m", [("dense", None, 37), ("nf4-dq", "inloop", 37), ("int4", "dequant", 37),
                                          ("nf4-dq", "inloop", 9)])
def test_rank_zero_dx_blends_in_the_dropped_inputs_gradient(monkeypatch, kind, path, m):
    """x went in as drop(x) and as c = x − drop(x): the rank-0 dX GEMM of c's product, given drop(x)'s
    gradient and the keep bits, returns x's: dc + m·(dxd − dc)/(1 − p), dc = dY·W (on NaN-poisoned outputs;
    at 9 tokens on the 4-bit path K is split over programs, each slice scaling its share, one adding dxd's)."""
    from fusedlora.kernels import lora_fwd
    from fusedlora.kernels.dora import drop_split
    from fusedlora.kernels.dropout import dropout_mask
    from fusedlora.ops.lora_triton import weight_args
    from fusedlora.ops.paths import forced_path

    monkeypatch.setitem(lora_fwd._SMS, torch.device("cpu"), 64)
    k, n, p = 192, 512, 0.3
    if m == 9:
        assert lora_fwd.reduction_splits(m, k, n, 64) > 1
    torch.manual_seed(5 + m)
    weight, w64, wlow = make_weight(kind, n, k, torch.float32)
    dy, dxd = torch.randn(m, n), torch.randn(m, k) * 3
    seed = torch.tensor([1234])
    _, _, bits = drop_split(torch.randn(m, k), seed, p)
    kept = dropout_mask(seed, (m, k), p, "cpu")
    w = weight_args(weight)
    poison_new_tensors(monkeypatch)
    with forced_path(path):
        dx, _, _ = torch.ops.fusedlora.lora_bwd(dy, dxd, torch.empty(m, 0), bits, *w[:5], torch.empty(0, k),
                                                torch.empty(n, 0), 0.0, 0.0, w[5], *w[6:], True, False, False,
                                                dxd, p)

    def blend(dc, dd):
        return dc + kept.to(dc.dtype) * (dd - dc) / (1 - p)

    assert torch.isfinite(dx).all() and 0.2 < 1 - kept.float().mean().item() < 0.4
    assert_within(dx, blend(dy.double() @ w64, dxd.double()), blend(dy @ wlow, dxd), "dx", torch.float32)
    assert no_ticket_left()


def test_bad_residual_is_named():
    from fusedlora.ops.lora_triton import base_linear

    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"residual: expected shape \(3, 8\), got \(3, 7\)"):
        base_linear(torch.randn(3, 16), w, residual=torch.randn(3, 7))
    with pytest.raises(ValueError, match="residual: expected torch.float32"):
        base_linear(torch.randn(3, 16), w, residual=torch.randn(3, 8, dtype=torch.float16))


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int4"])
def test_hand_built_layouts_match_formats(kind):
    # the kernels' reading of the layouts (what these tests build by hand) is the formats code's reading
    from fusedlora.formats import dequantize_reference

    torch.manual_seed(6)
    for n, k in ((33, 59), (40, 128)):
        if kind == "int4" and k % 64:
            continue
        packed, w64 = nf4_weight(n, k, double_quant=kind == "nf4-dq") if kind != "int4" else int4_weight(n, k)
        torch.testing.assert_close(dequantize_reference(packed, torch.float64), w64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind,kwargs", [
    ("nf4-dq", {"scheme": "nf4", "blocksize": 64, "double_quant": True}),
    ("nf4-128", {"scheme": "nf4", "blocksize": 128, "double_quant": False}),
    ("int4", {"scheme": "int4", "group_size": 128}),
])
def test_quantized_weights_match_reference_op(kind, kwargs):
    # end to end through fl.quantize / fl.lora_linear: the reference op on the same QuantizedWeight
    import fusedlora as fl
    from fusedlora.ops.lora import lora_linear_reference as ref_op

    torch.manual_seed(12)
    m, k, n, r, scale = 29, 256, 72, 8, 0.5
    qw = fl.quantize(torch.randn(n, k) / 16, **kwargs)
    x, a, b, bias = lora_inputs(m, k, n, r, torch.float32)
    dy = torch.randn(m, n)
    ours = run(lambda x, a, b, bias: fl.lora_linear(x, qw, a, b, scale, bias), x, a, b, bias, dy)
    ref = run(lambda x, a, b, bias: ref_op(x, qw.packed, a, b, scale, bias, 0.0, False, None), x, a, b, bias, dy)
    # fp32 inputs: both accumulate in fp32 (the interpreter's fp32 dot is exact fp32 math), so only the
    # summation order differs: a few ulps of the largest partial sums
    for o, rf in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, rf, rtol=1e-5, atol=1e-5 * rf.abs().max().item())


@pytest.mark.parametrize("kind,tile", [
    ("int4", (16, 64, 64)),
    # more tokens per tile than K per step: the NF4 forward scales each weight element in the loop instead
    # of each step's product (the default interpreter tile takes the latter)
    ("nf4-dq", (64, 32, 32)),
])
def test_other_tile_configs_give_the_same_result(kind, tile):
    # another tile shape (as a config sweep on a GPU would set) computes the same function; rounding
    # differs only through the order of the fp32 sums
    from fusedlora.kernels import lora_fwd

    torch.manual_seed(13)
    weight, _, _ = make_weight(kind, 40, 128, torch.float32)
    x, a, b, bias = lora_inputs(21, 128, 40, 4, torch.float32)
    dy = torch.randn(21, 40)
    default = run(triton_fn(weight, 1.0), x, a, b, bias, dy)
    bm, bn, bk = tile
    try:
        lora_fwd.set_gemm_configs([{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "num_warps": 4,
                                    "num_stages": 1}])
        other = run(triton_fn(weight, 1.0), x, a, b, bias, dy)
    finally:
        lora_fwd.set_gemm_configs(None)
    for d, o in zip(default, other, strict=True):
        torch.testing.assert_close(o, d, rtol=1e-5, atol=1e-5 * d.abs().max().item())


@pytest.mark.parametrize("r,block_m", [(8, 32), (8, 16), (32, 64), (40, 32)])
def test_da_from_the_dx_epilogue(monkeypatch, r, block_m):
    # up to FUSED_DA_MAX_RANK dA comes out of dX's launch (row tiles of the config that ran, summed after),
    # above it from its own pass; with dropout both equal the oracle given the mask, rows not a multiple
    # of the tile and NaN-poisoned workspaces (an unwritten row tile of the sum would show)
    from fusedlora.kernels import lora_bwd, lora_fwd
    from fusedlora.kernels.dropout import dropout_mask

    fused = r <= lora_bwd.FUSED_DA_MAX_RANK
    separate = []
    real_reduce = lora_bwd.reduce_da
    monkeypatch.setattr(lora_bwd, "reduce_da", lambda *a, **kw: separate.append(1) or real_reduce(*a, **kw))
    real_empty = torch.empty
    monkeypatch.setattr(lora_bwd.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan"))
                        if kw.get("dtype") == torch.float32 else real_empty(*a, **kw))
    m, k, n, p, scale = 83, 128, 64, 0.2, 0.7
    torch.manual_seed(21)
    weight, w64, wlow = make_weight("nf4-dq", n, k, torch.float32)
    x, a, b, bias = lora_inputs(m, k, n, r, torch.float32)
    dy = torch.randn(m, n)
    seed = _seed_drawn_after(99)
    torch.manual_seed(99)
    try:
        lora_fwd.set_gemm_configs([{"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2,
                                    "num_warps": 4, "num_stages": 1}])
        ours = run(triton_fn(weight, scale, p, True), x, a, b, bias, dy)
    finally:
        lora_fwd.set_gemm_configs(None)
    assert (not separate) == fused
    mask = dropout_mask(seed, x.shape, p, "cpu")
    check_all(ours, run(oracle(w64, scale, p, mask), x, a, b, bias, dy),
              run(plain(wlow, scale, p, mask), x, a, b, bias, dy), torch.float32)


def test_sum_partials_two_jobs_one_launch():
    # the closing sum of the backward: two workspaces in one launch, only the first ``parts`` slices
    # (later ones NaN-poisoned), sizes not a multiple of the block, the scale applied once
    from fusedlora.kernels.lora_bwd import SUM_BLOCK, sum_partials

    torch.manual_seed(17)
    a = torch.randn(5, 3, SUM_BLOCK + 37)
    b = torch.randn(4, 29, 16)
    a[3:] = float("nan")
    out_a, out_b = sum_partials((a, 3, 1.0), (b, 4, 0.25))
    torch.testing.assert_close(out_a.double(), a[:3].double().sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_b.double(), 0.25 * b.double().sum(0), rtol=1e-6, atol=1e-6)
    only, none = sum_partials((b, 2, 2.0))
    assert none is None
    torch.testing.assert_close(only.double(), 2.0 * b[:2].double().sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m,r", [(37, 8), (16, 40)])
def test_g_summed_by_the_last_column_split(monkeypatch, m, r):
    # g = dY·B from a launch cut into column splits (the last split of each row tile adds the partials):
    # equal to the fp64 product, several row tiles and rank slices, twice in a row (the tickets are back at
    # 0 after each launch), every float buffer NaN-poisoned when allocated (an unwritten element would show)
    import triton

    from fusedlora.kernels import lora_bwd

    poison_new_tensors(monkeypatch)
    torch.manual_seed(18)
    n = 200
    dy, b, xa = torch.randn(m, n), torch.randn(n, r), torch.randn(m, r)
    cfg = lora_bwd._g_db_config()
    splits, _ = lora_bwd.split_len(n, triton.cdiv(m, cfg["BLOCK_M"]), cfg["BLOCK_N"], lora_bwd.G_DB_TARGET_PROGRAMS)
    assert splits > 1
    for _ in range(2):
        g, db = lora_bwd.g_and_db(dy, b, xa, True, True, 0.5)
        torch.testing.assert_close(g.double(), dy.double() @ b.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db.double(), 0.5 * dy.double().t() @ xa.double(), rtol=1e-5, atol=1e-5)
    assert no_ticket_left()


def test_dense_weight_gradient():
    # a dense weight that requires grad gets dW = dYᵀ·x (frozen bases never ask for it)
    torch.manual_seed(3)
    import fusedlora as fl

    x, a, b, _ = lora_inputs(19, 40, 24, 4, torch.float32)
    w = (torch.randn(24, 40) / 40**0.5).requires_grad_(True)
    fl.lora_linear(x, w, a, b, 0.5).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(19, 24).t() @ x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# dropout

def _seed_drawn_after(manual_seed: int) -> int:
    from fusedlora.ops.lora_triton import draw_seed

    torch.manual_seed(manual_seed)
    return int(draw_seed(torch.device(_device())).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind,path", [("dense", None), ("nf4", "inloop"), ("nf4", "dequant")])
def test_dropout_matches_reference_given_the_mask(dtype, kind, path):
    from fusedlora.kernels.dropout import dropout_mask
    from fusedlora.ops.paths import forced_path

    m, k, n, r, p, scale = 37, 192, 97, 8, 0.3, 2.0
    torch.manual_seed(11)
    weight, w64, wlow = make_weight(kind, n, k, dtype)
    x, a, b, bias = lora_inputs(m, k, n, r, dtype)
    dy = torch.randn(m, n, dtype=dtype)
    seed = _seed_drawn_after(1234)
    torch.manual_seed(1234)  # the op draws the same seed
    with forced_path(path):
        ours = run(triton_fn(weight, scale, p, True), x, a, b, bias, dy)
    mask = dropout_mask(seed, x.shape, p, "cpu")
    # forward and backward agree with the reference given the mask: dX and dA would differ at O(1)
    # relative error if the backward regenerated another mask than the forward used
    check_all(ours, run(oracle(w64, scale, p, mask), x, a, b, bias, dy),
              run(plain(wlow, scale, p, mask), x, a, b, bias, dy), dtype)


def test_dropout_seed_reproduces_and_changes():
    m, k, n, r, p = 33, 64, 40, 4, 0.5
    torch.manual_seed(5)
    weight, _, _ = make_weight("nf4", n, k, torch.float32)
    x, a, b, bias = lora_inputs(m, k, n, r, torch.float32)
    dy = torch.randn(m, n)
    outs = []
    for s in (7, 7, 8):
        torch.manual_seed(s)
        outs.append(run(triton_fn(weight, 1.0, p, True), x, a, b, bias, dy))
    for t1, t2 in zip(outs[0], outs[1], strict=True):
        if t1 is None:
            continue
        assert torch.equal(t1, t2)
    for i in (0, 1, 2):  # y, dx, dA depend on the mask; dB sees it through xa
        assert not torch.allclose(outs[0][i], outs[2][i])
    # eval mode and p = 0 draw nothing and ignore dropout
    y_eval = triton_fn(weight, 1.0, p, False)(x, a, b, bias)
    y_p0 = triton_fn(weight, 1.0, 0.0, True)(x, a, b, bias)
    assert torch.equal(y_eval, y_p0)


def test_dropout_mask_statistics_and_layout():
    from fusedlora.kernels.dropout import dropout_mask

    p = 0.3
    mask = dropout_mask(99, (512, 256), p, "cpu")
    assert mask.dtype == torch.bool and mask.shape == (512, 256)
    # 131072 Bernoulli(0.7) draws: standard deviation of the mean 0.0013; 0.007 is over 5 sigma
    assert abs(mask.float().mean().item() - (1 - p)) < 0.007
    # rows are not copies of each other and seeds give different masks
    assert not torch.equal(mask[0], mask[1])
    assert (mask != dropout_mask(100, (512, 256), p, "cpu")).float().mean() > 0.2
    # leading dimensions keep the flat index: the same mask as the flattened 2-D shape
    assert torch.equal(dropout_mask(99, (4, 128, 256), p, "cpu").reshape(512, 256), mask)
    # p = 0 keeps everything (rand is in [0, 1))
    assert dropout_mask(1, (64, 64), 0.0, "cpu").all()


def test_explicit_mask_is_refused():
    import fusedlora as fl

    x, a, b, _ = lora_inputs(4, 32, 16, 4, torch.float32)
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match="dropout_mask"):
        fl.lora_linear(x, w, a, b, 1.0, None, 0.5, True, torch.ones(4, 32, dtype=torch.bool))


def test_corrupted_quant_state_is_refused():
    import dataclasses

    import fusedlora as fl

    x, a, b, _ = lora_inputs(4, 64, 16, 4, torch.float32)
    packed, _ = nf4_weight(16, 64)
    for bad in (dataclasses.replace(packed, absmax=packed.absmax[:-1]),
                dataclasses.replace(packed, data=packed.data[:-1]),
                dataclasses.replace(packed, block=96)):
        with pytest.raises((ValueError, TypeError)):
            fl.lora_linear(x, bad, a, b, 1.0)
    i4, _ = int4_weight(16, 64)
    with pytest.raises(ValueError, match="scales"):
        fl.lora_linear(x, dataclasses.replace(i4, scales=i4.scales[:, :0]), a, b, 1.0)


# ------------------------------------------------------------------------------------------------------
# input layouts

def test_leading_dims_and_strided_x():
    import fusedlora as fl

    torch.manual_seed(2)
    weight, _, _ = make_weight("nf4-dq", 40, 64, torch.float32)
    _, a, b, bias = lora_inputs(1, 64, 40, 4, torch.float32)
    x = torch.randn(2, 3, 5, 64)
    y = fl.lora_linear(x, weight, a, b, 1.0, bias)
    assert y.shape == (2, 3, 5, 40)
    flat = fl.lora_linear(x.reshape(30, 64), weight, a, b, 1.0, bias)
    assert torch.equal(y.reshape(30, 40), flat)
    # a row stride (x a slice of a wider buffer) goes to the kernels as is; a column stride is copied
    wide = torch.randn(30, 100)
    wide[:, :64] = x.reshape(30, 64)
    assert torch.equal(fl.lora_linear(wide[:, :64], weight, a, b, 1.0, bias), flat)
    xt = x.reshape(30, 64).t().contiguous().t()
    assert torch.equal(fl.lora_linear(xt, weight, a, b, 1.0, bias), flat)


def test_unused_gradient_outputs_and_expanded_grad():
    # y.sum() hands the backward a stride-0 gradient; only the inputs that need grads get them
    import fusedlora as fl

    torch.manual_seed(4)
    x, a, b, bias = lora_inputs(9, 64, 24, 4, torch.float16)
    w = (torch.randn(24, 64) / 8).half()
    a.requires_grad_(True)
    fl.lora_linear(x, w, a, b, 1.0, bias).sum().backward()
    ref = a.detach().clone().requires_grad_(True)
    lora_linear_reference(x, w, ref, b, 1.0, bias, 0.0, False, None).sum().backward()
    assert x.grad is None and b.grad is None
    torch.testing.assert_close(a.grad, ref.grad, rtol=2e-3, atol=2e-3)  # fp16 rounding of dA, see above


# ------------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile

def _op_args(kind, p):
    from fusedlora.ops.lora_triton import draw_seed, weight_args

    torch.manual_seed(8)
    weight, _, _ = make_weight(kind, 24, 64, torch.float32)
    x, a, b, bias = lora_inputs(9, 64, 24, 4, torch.float32)
    w, ws, wz, na, nc, fmt, block, off = weight_args(weight)
    seed = draw_seed(torch.device("cpu")) if p > 0 else None
    return x, (x, w, ws, wz, na, nc, a, b, bias, seed, 1.5, p, fmt, 24, block, off)


@pytest.mark.parametrize("kind,p", [("dense", 0.0), ("nf4-dq", 0.25), ("int4", 0.0)])
def test_opcheck(kind, p):
    x, args = _op_args(kind, p)
    args = list(args)
    for i in (0, 6, 7, 8):  # x, A, B, bias: exercises the autograd registration
        args[i] = args[i].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.fusedlora.lora_fwd.default, tuple(args))
    y, xa, bits = torch.ops.fusedlora.lora_fwd(*[t.detach() if isinstance(t, torch.Tensor) else t for t in args])
    assert bits.dtype == torch.uint8 and bits.shape == ((x.shape[0], x.shape[1] // 8) if p > 0 else (0,))
    dy = torch.randn_like(y)
    x_, w, ws, wz, na, nc, a, b, _, _, scale, p_, fmt, _, block, off = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    for need in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.fusedlora.lora_bwd.default,
                              (dy, x_, xa, bits, w, ws, wz, na, nc, a, b, scale, p_, fmt, block, off, *need))


def test_opcheck_rank_zero_dx_with_blend():
    """lora_bwd's optional drop(x) gradient (``blend``) and its drop probability: schema, fake and real
    agree."""
    from fusedlora.kernels.dora import drop_split
    from fusedlora.ops.lora_triton import weight_args

    torch.manual_seed(10)
    weight, _, _ = make_weight("nf4-dq", 24, 64, torch.float32)
    w, ws, wz, na, nc, fmt, block, off = weight_args(weight)
    m = 9
    _, _, bits = drop_split(torch.randn(m, 64), torch.tensor([77]), 0.25)
    dy, dxd = torch.randn(m, 24), torch.randn(m, 64)
    torch.library.opcheck(torch.ops.fusedlora.lora_bwd.default,
                          (dy, torch.randn(m, 64), torch.empty(m, 0), bits, w, ws, wz, na, nc, torch.empty(0, 64),
                           torch.empty(24, 0), 0.0, 0.0, fmt, block, off, True, False, False, dxd, 0.25))


def test_torch_compile_fullgraph():
    import fusedlora as fl

    torch.manual_seed(9)
    weight, _, _ = make_weight("nf4", 24, 64, torch.float32)
    x, a, b, bias = lora_inputs(9, 64, 24, 4, torch.float32)

    def layer(x, a, b, bias):
        return fl.lora_linear(x, weight, a, b, 1.5, bias, 0.2, True).relu().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (layer, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bias)]
        torch.manual_seed(21)  # same seed draw in both runs
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# GPU only: bf16, and offsets that cross 2^31

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "nf4", "nf4-dq", "int4"])
def test_bf16_matches_reference_gpu(kind):
    torch.manual_seed(1)
    _check_bf16_gpu(kind, 1000, 512, 1344, 16, 2.0, (0.0, 0.1), 77)


def _check_bf16_gpu(kind, m, k, n, r, scale, dropouts, seed_after):
    """The layer in bf16 on the GPU, forward and backward, against the float64 oracle and plain torch, once
    per dropout probability in ``dropouts`` (the mask drawn after ``seed_after``), on one draw of inputs."""
    from fusedlora.kernels.dropout import dropout_mask

    dtype, dev = torch.bfloat16, "cuda"
    weight, w64, wlow = make_weight(kind, n, k, dtype, dev)
    x, a, b, bias = lora_inputs(m, k, n, r, dtype, True, device=dev)
    dy = torch.randn(m, n, dtype=dtype, device=dev)
    for p in dropouts:
        seed = _seed_drawn_after(seed_after)
        torch.manual_seed(seed_after)
        ours = run(triton_fn(weight, scale, p, True), x, a, b, bias, dy)
        mask = dropout_mask(seed, x.shape, p, dev) if p > 0 else None
        check_all(ours, run(oracle(w64, scale, p, mask), x, a, b, bias, dy),
                  run(plain(wlow, scale, p, mask), x, a, b, bias, dy), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m,p", [(9, 0.1), (9, 0.0), (100, 0.0)])
def test_split_reductions_gpu(m, p):
    # few tokens on the GPU's own SM count: the NF4 forward slices K (with dropout the pre-kernel too;
    # without, the forward makes xa itself: M = 100 on the 128-token tiles), dX slices N, g/dB slices its
    # columns, and in each the last slice of a tile to finish (an atomic ticket taken across SMs) adds the
    # partials; twice in a row, as the tickets must be back at 0 after each launch
    from fusedlora.kernels import lora_fwd

    k, n, r = 4096, 4096, 16
    sms = lora_fwd.sm_count(torch.device("cuda"))
    assert lora_fwd.fuses_xa(m, n, r, p, True, sms) == (p == 0)
    assert lora_fwd.reduction_splits(m, n, k, sms) > 1 and lora_fwd.reduction_splits(m, k, n, sms) > 1
    torch.manual_seed(5)
    _check_bf16_gpu("nf4-dq", m, k, n, r, 2.0, (p, p), 78)


def _rows_check(ours_rows, x_rows, w, a, b, scale, what):
    ref = (x_rows.float() @ w.float().t() + scale * (x_rows.float() @ a.float().t()) @ b.float().t())
    err = (ours_rows.float() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), f"{what}: rows past 2^31 elements off by {err}"


@pytest.mark.gpu
def test_int64_offsets_mn_gpu():
    # y has M·N > 2^31 elements: the last rows sit past the int32 range (4.3 GB each for y and dY)
    dev, dtype = "cuda", torch.bfloat16
    m, k, n, r = 2**31 // 8192 + 64, 64, 8192, 16
    torch.manual_seed(0)
    weight, _, wlow = make_weight("nf4", n, k, dtype, dev)
    x = torch.randn(m, k, dtype=dtype, device=dev)
    _, a, b, _ = lora_inputs(1, k, n, r, dtype, False, device=dev)
    import fusedlora as fl

    y = fl.lora_linear(x, weight, a, b, 1.0)
    _rows_check(y[-64:], x[-64:], wlow, a, b, 1.0, "y")
    _rows_check(y[:64], x[:64], wlow, a, b, 1.0, "y")
    del y
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_int64_offsets_mk_gpu():
    # x and dX have M·K > 2^31 elements: the pre-kernel, the dropout offsets, the dX and dA kernels
    import fusedlora as fl
    from fusedlora.kernels.dropout import dropout_mask

    dev, dtype = "cuda", torch.bfloat16
    m, k, n, r, p = 2**31 // 4096 + 64, 4096, 64, 16, 0.1
    torch.manual_seed(0)
    weight, _, wlow = make_weight("dense", n, k, dtype, dev)
    x = torch.randn(m, k, dtype=dtype, device=dev).requires_grad_(True)
    _, a, b, _ = lora_inputs(1, k, n, r, dtype, False, device=dev)
    seed = _seed_drawn_after(3)
    torch.manual_seed(3)
    y = fl.lora_linear(x, weight, a, b, 1.0, None, p, True)
    dy = torch.randn_like(y)
    y.backward(dy)
    tail = slice(m - 64, m)
    mask = dropout_mask(seed, (64, k), p, dev)  # not the tail's mask: recompute it with the tail's offsets below
    full_tail_mask = dropout_mask(seed, x.shape, p, dev)[tail]
    assert not torch.equal(mask, full_tail_mask)
    xt = x.detach()[tail].float()
    xd = xt * full_tail_mask.float() / (1 - p)
    ref_y = xt @ wlow.float().t() + (xd @ a.float().t()) @ b.float().t()
    assert (y.detach()[tail].float() - ref_y).abs().max() <= 2e-2 * ref_y.abs().max()
    g = dy[tail].float() @ b.float()
    ref_dx = dy[tail].float() @ wlow.float() + full_tail_mask.float() * (g @ a.float()) / (1 - p)
    assert (x.grad[tail].float() - ref_dx).abs().max() <= 2e-2 * ref_dx.abs().max()
