"""Sampling handle for the core samplers: ``velocity(x, t: float, y)`` over torch tensors."""

from __future__ import annotations

import numpy as np
import torch

from dar_core.backend import VelocityModel
from dar_core.spec.config import ModelConfig

from .device import autocast, compute_dtype, resolve_device
from .model import DARTransformer


def model_velocity(model: DARTransformer, device: torch.device, precision: str) -> VelocityModel:
    """Wrap a model on ``device``: inputs are checked, the forward runs under inference mode
    and ``precision``'s autocast, outputs are float32."""

    def velocity(x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=device, dtype=torch.float32)
        model.check_inputs(x, tt, y)  # like JAX and MLX: every sampler step is validated
        with torch.inference_mode(), autocast(device, precision):
            return model.velocity(x, tt, y).float()

    return VelocityModel(
        velocity=velocity,
        asarray=lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device),
        to_numpy=lambda a: a.detach().float().cpu().numpy(),
    )


def velocity_model(config: ModelConfig, weights: dict[str, np.ndarray], precision: str = "fp32",
                   device: str = "auto") -> VelocityModel:
    """A sampling handle for the core samplers (``dar sample --backend torch``)."""
    dev = resolve_device(device)
    compute_dtype(precision)  # reject a bad precision before building the model
    model = DARTransformer(config)
    model.load_weights(weights)
    return model_velocity(model.to(dev).eval(), dev, precision)
