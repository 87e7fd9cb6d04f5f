"""Where a 4-bit weight is decoded on the training path: the one rule, read by the lora ops.

Two paths compute the same function, chosen per GEMM (the forward, and the backward's dX):

- ``"inloop"``: the fused GEMM decodes each W tile in registers inside its K loop (``kernels.code_lookup``).
  No extra memory traffic, but every token tile decodes the same W tile again: the decode's instructions
  grow with M, and are free only while the tensor cores take longer than issuing them.
- ``"dequant"``: W is decoded once per call into a per-device scratch buffer (``ops.scratch``) in the
  compute dtype, then the dense fused GEMM runs on it. The cost is a fixed ~2.5 bytes of extra traffic
  per weight element (read 0.5, write 2; the GEMM then reads 2 bytes, mostly from L2 at large M) plus one
  launch, whatever M is.

The rule (from the sm_90 SASS counts of ``bench/triton_loops.py``; H100: 2048 bf16 FMA per clock per SM
against 4 issued instructions, so a loop with T tokens per tile hides up to T / 16 instructions per weight
element under the tensor cores):

- forward: in-loop at every M. Its decode costs ~7-11 instructions per weight element (sm_90, bf16; 64-,
  128- and 256-token tiles), under the tensor time of the tiles that serve each M (T / 16), so a dequant
  pass (~17 µs per 4096² weight on an H100) would only add time.
- dX, NF4: in-loop at every M as well. Its decode scales each element along the reduction (one packed
  bf16 FMA pair per two elements) and, with N a multiple of the step, keeps only loop-invariant masks:
  ~8.8 instructions per element at 128 tokens per tile (566 per step against 640 clocks of tensor work),
  so the loop is tensor-bound and the dequant pass would again only add time (report: 4096² at M = 4096
  on an H100, in-loop 182 µs for dX against 17 + 182 on the dequant path).
- dX, INT4: in-loop up to 2048 tokens, then dequant. Its zero point and scale cost ~12 instructions per
  element (fp32 arithmetic), issue-bound at every tile, while the dequant pass costs the same at every M.

A GPU run replaces the arithmetic: ``bench/device_check.sh`` times both paths per shape
(``bench/bench_cutover.py``) and writes the measured cut-overs to ``cutovers.json`` beside this file
({"nf4-dx": M, "nf4-fwd": M or null, ...}: the smallest M from which the dequant path was faster, null for
never), which this module reads at import.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

PATHS = ("inloop", "dequant")
GEMMS = ("fwd", "dx")
FORMATS = ("nf4", "int4")
CUTOVER_FILE = Path(__file__).with_name("cutovers.json")
# tokens from which a GEMM over a 4-bit weight takes the dequant path; None: never (module docstring)
ARITHMETIC_CUTOVERS: dict[str, int | None] = {"nf4-fwd": None, "nf4-dx": None, "int4-fwd": None, "int4-dx": 2048}


def _load_cutovers(path: Path = CUTOVER_FILE) -> dict[str, int | None]:
    """Cut-overs from ``path`` when present and well formed, else the arithmetic defaults."""
    cutovers = dict(ARITHMETIC_CUTOVERS)
    if not path.is_file():
        return cutovers
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: unreadable cut-over table ({exc})") from exc
    if not isinstance(measured, dict):
        raise RuntimeError(f"{path}: expected a JSON object {{'<format>-<gemm>': M}}, got {type(measured).__name__}")
    for key, m in measured.items():
        if key not in ARITHMETIC_CUTOVERS:
            continue  # other keys (GPU name, date, commit) describe the measurement
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise RuntimeError(f"{path}: {key!r} must be a positive int (tokens) or null, got {m!r}")
        cutovers[key] = m
    return cutovers


CUTOVERS = _load_cutovers()
_FORCED: dict[str, str] = {}  # GEMM -> path, set by forced_path


def training_path(m: int, n: int, k: int, fmt: str, gemm: str = "fwd") -> str:
    """"inloop" or "dequant" for the GEMM ``gemm`` ("fwd" | "dx") over M tokens of a 4-bit weight of
    format ``fmt`` ("nf4" | "int4"); "dense" for a dense weight."""
    if fmt == "dense":
        return "dense"
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected 'dense', 'nf4' or 'int4', got {fmt!r}")
    if gemm not in GEMMS:
        raise ValueError(f"gemm: expected one of {GEMMS}, got {gemm!r}")
    if gemm in _FORCED:
        return _FORCED[gemm]
    del n, k  # the rule is per format and GEMM today; the measured table may refine it per shape
    cut = CUTOVERS[f"{fmt}-{gemm}"]
    return "dequant" if cut is not None and m >= cut else "inloop"


@contextlib.contextmanager
def forced_path(path: str | None, gemm: str | None = None):
    """Within the block the GEMM ``gemm`` ("fwd" | "dx"; None: both) of every 4-bit weight takes ``path``
    ("inloop" | "dequant"; None: the rule), for tests and benches that time or check one path."""
    if path is not None and path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS} or None, got {path!r}")
    if gemm is not None and gemm not in GEMMS:
        raise ValueError(f"gemm: expected one of {GEMMS} or None, got {gemm!r}")
    old = dict(_FORCED)
    for g in (gemm,) if gemm else GEMMS:
        if path is None:
            _FORCED.pop(g, None)
        else:
            _FORCED[g] = path
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old)
