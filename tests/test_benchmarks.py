"""pytest-benchmark cases: the dequant, decode and training-layer ops, ours against the main baseline.

The suite runs them once each as ordinary tests (``--benchmark-disable`` in the pytest settings); to time
them: ``pytest tests/test_benchmarks.py --benchmark-enable``. On a GPU they use the Llama-3-8B 4096→4096
layer in bf16; elsewhere a small fp32 layer on the reference path, so the cases stay runnable anywhere.
Each timed call ends with a device synchronize, so GPU work is inside the measurement.
"""

import pytest
import torch

import fusedlora as fl
from fusedlora.bench import baselines
from fusedlora.bench.layer import LayerCase

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
K, N, M = (4096, 4096, 4096) if GPU else (256, 192, 64)


def _synced(fn):
    def run():
        out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="module")
def case():
    return LayerCase(M, K, N, 16, DTYPE, "nf4-dq", 0.1, DEVICE)


@pytest.mark.parametrize("impl", ["ours", "dequant_cublas_lora"])
def test_layer_forward_backward(benchmark, case, impl):
    step = case.ours() if impl == "ours" else case.baseline(impl)
    benchmark.group = f"layer {K}->{N} M={M} nf4-dq"
    benchmark(_synced(step))
    assert case.A.grad is not None and torch.isfinite(case.A.grad).all()


@pytest.mark.parametrize("impl", ["ours", "dense_linear"])
def test_decode_m1(benchmark, case, impl):
    x = torch.randn(1, K, device=DEVICE, dtype=DTYPE)
    A, B = case.A.detach(), case.B.detach()
    if impl == "ours":
        fn = lambda: fl.lora_linear(x, case.weight, A, B, case.scale)  # noqa: E731
    else:  # bf16 cuBLAS GEMV without LoRA: the bar for decode (computes less)
        fn = lambda: baselines.cublas_dense(x, case.dense)  # noqa: E731
    benchmark.group = f"decode {K}->{N} M=1"
    with torch.no_grad():
        y = benchmark(_synced(fn))
    assert y.shape == (1, N) and torch.isfinite(y).all()


def test_dequantize(benchmark, case):
    benchmark.group = f"dequant {N}x{K} nf4-dq"
    w = benchmark(_synced(lambda: case.weight.dequantize(DTYPE)))
    assert torch.equal(w, case.dense)
