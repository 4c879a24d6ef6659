"""Sampling handle for the core samplers: ``velocity(x, t: float, y)`` over JAX arrays."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dar_core.backend import VelocityModel
from dar_core.spec.config import ModelConfig

from .device import compute_dtype, resolve_device
from .model import DARTransformer


def velocity_model(config: ModelConfig, weights: dict[str, np.ndarray], precision: str = "fp32",
                   device: Any = "auto") -> VelocityModel:
    """Velocity of the model with ``weights`` (a checkpoint's ``params``/``ema`` dict) on one
    device, computing in ``precision`` (``"fp32"`` or ``"bf16"``); outputs are float32."""
    model = DARTransformer(config)
    dev = resolve_device(device)
    params = jax.device_put(model.load_weights(weights, dtype=compute_dtype(precision)), dev)

    def velocity(x: jax.Array, t: float, y: jax.Array) -> jax.Array:
        tb = jax.device_put(np.full((x.shape[0],), t, dtype=np.float32), dev)
        return model(params, x, tb, y)

    def asarray(a: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(a), dev)

    return VelocityModel(velocity=velocity, asarray=asarray,
                         to_numpy=lambda a: np.asarray(jax.device_get(a)))
