"""NumPy in, NumPy out: this backend's numerics as the conformance suite checks them
(``dar_core.backend.Numerics``). ``float64`` runs the whole model in double precision, which
makes torch the suite's gradient oracle; ``bfloat16`` is autocast over float32 weights.
``device`` is any name ``resolve_device`` takes (``"cpu"``, ``"cuda"``, ``"mps"``)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from dar_core.backend import check_numerics_dtype
from dar_core.spec.config import ModelConfig
from dar_core.spec.interpolant import interpolate, velocity_target

from .device import resolve_device
from .model import DARTransformer
from .routing import History

DTYPES = ("float32", "bfloat16", "float64")


def strict_float32() -> dict[str, object]:
    """Make float32 mean float32: no TF32 in CUDA matmuls and convolutions (torch's matmul
    default is off, cuDNN's convolution default is on). Returns the flags as set."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return {"torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "torch.get_float32_matmul_precision": torch.get_float32_matmul_precision()}


def _setup(config: ModelConfig, weights: dict, dtype: str, device: str):
    check_numerics_dtype(dtype, DTYPES)
    dev = resolve_device(device)
    tdt = torch.float64 if dtype == "float64" else torch.float32
    model = DARTransformer(config).to(tdt)
    ndt = np.float64 if dtype == "float64" else np.float32
    model.load_weights({k: np.asarray(v, ndt) for k, v in weights.items()})
    ctx = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16"
           else contextlib.nullcontext())
    return model.to(dev), tdt, dev, ctx


def forward(config: ModelConfig, weights: dict, x: np.ndarray, t: np.ndarray, y: np.ndarray,
            dtype: str = "float32", device: str = "cpu") -> np.ndarray:
    """The checked public forward: velocity ``[B, C, H, W]`` (float32, float64 for float64)."""
    model, tdt, dev, ctx = _setup(config, weights, dtype, device)
    with torch.no_grad(), ctx:
        out = model(torch.tensor(x, dtype=tdt, device=dev), torch.tensor(t, dtype=tdt, device=dev),
                    torch.tensor(y, device=dev))
    return out.to(tdt).cpu().numpy()


def loss_and_grads(config: ModelConfig, weights: dict, batch: dict, dtype: str = "float32",
                   device: str = "cpu") -> tuple[float, dict[str, np.ndarray]]:
    """The velocity loss at fixed ``(x, noise, t, y)`` and the float64 NumPy gradient of every
    trainable parameter."""
    model, tdt, dev, ctx = _setup(config, weights, dtype, device)
    x, noise, t = (torch.tensor(batch[k], dtype=tdt, device=dev) for k in ("x", "noise", "t"))
    with ctx:
        pred = model(interpolate(x, noise, t), t, torch.tensor(batch["y"], device=dev))
    loss = (pred.to(tdt) - velocity_target(x, noise)).square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.double().cpu().numpy() for n, p in model.named_parameters()}


def route(v: np.ndarray, q: np.ndarray, w: np.ndarray, g: np.ndarray, dtype: str = "float32",
          device: str = "cpu") -> tuple[np.ndarray, ...]:
    """One aggregator of the backend's ``History`` over all ``N`` sources ``v [N, B, T, d]``,
    with cotangent ``g`` on its output: ``(h, alpha [N, B, T], dv, dq, dw)``."""
    check_numerics_dtype(dtype, ("float32", "float64"))
    dev = resolve_device(device)
    tdt = torch.float64 if dtype == "float64" else torch.float32

    def leaf(a):
        return torch.tensor(a, dtype=tdt, device=dev, requires_grad=True)

    vs, qq, ww = [leaf(a) for a in v], leaf(q), leaf(w)
    state = History(vs[0], [(slice(0, len(vs)),)], 1e-6)
    for a in vs[1:]:
        state.write(a)
    h = state.read(0, qq, ww)
    (h * torch.tensor(g, dtype=tdt, device=dev)).sum().backward()
    host = lambda a: a.detach().cpu().numpy()  # noqa: E731
    return (host(h), host(state.weights[0]), np.stack([host(a.grad) for a in vs]),
            host(qq.grad), host(ww.grad))
