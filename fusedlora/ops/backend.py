"""Backend families and how one is chosen for a device.

- ``reference``: plain torch; every op has one; the default for CPU tensors.
- ``triton``: the Triton kernels; on CPU tensors only when forced under ``TRITON_INTERPRET=1``.
- ``cuda``: the compiled extension where it has a kernel, the Triton kernels for the rest; the default on
  a GPU when ``fusedlora._C`` is built and holds a kernel image for that GPU's architecture, else ``triton``
  is (saying so in one logged line per device, when the extension is built but not for that GPU).

``FUSEDLORA_BACKEND=cuda|triton|reference`` forces a family. Forcing one that cannot run on the device is
an error, never a silent fallback. float64 inputs always run the reference (the kernels have no fp64 path).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import torch

from .._ext import EXTENSION_ERROR, extension_loaded

FAMILIES = ("cuda", "triton", "reference")
ENV_VAR = "FUSEDLORA_BACKEND"
logger = logging.getLogger("fusedlora")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Asked once, at import: whether triton can be imported does not change while the process runs, and
# torch.compile (dynamo, torch 2.11 among others) refuses to trace importlib's find_spec in a forward.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _resolve_device(device) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(device)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def kernel_image_error(index: int) -> str:
    """"" when the extension holds a kernel image CUDA device ``index`` can run, else the CUDA error."""
    return torch.ops.fusedlora.kernel_image_error(index)


_NO_KERNEL: dict[int, str | None] = {}  # device index -> why the extension cannot run there (None: it can)
_LOGGED: set[int] = set()


# Plain functions over the dicts above (not functools caches, which torch.compile traces through): constants
# to torch.compile, so that a compiled model does not trace the probe of the extension.
@torch.compiler.assume_constant_result
def _no_kernel_for(index: int) -> str | None:
    """Why the extension cannot run on CUDA device ``index`` (None: it can); asked once per device."""
    if index not in _NO_KERNEL:
        err = kernel_image_error(index)
        reason = None
        if err:
            major, minor = torch.cuda.get_device_capability(index)
            reason = (f"the CUDA extension fusedlora._C has no kernel for compute capability {major}.{minor} "
                      f"({err}); rebuild it with TORCH_CUDA_ARCH_LIST including {major}.{minor}")
        _NO_KERNEL[index] = reason
    return _NO_KERNEL[index]


@torch.compiler.assume_constant_result
def _log_fallback(index: int, reason: str) -> bool:
    """One logged line per device that runs the triton family because the extension cannot."""
    if index not in _LOGGED:
        _LOGGED.add(index)
        logger.warning("fusedlora: cuda:%d runs the triton backend: %s", index, reason)
    return True


def why_not(family: str, device: torch.device) -> str | None:
    """None when ``family`` can run tensors on ``device``, else the reason it cannot."""
    if family == "reference":
        return None
    if family == "triton":
        if not _TRITON_FOUND:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device {device}"
    if family == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension runs on CUDA tensors, got device {device}"
        if not extension_loaded():
            return f"the CUDA extension fusedlora._C is not loaded ({EXTENSION_ERROR})"
        return _no_kernel_for(_device_index(device))
    raise ValueError(f"{ENV_VAR}: expected one of {FAMILIES}, got {family!r}")


def backend(device=None) -> str:
    """The backend family that runs ops on ``device`` (default: the current CUDA device, else CPU)."""
    device = _resolve_device(device)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in FAMILIES:
            raise ValueError(f"{ENV_VAR}: expected one of {FAMILIES}, got {forced!r}")
        reason = why_not(forced, device)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run on {device}: {reason}")
        return forced
    if device.type == "cuda":
        if not extension_loaded():
            return "triton"
        index = _device_index(device)
        reason = _no_kernel_for(index)
        if reason is None:
            return "cuda"
        _log_fallback(index, reason)
        return "triton"
    return "reference"


@contextlib.contextmanager
def forced(family: str | None):
    """Within the block, ``FUSEDLORA_BACKEND`` is ``family`` (None: unset); restored afterwards."""
    old = os.environ.get(ENV_VAR)
    if family is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = family
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old
