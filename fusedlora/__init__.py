"""fusedlora: the base matmul, the LoRA update and 4-bit dequantization of a linear layer in one pass."""

from . import ops
from ._ext import extension_loaded
from .functional import lora_linear
from .ops.backend import backend
from .quantized import QuantizedWeight, quantize

__version__ = "0.1.0"

__all__ = [
    "QuantizedWeight",
    "backend",
    "extension_loaded",
    "lora_linear",
    "ops",
    "quantize",
]
