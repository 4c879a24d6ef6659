"""Device and precision names of the contract mapped onto JAX."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dar_core.backend import check_precision
from dar_core.errors import ConfigError

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def compute_dtype(precision: str) -> jnp.dtype:
    """``"fp32"`` / ``"bf16"`` -> the compute dtype (``ConfigError`` otherwise)."""
    return DTYPES[check_precision(precision)]


def resolve_device(device: Any = "auto") -> jax.Device:
    """``"auto"`` (the default device), ``"cpu"``, ``"gpu"``, ``"tpu"``, ``"<kind>:<i>"`` or a
    ``jax.Device``."""
    if isinstance(device, jax.Device):
        return device
    if not isinstance(device, str):
        raise ConfigError(f"device must be a string or a jax.Device, got {device!r}")
    if device == "auto":
        return jax.devices()[0]
    kind, _, index = device.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    try:
        found = jax.devices(kind)
    except RuntimeError:
        found = []
    if not found or (index and (not index.isdigit() or int(index) >= len(found))):
        raise ConfigError(f"device {device!r} is not available; JAX sees {jax.devices()}")
    return found[int(index or 0)]
