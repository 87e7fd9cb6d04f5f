"""4-bit weight layouts as functions: packing, reference quantize/dequantize, bitsandbytes key names."""

from .packed import SCHEMES, Packed4bit

__all__ = ["SCHEMES", "Packed4bit"]
