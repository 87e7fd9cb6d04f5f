"""fusedlora: the base matmul, the LoRA update and 4-bit dequantization of a linear layer in one pass."""

from . import ops
from ._ext import extension_loaded
from .adapters import load_adapter, save_adapter
from .functional import lora_linear
from .inject import disable_adapter, inject, merge, print_trainable_parameters, trainable_parameters
from .loading import load_quantized
from .modules import LoRALinear
from .ops.backend import backend
from .peft import from_peft
from .peft_accelerate import accelerate
from .quantized import QuantizedWeight, quantize
from .sharding import fully_shard

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "QuantizedWeight",
    "accelerate",
    "backend",
    "disable_adapter",
    "extension_loaded",
    "from_peft",
    "fully_shard",
    "inject",
    "load_adapter",
    "load_quantized",
    "lora_linear",
    "merge",
    "ops",
    "print_trainable_parameters",
    "quantize",
    "save_adapter",
    "trainable_parameters",
]
