"""Timing and the device's own ceilings, measured in the same run as the rows they normalize."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def time_ms(fn: Callable[[], object], *, rep_ms: int = 100, cpu_reps: int = 5) -> float:
    """Median milliseconds of ``fn``.

    GPU: triton's do_bench (CUDA events, warm-up, and an L2 flush before every repetition, so a weight
    that fits in L2 is not timed from the cache). CPU: wall-clock median after one warm-up call.
    """
    if on_gpu():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    samples = []
    for _ in range(cpu_reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak device memory that one call of ``fn`` allocates above what was live before it (GPU only)."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    if not on_gpu():
        nbytes = 1 << 26
    device = "cuda" if on_gpu() else "cpu"
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """Dense matmul rate through torch (cuBLAS on GPU), random data (zeros run faster than real data)."""
    if not on_gpu():
        n = 512
    device, dtype = ("cuda", torch.bfloat16) if on_gpu() else ("cpu", torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def ceilings() -> dict:
    return {"copy_gbs": copy_bandwidth_gbs(), "matmul_tflops": matmul_tflops()}
