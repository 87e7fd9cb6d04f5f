"""The minimal QLoRA trainer behind ``fusedlora train``: config, data, model, loop, checkpoints."""

from .config import TrainConfig
from .main import add_subparser, main

__all__ = ["TrainConfig", "add_subparser", "main"]
