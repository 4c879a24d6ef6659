"""PyTorch backend: ``DARTransformer`` and a full SiT training loop (CUDA, bf16, DDP)."""

from .device import compute_dtype, resolve_device
from .diagnostics import measure
from .model import DARTransformer
from .trainer import train
from .velocity import velocity_model

__all__ = ["DARTransformer", "compute_dtype", "measure", "resolve_device", "train",
           "velocity_model"]
