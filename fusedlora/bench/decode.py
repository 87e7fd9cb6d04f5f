"""The decode bench: inference at small M (no grad), 4-bit weight + LoRA, against bf16 cuBLAS and bnb."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import lora_linear
from ..ops.backend import forced
from ..quantized import quantize
from .baselines import bitsandbytes, bnb_lora, bnb_quant_state
from .results import make_row, save
from .timing import Budget, time_ms

# Llama-3-8B projections and the 70B-class MLP input (K -> N).
DECODE_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
DECODE_MS = [1, 2, 4, 8, 16, 32, 64]


def decode_bytes(m, k, n, r, quant, block) -> int:
    """Bytes that must move: packed weight, its scales, x, A, B, y (bf16 activations)."""
    weight = n * k // 2
    if quant == "nf4-dq":
        scales = n * k // block + 4 * (n * k // block // 256) + 4 * 256
    elif quant == "nf4":
        scales = 4 * n * k // block
    else:  # int4: fp32 scale + uint8 zero per group
        scales = 5 * n * k // block
    return weight + scales + 2 * (m * k + r * k + n * r + m * n)


def shape_ms(k: int, n: int, ms=DECODE_MS) -> list[int]:
    """``ms`` and the first M past the decode's cut-over for a K -> N layer (``ops.decode.decode_max_m``): the
    Triton forward there, next to the decode at the cut-over, shows whether the switch costs a cliff."""
    from ..ops.decode import decode_max_m

    return sorted(set(ms) | {decode_max_m(k, n) + 1})


def run_decode(shapes=DECODE_SHAPES, ms=DECODE_MS, quants=("nf4-dq", "int4"), *, r=16, ceilings=None,
               progress=None, budget_s=None, out_path=None, env=None):
    """Rows for every (shape, quant, M) of ``shape_ms``; stops starting an M once ``budget_s`` is spent and
    rewrites ``out_path`` (with ``env``) after every M, so a timeout still leaves the rows so far."""
    if not torch.cuda.is_available():
        raise RuntimeError("the decode bench needs a CUDA GPU")
    dtype, rows = torch.bfloat16, []
    bnb = bitsandbytes()
    budget = Budget(budget_s, lambda line: print(line, flush=True))
    for k, n in shapes:
        dense = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
        A = torch.randn(r, k, device="cuda", dtype=dtype) * k**-0.5
        B = torch.randn(n, r, device="cuda", dtype=dtype) * r**-0.5
        for quant in quants:
            if budget.spent(f"{k}->{n} {quant}"):  # before quantizing a weight no row would use
                return rows
            if quant == "int4":
                qw, block = quantize(dense, scheme="int4", group_size=128), 128
            else:
                qw, block = quantize(dense, scheme="nf4", blocksize=64, double_quant=quant == "nf4-dq"), 64
            bnb_state = None
            if bnb is not None and quant.startswith("nf4"):  # bitsandbytes reads our very bytes
                bnb_state = bnb_quant_state(bnb.functional, qw.packed, dtype)
            for m in shape_ms(k, n, ms):
                if budget.spent(f"{k}->{n} {quant} M={m}"):
                    return rows
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                with torch.no_grad():
                    ours = time_ms(lambda: lora_linear(x, qw, A, B, 2.0))  # noqa: B023
                    pct = None
                    if ceilings:
                        floor_ms = decode_bytes(m, k, n, r, quant, block) / (ceilings["copy_gbs"] * 1e9) * 1e3
                        pct = 100.0 * floor_ms / ours
                    common = dict(bench="decode", shape=(k, n), m=m, r=r, dropout=0.0, dtype="bf16", quant=quant,
                                  ours_ms=ours, pct_roofline=pct)
                    rows.append(make_row(**common, baseline="cublas_bf16",
                                         baseline_ms=time_ms(lambda: F.linear(x, dense))))  # noqa: B023
                    if bnb_state is not None:
                        rows.append(make_row(**common, baseline="bnb", baseline_ms=time_ms(
                            lambda: bnb_lora(bnb, x, qw.packed.data, bnb_state, A, B, 2.0))))  # noqa: B023
                # Not schema baselines: the same call on each path (CUDA cores, tensor cores, Triton), to place
                # the cut-overs in M.
                paths = " ".join(f"{name} {ms:.4f}" for name, ms in path_times_ms(x, qw, A, B).items())
                print(f"cutover {k}->{n} {quant} M={m}: default {ours:.4f} ms | {paths}", flush=True)
                if out_path is not None:
                    save(rows, out_path, env)
                if progress is not None:
                    progress.update(1)
    return rows


def path_times_ms(x, qw, A, B) -> dict:
    """The same call on each path that can run it: the CUDA-core GEMV, the 16-row and the 128-row tensor-core
    kernels and the Triton GEMM. Where they cross in M places DECODE_MMA_MIN_M, ``wide_min_m`` and
    ``decode_max_m`` (fusedlora/ops/decode.py)."""
    from ..ops import decode

    times = {}
    with torch.no_grad():
        if x.shape[0] <= decode.DECODE_KERNEL_MAX_M:
            saved = decode.DECODE_MMA_MIN_M, decode.X_REREAD_BUDGET, decode.wide_min_m
            small = x.shape[0] <= decode.DECODE_GEMV_MAX_M  # the GEMV and the 16-row kernel serve fewer tokens
            decode.X_REREAD_BUDGET = 1 << 62  # every M the kernels serve, whatever the rule would pick
            paths = (("cuda_cores", decode.DECODE_KERNEL_MAX_M + 1, 64), ("tensor_cores", 1, 64),
                     ("tensor_cores_128", 1, 1))
            try:
                for name, min_m, wide_from in paths[0 if small else 2:]:
                    decode.DECODE_MMA_MIN_M = min_m
                    decode.wide_min_m = lambda k, n, _m=wide_from: _m  # noqa: E731
                    times[name] = time_ms(lambda: lora_linear(x, qw, A, B, 2.0))
            finally:
                decode.DECODE_MMA_MIN_M, decode.X_REREAD_BUDGET, decode.wide_min_m = saved
        with forced("triton"):
            times["triton"] = time_ms(lambda: lora_linear(x, qw, A, B, 2.0))
    return times
