"""NumPy in, NumPy out: this backend's numerics as the conformance suite checks them
(``dar_core.backend.Numerics``). ``bfloat16`` is the model's bf16 compute dtype over float32
weights (routing softmax, LayerNorm statistics and the loss in float32). ``device`` is
``"cpu"`` or ``"gpu"`` (Metal), set as MLX's default device."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from dar_core.backend import check_numerics_dtype
from dar_core.spec.config import ModelConfig

from .device import resolve_device
from .model import DARTransformer
from .routing import route as route_op
from .trainer import loss_fn

DTYPES = ("float32", "bfloat16")


def strict_float32() -> dict[str, object]:
    """MLX has no reduced-precision float32 mode to switch off: float32 matmuls are float32 on
    the CPU and on Metal. Nothing is set; the report records that."""
    return {"mlx float32 matmul": "float32 (no TF32-like mode exists)"}


def _model(config: ModelConfig, weights: dict, dtype: str, device: str) -> DARTransformer:
    check_numerics_dtype(dtype, DTYPES)
    resolve_device(device)
    compute = mx.bfloat16 if dtype == "bfloat16" else mx.float32
    return DARTransformer(config, dtype=compute).load_weights(
        {k: np.asarray(v, np.float32) for k, v in weights.items()})


def forward(config: ModelConfig, weights: dict, x: np.ndarray, t: np.ndarray, y: np.ndarray,
            dtype: str = "float32", device: str = "cpu") -> np.ndarray:
    """The checked public forward: velocity ``[B, C, H, W]`` float32."""
    out = _model(config, weights, dtype, device)(x.astype(np.float32), t.astype(np.float32), y)
    return np.array(out.astype(mx.float32))


def loss_and_grads(config: ModelConfig, weights: dict, batch: dict, dtype: str = "float32",
                   device: str = "cpu") -> tuple[float, dict[str, np.ndarray]]:
    """The trainer's loss at fixed ``(x, noise, t, y)`` and the float64 NumPy gradient of
    every trainable parameter."""
    model = _model(config, weights, dtype, device)
    x, noise, t = (mx.array(batch[k].astype(np.float32)) for k in ("x", "noise", "t"))
    loss, grads = nn.value_and_grad(model, loss_fn)(
        model, x, t, mx.array(batch["y"].astype(np.int32)), noise)
    return loss.item(), {k: np.array(v.astype(mx.float32), np.float64)
                         for k, v in dict(tree_flatten(grads)).items()}


def route(v: np.ndarray, q: np.ndarray, w: np.ndarray, g: np.ndarray, dtype: str = "float32",
          device: str = "cpu") -> tuple[np.ndarray, ...]:
    """The backend's routing op over ``N`` sources ``v [N, B, T, d]``, with cotangent ``g`` on
    its output: ``(h, alpha [N, B, T], dv, dq, dw)``."""
    check_numerics_dtype(dtype, ("float32",))
    resolve_device(device)
    vs = [mx.array(a.astype(np.float32)) for a in v]
    qq, ww, gg = (mx.array(a.astype(np.float32)) for a in (q, w, g))

    def f(vs, qq, ww):
        return mx.sum(route_op(vs, qq, ww)[0] * gg)

    dv, dq, dw = mx.grad(f, argnums=(0, 1, 2))(vs, qq, ww)
    h, alpha = route_op(vs, qq, ww)  # alpha: [B, T, N]
    return (np.array(h), np.moveaxis(np.array(alpha), -1, 0), np.stack([np.array(a) for a in dv]),
            np.array(dq), np.array(dw))
