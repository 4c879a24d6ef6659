"""Sampling handle for the core samplers: ``velocity(x, t: float, y)`` over MLX arrays."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dar_core.backend import VelocityModel
from dar_core.spec.config import ModelConfig

from .device import compute_dtype, resolve_device
from .model import DARTransformer, as_mlx


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)


def model_velocity(model: DARTransformer) -> VelocityModel:
    """Wrap a model: inputs are checked, the forward is compiled once per batch shape and reads
    the model's current weights on every call."""
    forward = mx.compile(model.forward, inputs=model.state)

    def velocity(x: mx.array, t: float, y: mx.array) -> mx.array:
        tt = mx.full((x.shape[0],), t, dtype=mx.float32)  # [B]
        return forward(*model.check_inputs(x, tt, y))  # [B, C, H, W]

    return VelocityModel(velocity=velocity, asarray=as_mlx, to_numpy=to_numpy)


def velocity_model(config: ModelConfig, weights: dict[str, np.ndarray], precision: str = "fp32",
                   device: str = "auto") -> VelocityModel:
    """The contract's sampling entry point: ``weights`` is a canonical name -> array dict."""
    resolve_device(device)
    model = DARTransformer(config, dtype=compute_dtype(precision)).load_weights(weights)
    return model_velocity(model)
