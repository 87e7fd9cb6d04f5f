"""Timing and the device's own ceilings, measured in the same run as the rows they normalize."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


# An interquartile range above this share of the median marks a timing as noisy (another process, clock
# changes, a cold cache): the row is kept, its spread shown, and the run warns.
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class Timing:
    """Repeated timings of one callable: the median and the interquartile range, in milliseconds."""

    ms: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """IQR / median."""
        return self.iqr / self.ms if self.ms > 0 else 0.0

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        if len(samples) < 2:
            return cls(samples[0], samples[0], samples[0], len(samples))
        q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(q2, q1, q3, len(samples))


def measure(fn: Callable[[], object], *, rep_ms: int = 100, cpu_reps: int = 9) -> Timing:
    """Median and IQR of ``fn``'s milliseconds.

    GPU: triton's do_bench (CUDA events, warm-up, and an L2 flush before every repetition, so a weight
    that fits in L2 is not timed from the cache), every repetition kept. CPU: wall-clock times of
    ``cpu_reps`` calls after one warm-up call.
    """
    if on_gpu():
        import triton.testing

        return Timing.of([float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="all")])
    fn()
    samples = []
    for _ in range(cpu_reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return Timing.of(samples)


class Budget:
    """Wall-clock seconds a bench may go on starting work (None: no limit), counted from its creation; the
    device check's per-stage timeouts kill a bench that outlasts them, so each stops starting rows first."""

    def __init__(self, seconds: float | None, log: Callable[[str], object] = print):
        self.seconds, self.log, self.start = seconds, log, time.perf_counter()

    def spent(self, before: str) -> bool:
        """True once the budget is spent, said through ``log``: the caller stops before ``before``."""
        if self.seconds is None or time.perf_counter() - self.start <= self.seconds:
            return False
        self.log(f"budget of {self.seconds:.0f} s spent: stopping before {before}")
        return True


def time_ms(fn: Callable[[], object], *, rep_ms: int = 100, cpu_reps: int = 9) -> float:
    """Median milliseconds of ``fn`` (``measure``)."""
    return measure(fn, rep_ms=rep_ms, cpu_reps=cpu_reps).ms


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
    """Dense matmul rate through torch (cuBLAS on GPU; bf16 there, fp32 on a CPU, the dtypes the benches
    run), random data (zeros run faster than real data). On a CPU the best of a few sizes: a single small
    size underrates what the library reaches on the benches' shapes, which would put rows above 100 %."""
    device, dtype = ("cuda", torch.bfloat16) if on_gpu() else ("cpu", torch.float32)
    rates = []
    for size in ([n] if on_gpu() else [256, 512, 1024]):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t = measure(lambda a=a, b=b: a @ b)
        rates.append(2 * size**3 / (t.q1 * 1e-3) / 1e12)  # the faster quartile: a ceiling, not a typical time
    return max(rates)


def ceilings() -> dict:
    return {"copy_gbs": copy_bandwidth_gbs(), "matmul_tflops": matmul_tflops()}
