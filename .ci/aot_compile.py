"""Compile every Triton kernel config ahead of time for sm_80 and sm_90, on a machine without a GPU.

Imports each module of fusedlora/kernels/ that has ``aot_specs()`` and compiles every spec with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32), options)``.
Fails (exit 1, naming the spec) on any compile error, and when a spec marked ``large_m_gemm`` does not use
wgmma in its sm_90 build (checked in the PTX and the TTGIR) or has no asynchronous (pipelined) loads.
Specs may list ``divisible_by_16`` arguments: the build assumes what the JIT specializes on at launch
(16-byte aligned pointers, sizes and strides that are multiples of 16). One line per spec and target:
name, cc, ok, wgmma yes/no, async copies yes/no, seconds.

Run it without TRITON_INTERPRET (the interpreter turns @triton.jit functions into Python at import time).
Works with the venv's triton and with triton 3.6 (``PYTHONPATH=/tmp/triton36 python .ci/aot_compile.py``).
Options: ``--jobs N`` parallel compile processes (default: the CPU count, at most 4); ``--only SUBSTR``
compiles the specs whose name contains SUBSTR; ``--cc 90`` one target only.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (80, 90)


def _refuse_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("aot_compile: TRITON_INTERPRET is set; run without it (env -u TRITON_INTERPRET ...)")


def kernel_modules():
    import fusedlora.kernels as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        try:
            mod = importlib.import_module(f"fusedlora.kernels.{info.name}")
        except Exception as exc:  # noqa: BLE001  (a module that does not import cannot be compiled either)
            sys.exit(f"aot_compile: importing fusedlora.kernels.{info.name} failed: {type(exc).__name__}: {exc}")
        if hasattr(mod, "aot_specs"):
            yield mod


def all_specs() -> list[tuple[str, dict]]:
    out = []
    for mod in kernel_modules():
        for spec in mod.aot_specs():
            out.append((mod.__name__, spec))
    names = [s["name"] for _, s in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        sys.exit(f"aot_compile: duplicate spec names {sorted(dup)}")
    return out


def make_source(spec: dict):
    """ASTSource across triton versions: constexprs keyed by name (3.3+) or by argument index (older)."""
    from triton.compiler import ASTSource

    fn, signature, constexprs = spec["fn"], dict(spec["signature"]), dict(spec["constexprs"])
    # what the JIT attaches to an argument that is a multiple of 16 (an int) or 16-byte aligned (a pointer)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.get("divisible_by_16", ())}
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        try:
            return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        except (AssertionError, TypeError, KeyError):
            keyed = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
            return ASTSource(fn=fn, signature=signature, constexprs=keyed, attrs=attrs)
    # triton < 3.2: constants by index, constexpr arguments absent from the signature, no attrs
    sig = {fn.arg_names.index(k): v for k, v in signature.items() if v != "constexpr"}
    consts = {fn.arg_names.index(k): v for k, v in constexprs.items()}
    return ASTSource(fn=fn, signature=sig, constants=consts)


def compile_one(task):
    """(module, spec name, cc) -> (name, cc, error or None, wgmma bool, seconds)."""
    module, name, cc = task
    import triton
    from triton.backends.compiler import GPUTarget

    spec = next(s for s in importlib.import_module(module).aot_specs() if s["name"] == name)
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(
            make_source(spec), target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
    except Exception as exc:  # noqa: BLE001  (any compiler failure is reported with the spec's name)
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return name, cc, " | ".join(msg[-6:]), (False, False), time.perf_counter() - t0
    asm = compiled.asm
    ttgir = str(asm.get("ttgir", ""))
    text = str(asm.get("ptx", "")) + ttgir
    wgmma = "wgmma" in text or "warp_group_dot" in text
    pipelined = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir
    return name, cc, None, (wgmma, pipelined), time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4))
    parser.add_argument("--only", default="")
    parser.add_argument("--cc", type=int, choices=TARGETS, action="append")
    args = parser.parse_args()
    _refuse_interpreter()
    # a fresh cache: every spec is really compiled, not read back from an earlier run
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusedlora-aot-")
    sys.path.insert(0, ROOT)
    import triton

    specs = [(mod, s) for mod, s in all_specs() if args.only in s["name"]]
    tasks = [(mod, s["name"], cc) for mod, s in specs for cc in (args.cc or TARGETS)]
    large = {s["name"] for _, s in specs if s["large_m_gemm"]}
    print(f"triton {triton.__version__}: {len(specs)} specs x {len(args.cc or TARGETS)} targets, "
          f"{args.jobs} jobs", flush=True)
    t0 = time.perf_counter()
    failures = []
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = pool.map(compile_one, tasks)
            failures = _report(results, large)
    else:
        failures = _report(map(compile_one, tasks), large)
    print(f"{len(tasks)} compiles in {time.perf_counter() - t0:.1f} s; {len(failures)} failed", flush=True)
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


def _report(results, large) -> list[str]:
    failures = []
    for name, cc, err, (wgmma, pipelined), secs in results:
        ok = err is None
        yn = lambda b: "yes" if b else "no "  # noqa: E731
        print(f"{name:<44} sm_{cc}  {'ok  ' if ok else 'FAIL'}  wgmma {yn(wgmma)}  async-copy {yn(pipelined)}"
              f"  {secs:6.2f} s", flush=True)
        if not ok:
            failures.append(f"{name} sm_{cc}: {err}")
        elif cc == 90 and name in large and not wgmma:
            failures.append(f"{name} sm_90: a large-M GEMM config compiled without wgmma")
        elif name in large and not pipelined:
            failures.append(f"{name} sm_{cc}: a large-M GEMM config whose loads are not pipelined")
    return failures


if __name__ == "__main__":
    sys.exit(main())
