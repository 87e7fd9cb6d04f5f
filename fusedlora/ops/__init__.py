"""The op surface: backend selection, the implementation table, and the ops themselves.

Each op module registers its reference implementation here and its kernel implementations (Triton,
CUDA) lazily, so that importing fusedlora never compiles or loads a kernel.
"""

from . import decode, dora, lora_triton  # noqa: F401  (register the cuda and triton families' implementations)
from .backend import backend
from .dequant import dequantize
from .dora import dora_linear
from .lora import lora_linear
from .registry import implementations, register, select

__all__ = ["backend", "dequantize", "dora_linear", "implementations", "lora_linear", "register", "select"]
