"""The MLX backend of dar: ``DARTransformer``, ``train`` and ``velocity_model``."""

from .device import compute_dtype, resolve_device
from .model import DARTransformer
from .trainer import train
from .velocity import velocity_model

__all__ = ["DARTransformer", "compute_dtype", "resolve_device", "train", "velocity_model"]
