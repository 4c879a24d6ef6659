"""Sampling handle for the core samplers: ``velocity(x, t: float, y)`` over JAX arrays."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dar_core.backend import VelocityModel, check_precision
from dar_core.errors import ConfigError
from dar_core.spec.config import ModelConfig

from .model import DARTransformer

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


def velocity_model(config: ModelConfig, weights: dict[str, np.ndarray], precision: str = "fp32",
                   device: Any = "auto") -> VelocityModel:
    """Velocity of the model with ``weights`` (a checkpoint's ``params``/``ema`` dict) on one
    device, computing in ``precision`` (``"fp32"`` or ``"bf16"``); outputs are float32."""
    model = DARTransformer(config)
    dev = resolve_device(device)
    params = jax.device_put(model.load(weights, dtype=compute_dtype(precision)), dev)

    def velocity(x: jax.Array, t: float, y: jax.Array) -> jax.Array:
        tb = jax.device_put(np.full((x.shape[0],), t, dtype=np.float32), dev)
        return model(params, x, tb, y)

    def asarray(a: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(a), dev)

    return VelocityModel(velocity=velocity, asarray=asarray,
                         to_numpy=lambda a: np.asarray(jax.device_get(a)))
