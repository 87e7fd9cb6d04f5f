"""The training path's pieces around the fused GEMMs: which path a 4-bit weight takes (ops.paths), the
scratch buffer of the dequant path, every rank up to the largest supported, split reductions at few
tokens, and the Philox dropout mask read bit by bit (the fp16 overflow case and the device guards are in
test_untrusted_inputs.py).

The kernels run under TRITON_INTERPRET=1 on CPU (fp32 and fp16), as in test_lora_triton.py, whose
weight builders and tolerance rule these tests reuse.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_lora_triton import (
    _seed_drawn_after,
    assert_within,
    check_all,
    lora_inputs,
    make_weight,
    no_ticket_left,
    oracle,
    plain,
    poison_new_tensors,
    run,
    triton_fn,
)


@pytest.fixture(autouse=True)
def _triton_backend(triton_backend):
    from fusedlora.ops.scratch import release_scratch

    release_scratch()
    yield
    release_scratch()


# ------------------------------------------------------------------------------------------------------
# the rule

def test_rule_picks_by_tokens_format_and_gemm():
    from fusedlora.ops.paths import CUTOVERS, forced_path, training_path

    for fmt in ("nf4", "int4"):
        for gemm in ("fwd", "dx"):
            cut = CUTOVERS[f"{fmt}-{gemm}"]
            if cut is None:
                assert training_path(1 << 20, 4096, 4096, fmt, gemm) == "inloop"
            else:
                assert training_path(cut - 1, 4096, 4096, fmt, gemm) == "inloop"
                assert training_path(cut, 4096, 4096, fmt, gemm) == "dequant"
    assert training_path(8192, 4096, 4096, "dense", "dx") == "dense"
    with forced_path("dequant"):
        assert training_path(1, 64, 64, "nf4", "fwd") == "dequant"
        assert training_path(8192, 64, 64, "dense") == "dense"
        with forced_path("inloop", "dx"):  # one GEMM forced, the other keeps the outer forcing
            assert training_path(1 << 20, 64, 64, "int4", "dx") == "inloop"
            assert training_path(1, 64, 64, "int4", "fwd") == "dequant"
        assert training_path(1 << 20, 64, 64, "int4", "dx") == "dequant"
    assert training_path(1, 64, 64, "int4", "dx") == "inloop"
    with pytest.raises(ValueError, match="path"):
        with forced_path("sometimes"):
            pass
    with pytest.raises(ValueError, match="fmt"):
        training_path(1, 1, 1, "nf8")
    with pytest.raises(ValueError, match="gemm"):
        training_path(1, 1, 1, "nf4", "dw")


def test_measured_cutovers_replace_the_arithmetic(tmp_path):
    from fusedlora.ops.paths import ARITHMETIC_CUTOVERS, _load_cutovers

    assert _load_cutovers(tmp_path / "absent.json") == ARITHMETIC_CUTOVERS
    table = tmp_path / "cutovers.json"
    table.write_text(json.dumps({"gpu": "NVIDIA H200", "nf4-dx": 4096, "nf4-fwd": 8192, "int4-dx": None}))
    assert _load_cutovers(table) == {**ARITHMETIC_CUTOVERS, "nf4-dx": 4096, "nf4-fwd": 8192, "int4-dx": None}
    for bad in ('{"nf4-dx": -3}', '{"nf4-dx": 1.5}', '{"int4-fwd": true}', "[1, 2]", "{nf4"):
        table.write_text(bad)
        with pytest.raises(RuntimeError, match="cutovers.json"):
            _load_cutovers(table)


def test_rule_chooses_the_path_that_runs(monkeypatch):
    # past the dX cut-over the backward decodes into the scratch buffer; the forward (in-loop at every M)
    # and the backward below it allocate nothing there (a cut-over of 40 tokens keeps the test small)
    from fusedlora.ops import paths
    from fusedlora.ops.scratch import release_scratch, scratch_nbytes

    monkeypatch.setitem(paths.CUTOVERS, "nf4-dx", 40)
    torch.manual_seed(0)
    n, k = 16, 64
    cut = paths.CUTOVERS["nf4-dx"]
    weight, w64, wlow = make_weight("nf4", n, k, torch.float32)
    for m, expect in ((cut - 1, 0), (cut, n * k * 4)):
        release_scratch()
        x, a, b, _ = lora_inputs(m, k, n, 4, torch.float32)
        x.requires_grad_(True)
        dy = torch.randn(m, n)
        y = triton_fn(weight, 1.0)(x, a, b, None)
        assert scratch_nbytes("cpu") == 0, m
        y.backward(dy)
        assert scratch_nbytes("cpu") == expect, m
        x = x.detach()
        assert_within(y.detach(), oracle(w64, 1.0)(x, a, b, None), plain(wlow, 1.0)(x, a, b, None), "y",
                      torch.float32)


def test_scratch_is_one_buffer_shared_by_layers():
    import fusedlora as fl
    from fusedlora.ops.paths import forced_path
    from fusedlora.ops.scratch import release_scratch, scratch_nbytes, weight_scratch

    torch.manual_seed(1)
    small, _, _ = make_weight("nf4", 32, 64, torch.float16)
    big, _, _ = make_weight("int4", 48, 128, torch.float16)
    with forced_path("dequant"):
        for weight, (n, k) in ((big, (48, 128)), (small, (32, 64)), (big, (48, 128))):
            x, a, b, _ = lora_inputs(5, k, n, 4, torch.float16)
            fl.lora_linear(x, weight, a, b, 1.0)
            # one buffer, the size of the largest weight in the compute dtype, whatever ran last
            assert scratch_nbytes() == scratch_nbytes("cpu") == 48 * 128 * 2
    view_small = weight_scratch(32, 64, torch.float16, torch.device("cpu"))
    view_big = weight_scratch(48, 128, torch.float32, torch.device("cpu"))  # grows: the old one is dropped
    assert view_small.data_ptr() != view_big.data_ptr() and scratch_nbytes() == 48 * 128 * 4
    assert weight_scratch(32, 64, torch.float16, torch.device("cpu")).data_ptr() == view_big.data_ptr()
    release_scratch()
    assert scratch_nbytes() == 0


# ------------------------------------------------------------------------------------------------------
# ranks

@pytest.mark.parametrize("r", [1, 100, 512])
def test_every_rank_up_to_the_largest(r):
    # r = 100 and 512 run in several rank slices in every kernel (pre-kernel, epilogues, g/dB, dA)
    from fusedlora.ops.paths import forced_path

    torch.manual_seed(r)
    m, k, n = 21, 64, 40
    weight, w64, wlow = make_weight("nf4", n, k, torch.float32)
    x, a, b, bias = lora_inputs(m, k, n, r, torch.float32)
    dy = torch.randn(m, n)
    with forced_path("dequant" if r == 512 else "inloop"):
        ours = run(triton_fn(weight, 0.25), x, a, b, bias, dy)
    check_all(ours, run(oracle(w64, 0.25), x, a, b, bias, dy), run(plain(wlow, 0.25), x, a, b, bias, dy),
              torch.float32)


def test_rank_above_the_largest_is_refused():
    import fusedlora as fl
    from fusedlora.ops.lora import MAX_RANK

    x, a, b, _ = lora_inputs(2, 16, 8, MAX_RANK + 1, torch.float32)
    with pytest.raises(ValueError, match=rf"rank r={MAX_RANK + 1} is above the largest supported rank, {MAX_RANK}"):
        fl.lora_linear(x, torch.randn(8, 16), a, b, 1.0)


# ------------------------------------------------------------------------------------------------------
# dropout: eight decisions per Philox call

MASK32 = 0xFFFFFFFF


def _philox4x32_10(seed: int, counter: int) -> tuple[int, int, int, int]:
    """Philox4x32 with 10 rounds: key = the seed's two 32-bit halves, counter = (lo, hi, 0, 0)."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0, c1, c2, c3 = counter & MASK32, (counter >> 32) & MASK32, 0, 0
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p2 >> 32) ^ c1 ^ k0) & MASK32, p2 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def test_dropout_mask_uses_every_half_of_each_call():
    from fusedlora.kernels.dropout import dropout_mask, threshold

    seed, p = 123456789012, 0.4
    m, k = 5, 21  # K not a multiple of 8: each row starts a new call
    mask = dropout_mask(seed, (m, k), p, "cpu")
    groups = -(-k // 8)
    expect = torch.zeros(m, k, dtype=torch.bool)
    for row in range(m):
        for g in range(groups):
            outs = _philox4x32_10(seed, row * groups + g)
            halves = [h for u in outs for h in (u & 0xFFFF, u >> 16)]
            for i in range(8):
                if 8 * g + i < k:
                    expect[row, 8 * g + i] = halves[i] >= threshold(p)
    assert torch.equal(mask, expect)
    assert threshold(0.0) == 0 and threshold(0.5) == 2**15 and threshold(0.999999) == 2**16 - 1


@pytest.mark.parametrize("m,k", [(37, 192), (5, 59)])
def test_forward_saves_the_mask_as_bits(m, k):
    # the backward reads these bits: they must be the mask the forward applied, 1 bit per element
    from fusedlora.kernels.dropout import dropout_mask
    from fusedlora.kernels.lora_fwd import lowrank

    torch.manual_seed(3)
    x = torch.randn(m, k)
    a = torch.randn(8, k)
    seed = torch.tensor([987654321], dtype=torch.int64)
    xa, bits = lowrank(x, a, 0.3, seed)
    assert bits.dtype == torch.uint8 and bits.shape == (m, -(-k // 8))
    unpacked = ((bits[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(m, -1)[:, :k].bool()
    mask = dropout_mask(987654321, (m, k), 0.3, "cpu")
    assert torch.equal(unpacked, mask)
    torch.testing.assert_close(xa, (x * mask / 0.7) @ a.t(), rtol=1e-5, atol=1e-4)
    _, no_bits = lowrank(x, a)
    assert no_bits.numel() == 0


@pytest.mark.parametrize("kind", ["nf4-dq", "int4"])
def test_few_tokens_split_the_reduction(kind, monkeypatch):
    # few tokens and a long reduction: the in-loop forward slices K, dX slices N and the pre-kernel slices
    # K, each slice an fp32 partial sum that the last slice of its tile adds; with dropout and bias the
    # result is the reference's, through outputs that start NaN-poisoned, and the counters end at 0
    import triton

    from fusedlora.kernels import lora_fwd
    from fusedlora.kernels.dropout import dropout_mask

    monkeypatch.setitem(lora_fwd._SMS, torch.device("cpu"), 64)  # a GPU-sized machine: slices needed
    m, k, n, r, p = 9, 1024, 1024, 4, 0.2
    sms = lora_fwd.sm_count(torch.device("cpu"))
    assert lora_fwd.reduction_splits(m, n, k, sms) == lora_fwd.reduction_splits(m, k, n, sms) == 4  # premise
    cfg = lora_fwd.lowrank_config(m, sms)
    assert lora_fwd.lowrank_splits(triton.cdiv(m, cfg["BLOCK_M"]), k // cfg["BLOCK_K"], sms) > 1
    poison_new_tensors(monkeypatch)
    torch.manual_seed(17)
    weight, w64, wlow = make_weight(kind, n, k, torch.float32)
    x, a, b, bias = lora_inputs(m, k, n, r, torch.float32)
    dy = torch.randn(m, n)
    seed = _seed_drawn_after(99)
    torch.manual_seed(99)
    ours = run(triton_fn(weight, 0.5, p, True), x, a, b, bias, dy)
    mask = dropout_mask(seed, x.shape, p, "cpu")
    check_all(ours, run(oracle(w64, 0.5, p, mask), x, a, b, bias, dy),
              run(plain(wlow, 0.5, p, mask), x, a, b, bias, dy), torch.float32)
    assert no_ticket_left()

