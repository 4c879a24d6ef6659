"""NumPy in, NumPy out: this backend's numerics as the conformance suite checks them
(``dar_core.backend.Numerics``). ``bfloat16`` computes with bfloat16 copies of the float32
weights (statistics, softmaxes and routing logits in float32). ``device`` is any name
``resolve_device`` takes (``"cpu"``, ``"gpu"``, ``"tpu"``); the work runs under
``jax.default_device`` of it."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from dar_core.backend import check_numerics_dtype
from dar_core.spec.config import ModelConfig

from .device import resolve_device
from .model import DARTransformer, cast, forward_jit
from .routing import route as route_op
from .trainer import loss_fn

DTYPES = ("float32", "bfloat16")
_calls = [0]


def strict_float32() -> dict[str, object]:
    """Make float32 mean float32: XLA's default matmul precision on TPU (and TF32 on recent
    NVIDIA GPUs) passes float32 matmuls through lower-precision units; ``highest`` does not.
    Returns the flag as set."""
    jax.config.update("jax_default_matmul_precision", "highest")
    return {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision}


@contextlib.contextmanager
def _on(device: str):
    with jax.default_device(resolve_device(device)):
        yield


def _params(config: ModelConfig, weights: dict, dtype: str) -> dict:
    check_numerics_dtype(dtype, DTYPES)
    # Every drawn config compiles new executables; thousands of them (the thorough profile)
    # grow the process by gigabytes and crashed XLA's compiler once. Drop them now and then:
    # a config is rarely drawn twice.
    _calls[0] += 1
    if _calls[0] % 64 == 0:
        jax.clear_caches()
    return DARTransformer(config).load_weights({k: np.asarray(v, np.float32)
                                                for k, v in weights.items()})


def forward(config: ModelConfig, weights: dict, x: np.ndarray, t: np.ndarray, y: np.ndarray,
            dtype: str = "float32", device: str = "cpu") -> np.ndarray:
    """The checked public forward (float32), or the jitted forward on bfloat16 weights."""
    with _on(device):
        return _forward(config, weights, x, t, y, dtype)


def _forward(config, weights, x, t, y, dtype) -> np.ndarray:
    p = _params(config, weights, dtype)
    if dtype == "bfloat16":
        out = forward_jit(cast(p, jnp.bfloat16), config, jnp.asarray(x, jnp.bfloat16),
                          jnp.asarray(t, jnp.float32), jnp.asarray(y))
    else:
        out = DARTransformer(config)(p, x.astype(np.float32), t.astype(np.float32), y)
    return np.asarray(out, dtype=np.float32)


def loss_and_grads(config: ModelConfig, weights: dict, batch: dict, dtype: str = "float32",
                   device: str = "cpu") -> tuple[float, dict[str, np.ndarray]]:
    """The trainer's loss at fixed ``(x, noise, t, y)`` and the float64 NumPy gradient of
    every trainable parameter."""
    with _on(device):
        return _loss_and_grads(config, weights, batch, dtype)


def _loss_and_grads(config, weights, batch, dtype) -> tuple[float, dict[str, np.ndarray]]:
    p = _params(config, weights, dtype)
    buffers = {"pos_embed": p.pop("pos_embed")}
    b = {k: jnp.asarray(batch[k].astype(np.float32)) for k in ("x", "noise", "t")}
    b["y"] = jnp.asarray(batch["y"])
    cdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    loss, grads = jax.value_and_grad(loss_fn)(p, buffers, b, config, cdt)
    return float(loss), {k: np.asarray(v, np.float64) for k, v in grads.items()}


def route(v: np.ndarray, q: np.ndarray, w: np.ndarray, g: np.ndarray, dtype: str = "float32",
          device: str = "cpu") -> tuple[np.ndarray, ...]:
    """The backend's routing op over ``N`` sources ``v [N, B, T, d]``, with cotangent ``g`` on
    its output: ``(h, alpha [N, B, T], dv, dq, dw)``."""
    check_numerics_dtype(dtype, ("float32",))
    with _on(device):
        vs = [jnp.asarray(a, jnp.float32) for a in v]
        qq, ww, gg = (jnp.asarray(a, jnp.float32) for a in (q, w, g))
        (h, alpha), vjp = jax.vjp(route_op, vs, qq, ww)
        dv, dq, dw = vjp((gg, jnp.zeros_like(alpha)))
    return (np.asarray(h), np.asarray(alpha), np.stack([np.asarray(a) for a in dv]),
            np.asarray(dq), np.asarray(dw))
