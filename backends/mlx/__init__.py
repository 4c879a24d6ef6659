"""The MLX backend of dar: ``DARTransformer``, ``train`` and ``velocity_model``."""

from .model import DARTransformer
from .train import train
from .velocity import velocity_model

__all__ = ["DARTransformer", "train", "velocity_model"]
