"""Loads the compiled extension ``fusedlora._C`` if it was built; records why not otherwise."""

import torch  # noqa: F401  (the extension links against libtorch: load it first)

try:
    from fusedlora import _C  # noqa: F401  (importing registers its TORCH_LIBRARY ops)

    EXTENSION = _C
    EXTENSION_ERROR = None
except ImportError as exc:  # not built (no CUDA torch / nvcc at install time) or built for another torch
    EXTENSION = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return EXTENSION is not None
