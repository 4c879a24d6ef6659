"""NumPy in, NumPy out: this backend's numerics as the conformance suite checks them
(``dar_core.backend.Numerics``). ``float64`` runs the whole model in double precision, which
makes torch the suite's gradient oracle; ``bfloat16`` is autocast over float32 weights."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from dar_core.backend import check_numerics_dtype
from dar_core.spec.config import ModelConfig
from dar_core.spec.interpolant import interpolate, velocity_target

from .model import DARTransformer
from .routing import History

DTYPES = ("float32", "bfloat16", "float64")


def _setup(config: ModelConfig, weights: dict, dtype: str):
    check_numerics_dtype(dtype, DTYPES)
    tdt = torch.float64 if dtype == "float64" else torch.float32
    model = DARTransformer(config).to(tdt)
    ndt = np.float64 if dtype == "float64" else np.float32
    model.load_weights({k: np.asarray(v, ndt) for k, v in weights.items()})
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
           else contextlib.nullcontext())
    return model, tdt, ctx


def forward(config: ModelConfig, weights: dict, x: np.ndarray, t: np.ndarray, y: np.ndarray,
            dtype: str = "float32") -> np.ndarray:
    """The checked public forward: velocity ``[B, C, H, W]`` (float32, float64 for float64)."""
    model, tdt, ctx = _setup(config, weights, dtype)
    with torch.no_grad(), ctx:
        out = model(torch.tensor(x, dtype=tdt), torch.tensor(t, dtype=tdt), torch.tensor(y))
    return out.to(tdt).numpy()


def loss_and_grads(config: ModelConfig, weights: dict, batch: dict,
                   dtype: str = "float32") -> tuple[float, dict[str, np.ndarray]]:
    """The velocity loss at fixed ``(x, noise, t, y)`` and the float64 NumPy gradient of every
    trainable parameter."""
    model, tdt, ctx = _setup(config, weights, dtype)
    x, noise, t = (torch.tensor(batch[k], dtype=tdt) for k in ("x", "noise", "t"))
    with ctx:
        pred = model(interpolate(x, noise, t), t, torch.tensor(batch["y"]))
    loss = (pred.to(tdt) - velocity_target(x, noise)).square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.double().numpy() for n, p in model.named_parameters()}


def route(v: np.ndarray, q: np.ndarray, w: np.ndarray, g: np.ndarray,
          dtype: str = "float32") -> tuple[np.ndarray, ...]:
    """One aggregator of the backend's ``History`` over all ``N`` sources ``v [N, B, T, d]``,
    with cotangent ``g`` on its output: ``(h, alpha [N, B, T], dv, dq, dw)``."""
    check_numerics_dtype(dtype, ("float32", "float64"))
    tdt = torch.float64 if dtype == "float64" else torch.float32
    vs = [torch.tensor(a, dtype=tdt, requires_grad=True) for a in v]
    qq, ww = (torch.tensor(a, dtype=tdt, requires_grad=True) for a in (q, w))
    state = History(vs[0], [(slice(0, len(vs)),)], 1e-6)
    for a in vs[1:]:
        state.write(a)
    h = state.read(0, qq, ww)
    (h * torch.tensor(g, dtype=tdt)).sum().backward()
    return (h.detach().numpy(), state.weights[0].numpy(), np.stack([a.grad.numpy() for a in vs]),
            qq.grad.numpy(), ww.grad.numpy())
