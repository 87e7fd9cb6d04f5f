"""Ahead-of-time builds of the Triton kernels' specs for sm_80 / sm_90 on a machine without a GPU.

Shared by ``.ci/aot_compile.py`` (does every spec compile, use wgmma, pipeline its loads?) and
``bench/triton_loops.py`` (the static report read from the SASS). A spec is a dict returned by a kernel
module's ``aot_specs()``: name, fn, signature, constexprs, num_warps, num_stages, large_m_gemm, and
optionally divisible_by_16 (arguments the JIT would see as multiples of 16), enable_fp_fusion, and report
(hints for the static report, see triton_loops.py).

A build can be saved to a folder (one ``<name>.sm<cc>.cubin`` and ``.json`` per spec and target) and read
back, so that CI compiles once and reports from the same cubins.

Run without TRITON_INTERPRET: the interpreter turns @triton.jit functions into Python at import time.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)


@dataclasses.dataclass
class Build:
    """One spec compiled for one target. ``error`` is set (and the rest empty) when the compile failed."""

    name: str
    cc: int
    error: str | None = None
    seconds: float = 0.0
    triton: str = ""
    num_warps: int = 0
    num_stages: int = 0
    large_m_gemm: bool = False
    constexprs: dict = dataclasses.field(default_factory=dict)
    report: dict = dataclasses.field(default_factory=dict)
    shared: int = 0  # dynamic shared memory per CTA that the launch asks for, bytes
    wgmma: bool = False  # wgmma in the PTX or a warp_group_dot in the TTGIR
    pipelined: bool = False  # asynchronous global -> shared copies in the TTGIR
    cubin: bytes = b""

    def meta(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cubin"}


def refuse_interpreter(tool: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit(f"{tool}: TRITON_INTERPRET is set; run without it (env -u TRITON_INTERPRET ...)")


def kernel_modules(tool: str = "triton_build"):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import fusedlora.kernels as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        try:
            mod = importlib.import_module(f"fusedlora.kernels.{info.name}")
        except Exception as exc:  # noqa: BLE001  (a module that does not import cannot be compiled either)
            sys.exit(f"{tool}: importing fusedlora.kernels.{info.name} failed: {type(exc).__name__}: {exc}")
        if hasattr(mod, "aot_specs"):
            yield mod


def all_specs(tool: str = "triton_build") -> list[tuple[str, dict]]:
    """(module name, spec) for every spec of every kernel module; exits on duplicate names."""
    out = []
    for mod in kernel_modules(tool):
        for spec in mod.aot_specs():
            out.append((mod.__name__, spec))
    names = [s["name"] for _, s in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        sys.exit(f"{tool}: duplicate spec names {sorted(dup)}")
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


def _plain(value):
    """constexpr values as JSON can hold them (bools, ints, floats, strings; anything else as its repr)."""
    return value if isinstance(value, bool | int | float | str) or value is None else repr(value)


def compile_spec(module: str, spec: dict, cc: int) -> Build:
    import triton
    from triton.backends.compiler import GPUTarget

    build = Build(name=spec["name"], cc=cc, triton=triton.__version__, num_warps=spec["num_warps"],
                  num_stages=spec["num_stages"], large_m_gemm=bool(spec.get("large_m_gemm", False)),
                  constexprs={k: _plain(v) for k, v in spec["constexprs"].items()},
                  report=dict(spec.get("report", {})))
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    if "enable_fp_fusion" in spec:
        options["enable_fp_fusion"] = spec["enable_fp_fusion"]
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(make_source(spec), target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as exc:  # noqa: BLE001  (any compiler failure is reported with the spec's name)
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        build.error = " | ".join(msg[-6:])
        build.seconds = time.perf_counter() - t0
        return build
    build.seconds = time.perf_counter() - t0
    asm = compiled.asm
    ttgir = str(asm.get("ttgir", ""))
    build.wgmma = "wgmma" in str(asm.get("ptx", "")) or "warp_group_dot" in ttgir
    build.pipelined = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir
    build.shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    build.cubin = bytes(asm["cubin"])
    return build


def _compile_task(task) -> Build:
    module, name, cc = task
    spec = next(s for s in importlib.import_module(module).aot_specs() if s["name"] == name)
    return compile_spec(module, spec, cc)


def compile_all(only: str = "", targets=TARGETS, jobs: int = 1, tool: str = "triton_build"):
    """Yield a Build per (spec whose name contains ``only``, target), in order, compiling ``jobs`` at a time
    into a fresh cache (every spec really compiled, not read back from an earlier run)."""
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusedlora-aot-")
    # a spec may name the targets it runs on ("targets": (90,)): configs that only a Hopper launch picks
    tasks = [(mod, s["name"], cc) for mod, s in all_specs(tool) if only in s["name"] for cc in targets
             if cc in s.get("targets", TARGETS)]
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            yield from pool.map(_compile_task, tasks)
    else:
        yield from map(_compile_task, tasks)


def count_specs(only: str = "", tool: str = "triton_build") -> int:
    return sum(only in s["name"] for _, s in all_specs(tool))  # specs, whatever their targets


def save(build: Build, folder: Path) -> None:
    stem = f"{build.name}.sm{build.cc}"
    (Path(folder) / f"{stem}.json").write_text(json.dumps(build.meta(), indent=1, sort_keys=True))
    if build.cubin:
        (Path(folder) / f"{stem}.cubin").write_bytes(build.cubin)


def load(folder: Path) -> list[Build]:
    builds = []
    for meta in sorted(Path(folder).glob("*.json")):
        fields = json.loads(meta.read_text())
        cubin = meta.parent / (meta.name[: -len(".json")] + ".cubin")
        builds.append(Build(**fields, cubin=cubin.read_bytes() if cubin.is_file() else b""))
    return builds
