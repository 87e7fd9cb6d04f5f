"""Where a 4-bit weight is decoded on the training path: the one rule, read by the lora ops.

Two paths compute the same function (forward and dX):

- ``"inloop"``: the fused GEMM decodes each W tile in registers inside its K loop. No extra memory
  traffic, but every M tile decodes the same W tile again, so the decode's instructions grow with M.
- ``"dequant"``: W is decoded once per call into a per-device scratch buffer (``ops.scratch``) in the
  compute dtype, then the dense fused GEMM runs on it; the backward decodes again for dX. The cost is a
  fixed ~2.5 bytes of extra traffic per weight element (read 0.5, write 2; the GEMM then reads 2 bytes,
  mostly from L2 at large M) plus one launch, whatever M is.

The arithmetic behind the default (H100 SXM: 132 SMs x 4 schedulers x 1.98 GHz = 1.05e12 warp
instructions/s, i.e. 3.3e13 lane instructions/s; copy bandwidth ~3.0 TB/s). Per weight element, the dequant
path costs two passes (forward and backward) of ~2.5 bytes, ~0.83 ns per 1000 elements each: the time of
~28 lane instructions per element per pass, ~56 for a training step. The in-loop path instead decodes
once per 64-token tile, forward and dX: with the sm_90 counts of the in-loop loops (``bench/triton_loops.py``:
~7 instructions per weight element forward, ~12 for dX, of which ~6 would be spent by the dense loops
anyway) that is ~13 extra per element per 64 tokens. The two meet near 56 / 13 x 64 ≈ 280 tokens; the
default cut-over is the power of two below, 256 (the dequant path's two extra launches favour the in-loop
path at small layers, the in-loop path's issue-bound loops favour the dequant path at large ones).
A GPU run replaces the arithmetic: ``bench/device_check.sh`` measures both paths per shape and writes the
measured cut-overs to ``cutovers.json`` beside this file ({"nf4": M, "int4": M}, the smallest M from
which the dequant path was faster), which this module reads at import.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

PATHS = ("inloop", "dequant")
CUTOVER_FILE = Path(__file__).with_name("cutovers.json")
# tokens from which a 4-bit weight takes the dequant path (see the module docstring for the arithmetic)
ARITHMETIC_CUTOVERS = {"nf4": 256, "int4": 256}


def _load_cutovers(path: Path = CUTOVER_FILE) -> dict[str, int]:
    """Cut-overs from ``path`` when present and well formed, else the arithmetic defaults."""
    cutovers = dict(ARITHMETIC_CUTOVERS)
    if not path.is_file():
        return cutovers
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: unreadable cut-over table ({exc})") from exc
    if not isinstance(measured, dict):
        raise RuntimeError(f"{path}: expected a JSON object {{format: M}}, got {type(measured).__name__}")
    for fmt, m in measured.items():
        if fmt not in ARITHMETIC_CUTOVERS:
            continue  # other keys (GPU name, date, commit) describe the measurement
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise RuntimeError(f"{path}: {fmt!r} must be a positive int (tokens), got {m!r}")
        cutovers[fmt] = m
    return cutovers


CUTOVERS = _load_cutovers()
_FORCED: str | None = None


def training_path(m: int, n: int, k: int, fmt: str) -> str:
    """"inloop" or "dequant" for a 4-bit weight of format ``fmt`` ("nf4" | "int4") and M tokens;
    "dense" for a dense weight."""
    if fmt == "dense":
        return "dense"
    if fmt not in CUTOVERS:
        raise ValueError(f"fmt: expected 'dense', 'nf4' or 'int4', got {fmt!r}")
    if _FORCED is not None:
        return _FORCED
    del n, k  # the rule is per format today; the measured table may refine it per shape
    return "dequant" if m >= CUTOVERS[fmt] else "inloop"


@contextlib.contextmanager
def forced_path(path: str | None):
    """Within the block every 4-bit weight takes ``path`` ("inloop" | "dequant"; None: the rule), for
    tests and benches that time or check one path."""
    global _FORCED
    if path is not None and path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS} or None, got {path!r}")
    old, _FORCED = _FORCED, path
    try:
        yield
    finally:
        _FORCED = old
