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


class GatedTrace:
    """The routing state of one diagnostics pass, wrapped: every source ``v_i`` is multiplied
    by a measurement-only gate ``g_i`` (of 1, so the function is unchanged and ``dLoss/dg_i``
    is the source's importance), and every aggregated input is kept with its gradient."""

    def __init__(self, state: Any, gates: list[torch.Tensor]):
        self.state, self.gates = state, gates
        self.inputs: list[torch.Tensor] = []
        self.written = 1  # v_0 was gated before the state was built

    @property
    def newest(self) -> torch.Tensor:
        return self.state.newest

    @property
    def weights(self) -> list[torch.Tensor]:
        return self.state.weights

    def write(self, v: torch.Tensor) -> None:
        self.state.write(v * self.gates[self.written])
        self.written += 1

    def read(self, k: int, *args: Any) -> torch.Tensor:
        h = self.state.read(k, *args)  # [B, T, d]
        self.inputs.append(h)
        if h.requires_grad:
            h.retain_grad()
        return h


def gated_velocity(model: DARTransformer, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   gates: list[torch.Tensor]) -> tuple[torch.Tensor, GatedTrace]:
    """``model.velocity`` with the ``L + 1`` sources gated by ``gates``; returns the output and
    the trace (aggregated inputs, routing weights)."""
    traces: list[GatedTrace] = []

    def state_factory(v0: torch.Tensor) -> GatedTrace:
        traces.append(GatedTrace(model.new_state(v0 * gates[0]), gates))
        return traces[-1]

    return model.velocity(x, t, y, state_factory=state_factory), traces[0]


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
    pred, trace = gated_velocity(model, interpolate(x, noise, tt), tt, y, gates)
    loss = (pred - velocity_target(x, noise)).square().mean()
    loss.backward()
    with torch.no_grad():
        return summarize_pass(
            config, loss.item(), trace.inputs, [h.grad for h in trace.inputs],
            trace.weights, [g.grad.item() for g in gates])
