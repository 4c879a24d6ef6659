"""PyTorch backend: ``DARTransformer`` and a full SiT training loop (CUDA, bf16, DDP)."""

from .diagnostics import measure
from .model import DARTransformer
from .trainer import train, velocity_model

__all__ = ["DARTransformer", "measure", "train", "velocity_model"]
