"""Device and precision names of the contract mapped onto MLX."""

from __future__ import annotations

import mlx.core as mx

from dar_core.backend import check_precision
from dar_core.errors import ConfigError

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16}


def compute_dtype(precision: str) -> mx.Dtype:
    """``"fp32"`` / ``"bf16"`` -> the compute dtype (``ConfigError`` otherwise)."""
    return DTYPES[check_precision(precision)]


def resolve_device(device: str = "auto") -> mx.Device:
    """``"auto"``: the GPU (Metal on Apple silicon) when present, else the CPU; or ``"cpu"`` /
    ``"gpu"`` explicitly. Sets and returns MLX's default device."""
    if device == "auto":
        dev = mx.gpu if mx.is_available(mx.gpu) else mx.cpu
    elif device in ("cpu", "gpu"):
        dev = getattr(mx, device)
        if not mx.is_available(dev):
            raise ConfigError(f"device {device!r} is not available to MLX on this machine")
    else:
        raise ConfigError(f"device must be 'auto', 'cpu' or 'gpu' for MLX, got {device!r}")
    mx.set_default_device(dev)
    return mx.default_device()
