"""Compile every Triton kernel config ahead of time for sm_80 and sm_90, on a machine without a GPU.

Imports each module of fusedlora/kernels/ that has ``aot_specs()`` and compiles every spec with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32), options)``
(``bench/triton_build.py``, shared with the static SASS report ``bench/triton_loops.py``).
Fails (exit 1, naming the spec) on any compile error, and when a spec marked ``large_m_gemm`` does not use
wgmma in its sm_90 build (checked in the PTX and the TTGIR) or has no asynchronous (pipelined) loads.
Specs may list ``divisible_by_16`` arguments: the build assumes what the JIT specializes on at launch
(16-byte aligned pointers, sizes and strides that are multiples of 16). One line per spec and target:
name, cc, ok, wgmma yes/no, async copies yes/no, seconds.

Run it without TRITON_INTERPRET (the interpreter turns @triton.jit functions into Python at import time).
Works with the venv's triton and with triton 3.6 (``PYTHONPATH=/tmp/triton36 python .ci/aot_compile.py``).
Options: ``--jobs N`` parallel compile processes (default: the CPU count, at most 4); ``--only SUBSTR``
compiles the specs whose name contains SUBSTR; ``--cc 90`` one target only; ``--save DIR`` keeps every
build (cubin and metadata) for ``bench/triton_loops.py --from DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import triton_build  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4))
    parser.add_argument("--only", default="")
    parser.add_argument("--cc", type=int, choices=triton_build.TARGETS, action="append")
    parser.add_argument("--save", type=Path, help="folder to keep the builds in (created if missing)")
    args = parser.parse_args()
    triton_build.refuse_interpreter("aot_compile")
    import triton

    targets = args.cc or triton_build.TARGETS
    n_specs = triton_build.count_specs(args.only, "aot_compile")
    print(f"triton {triton.__version__}: {n_specs} specs x {len(targets)} targets, {args.jobs} jobs", flush=True)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failures, n = [], 0
    for build in triton_build.compile_all(args.only, targets, args.jobs, "aot_compile"):
        n += 1
        failures += _report(build)
        if args.save:
            triton_build.save(build, args.save)
    print(f"{n} compiles in {time.perf_counter() - t0:.1f} s; {len(failures)} failed", flush=True)
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


def _report(b: triton_build.Build) -> list[str]:
    ok = b.error is None
    yn = lambda v: "yes" if v else "no "  # noqa: E731
    print(f"{b.name:<44} sm_{b.cc}  {'ok  ' if ok else 'FAIL'}  wgmma {yn(b.wgmma)}  async-copy {yn(b.pipelined)}"
          f"  {b.seconds:6.2f} s", flush=True)
    if not ok:
        return [f"{b.name} sm_{b.cc}: {b.error}"]
    if b.cc == 90 and b.large_m_gemm and not b.wgmma:
        return [f"{b.name} sm_90: a large-M GEMM config compiled without wgmma"]
    if b.large_m_gemm and not b.pipelined:
        return [f"{b.name} sm_{b.cc}: a large-M GEMM config whose loads are not pipelined"]
    return []


if __name__ == "__main__":
    sys.exit(main())
