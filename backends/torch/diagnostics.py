"""One diagnostics pass in PyTorch (see ``dar_core.diagnostics.symptoms``): states, their gradients,
routing weights and the gradients of measurement-only source gates."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dar_core.diagnostics.symptoms import summarize_pass
from dar_core.spec.config import ModelConfig
from dar_core.spec.interpolant import interpolate, velocity_target

from .device import resolve_device
from .model import DARTransformer


def measure(config: ModelConfig, weights: dict[str, np.ndarray], batch: dict[str, np.ndarray],
            t: float, device: str = "auto") -> dict[str, Any]:
    dev = resolve_device(device)
    model = DARTransformer(config)
    model.load_weights(weights)
    model.to(dev).eval()
    x, noise = (torch.from_numpy(batch[k]).to(dev) for k in ("x", "noise"))
    y = torch.from_numpy(batch["y"]).to(dev)
    tt = torch.full((x.shape[0],), float(t), device=dev)
    gates = [torch.ones((), device=dev, requires_grad=True)
             for _ in range(config.num_sublayers + 1)]
    trace: dict[str, Any] = {"gates": gates}
    pred = model.velocity(interpolate(x, noise, tt), tt, y, trace=trace)
    loss = (pred - velocity_target(x, noise)).square().mean()
    loss.backward()
    with torch.no_grad():
        return summarize_pass(
            config, loss.item(), trace["inputs"], [h.grad for h in trace["inputs"]],
            trace["weights"], [g.grad.item() for g in gates])
