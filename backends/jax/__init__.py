"""JAX backend of dar: ``DARTransformer`` (pure functions over a flat parameter dict),
``train(tc)`` (jitted, data-parallel over a device mesh) and ``velocity_model``."""

from . import numerics
from .device import compute_dtype, resolve_device
from .model import DARTransformer
from .routing import History, NaiveHistory, ResidualStream
from .trainer import train
from .velocity import velocity_model

__all__ = ["DARTransformer", "History", "NaiveHistory", "ResidualStream", "compute_dtype",
           "numerics", "resolve_device", "train", "velocity_model"]
