"""Loads the compiled extension ``fusedlora._C`` if it was built; records why not otherwise."""

import importlib
import importlib.util

import torch  # noqa: F401  (the extension links against libtorch: load it first)

EXTENSION = None
EXTENSION_ERROR = None

if importlib.util.find_spec("fusedlora._C") is None:
    EXTENSION_ERROR = (
        "not built: install needs a CUDA build of torch and nvcc (CUDA_HOME), without FUSEDLORA_SKIP_CUDA_BUILD=1"
    )
else:
    try:
        # Importing registers the extension's TORCH_LIBRARY ops.
        EXTENSION = importlib.import_module("fusedlora._C")
    except ImportError as exc:  # built against another torch, or a missing CUDA runtime library
        EXTENSION_ERROR = f"built but failed to load: {exc}"


def extension_loaded() -> bool:
    return EXTENSION is not None
