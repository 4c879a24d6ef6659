"""PyTorch backend: ``DARTransformer`` and a full SiT training loop (CUDA, bf16, DDP)."""

from . import numerics
from .device import compute_dtype, resolve_device
from .diagnostics import measure
from .model import DARTransformer
from .routing import History, NaiveHistory, ResidualStream
from .trainer import train
from .velocity import velocity_model

__all__ = ["DARTransformer", "History", "NaiveHistory", "ResidualStream", "compute_dtype",
           "measure", "numerics", "resolve_device", "train", "velocity_model"]
