"""One adapter per backend: the only module that imports every backend.

Each adapter takes NumPy in and gives NumPy out, so the checks are written once:

- ``forward(cfg, params, x, t, y, dtype)``: velocity through the public model;
- ``loss_and_grads(cfg, params, batch, dtype)``: the training loss at fixed (x, noise, t, y)
  and the gradient of every trainable parameter;
- ``route(v, q, w, g, dtype)``: the backend's efficient routing op on ``N`` sources
  ``v [N, B, T, d]`` (query ``q``, norm weight ``w``) with cotangent ``g`` on the output:
  ``(h, alpha, dv, dq, dw)``;
- ``velocity_model(cfg, weights)`` and ``train(tc)``: the backend contract itself.

``dtype`` is ``"float32"``, ``"bfloat16"`` (compute in bf16, float32 master weights) or, for
backends that can be a float64 oracle, ``"float64"``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from dar_core.backend import BACKENDS
from dar_core.spec.config import ModelConfig
from dar_core.spec.interpolant import interpolate, velocity_target
from dar_core.spec.schema import NON_TRAINABLE


def _installed(name: str) -> bool:
    mod = {"torch": "torch", "jax": "jax", "mlx": "mlx"}[name]
    return importlib.util.find_spec(mod) is not None


def requested_backends() -> list[str]:
    """``DAR_BACKENDS`` (comma-separated) or every backend."""
    env = os.environ.get("DAR_BACKENDS", "").strip()
    names = [b.strip() for b in env.split(",") if b.strip()] if env else list(BACKENDS)
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise ValueError(f"DAR_BACKENDS names unknown backend(s) {bad}; known: {list(BACKENDS)}")
    return names


class TorchAdapter:
    name = "torch"
    dtypes = ("float32", "bfloat16", "float64")

    def __init__(self) -> None:
        import torch

        from dar_core.backends import torch as bt

        self.torch, self.bt = torch, bt

    def _model(self, cfg: ModelConfig, params: dict, dtype: str):
        torch = self.torch
        m = self.bt.DARTransformer(cfg)
        if dtype == "float64":
            m = m.double()
            m.load_weights({k: np.asarray(v, np.float64) for k, v in params.items()})
        else:
            m.load_weights({k: np.asarray(v, np.float32) for k, v in params.items()})
        return m, (torch.float64 if dtype == "float64" else torch.float32)

    def _ctx(self, dtype: str):
        import contextlib

        if dtype == "bfloat16":
            return self.torch.autocast("cpu", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, cfg, params, x, t, y, dtype="float32"):
        torch = self.torch
        m, tdt = self._model(cfg, params, dtype)
        with torch.no_grad(), self._ctx(dtype):
            out = m(torch.tensor(x, dtype=tdt), torch.tensor(t, dtype=tdt), torch.tensor(y))
        return out.float().numpy() if dtype != "float64" else out.numpy()

    def loss_and_grads(self, cfg, params, batch, dtype="float32"):
        torch = self.torch
        m, tdt = self._model(cfg, params, dtype)
        x, noise, t = (torch.tensor(batch[k], dtype=tdt) for k in ("x", "noise", "t"))
        with self._ctx(dtype):
            pred = m(interpolate(x, noise, t), t, torch.tensor(batch["y"]))
        loss = (pred.to(tdt) - velocity_target(x, noise)).square().mean()
        loss.backward()
        grads = {n: p.grad.double().numpy() for n, p in m.named_parameters()}
        return loss.item(), grads

    def route(self, v, q, w, g, dtype="float32"):
        torch = self.torch
        from dar_core.backends.torch.routing import History

        tdt = torch.float64 if dtype == "float64" else torch.float32
        vs = [torch.tensor(a, dtype=tdt, requires_grad=True) for a in v]
        qq = torch.tensor(q, dtype=tdt, requires_grad=True)
        ww = torch.tensor(w, dtype=tdt, requires_grad=True)
        n = len(vs)
        hist = History(vs[0], n - 1, [(slice(0, n),)], 1e-6)
        for a in vs[1:]:
            hist.write(a)
        h = hist.read(0, qq, ww)
        (h * torch.tensor(g, dtype=tdt)).sum().backward()
        dv = np.stack([a.grad.numpy() for a in vs])
        return (h.detach().numpy(), hist.weights[0].numpy(), dv, qq.grad.numpy(),
                ww.grad.numpy())

    def velocity_model(self, cfg, weights):
        return self.bt.velocity_model(cfg, weights, device="cpu")

    def train(self, tc):
        return self.bt.train(tc)


class MlxAdapter:
    name = "mlx"
    dtypes = ("float32", "bfloat16")

    def __init__(self) -> None:
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        from dar_core.backends import mlx as bm
        from dar_core.backends.mlx import routing as mr
        from dar_core.backends.mlx import trainer as mt


        self.mx, self.nn, self.flatten, self.bm, self.mr, self.mt = mx, nn, tree_flatten, bm, mr, mt

    def _model(self, cfg, params, dtype):
        mx = self.mx
        return self.bm.DARTransformer(cfg, dtype=mx.bfloat16 if dtype == "bfloat16"
                                      else mx.float32).load_weights(
            {k: np.asarray(v, np.float32) for k, v in params.items()})

    def forward(self, cfg, params, x, t, y, dtype="float32"):
        out = self._model(cfg, params, dtype)(x.astype(np.float32), t.astype(np.float32), y)
        return np.array(out.astype(self.mx.float32))

    def loss_and_grads(self, cfg, params, batch, dtype="float32"):
        mx = self.mx
        model = self._model(cfg, params, dtype)
        x, noise, t = (mx.array(batch[k].astype(np.float32)) for k in ("x", "noise", "t"))
        loss, grads = self.nn.value_and_grad(model, self.mt.loss_fn)(
            model, x, t, mx.array(batch["y"].astype(np.int32)), noise)
        flat = dict(self.flatten(grads))
        return loss.item(), {k: np.array(v.astype(mx.float32), np.float64)
                             for k, v in flat.items()}

    def route(self, v, q, w, g, dtype="float32"):
        mx = self.mx
        vs = [mx.array(a.astype(np.float32)) for a in v]
        qq, ww, gg = (mx.array(a.astype(np.float32)) for a in (q, w, g))

        def f(vs, qq, ww):
            h, _ = self.mr.route(vs, qq, ww)
            return mx.sum(h * gg)

        (dv, dq, dw) = mx.grad(f, argnums=(0, 1, 2))(vs, qq, ww)
        h, alpha = self.mr.route(vs, qq, ww)  # alpha: [B, T, N]
        return (np.array(h), np.moveaxis(np.array(alpha), -1, 0), np.stack([np.array(a)
                for a in dv]), np.array(dq), np.array(dw))

    def velocity_model(self, cfg, weights):
        return self.bm.velocity_model(cfg, weights, device="cpu")

    def train(self, tc):
        return self.bm.train(tc)


class JaxAdapter:
    name = "jax"
    dtypes = ("float32", "bfloat16")

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        from dar_core.backends import jax as bj
        from dar_core.backends.jax import model as jm
        from dar_core.backends.jax import routing as jr
        from dar_core.backends.jax import trainer as jt

        self.jax, self.jnp, self.bj, self.jm, self.jr, self.jt = jax, jnp, bj, jm, jr, jt
        self.calls = 0

    def _params(self, cfg, params):
        # Every drawn config compiles new executables; thousands of them (the thorough
        # profile) grow the process by gigabytes and crashed XLA's compiler once. Drop them
        # now and then: a config is rarely drawn twice.
        self.calls += 1
        if self.calls % 64 == 0:
            self.jax.clear_caches()
        return self.bj.DARTransformer(cfg).load_weights({k: np.asarray(v, np.float32)
                                                 for k, v in params.items()})

    def forward(self, cfg, params, x, t, y, dtype="float32"):
        jnp = self.jnp
        p = self._params(cfg, params)
        if dtype == "bfloat16":
            out = self.jm.forward_jit(self.jm.cast(p, jnp.bfloat16), cfg,
                                      jnp.asarray(x, jnp.bfloat16), jnp.asarray(t, jnp.float32),
                                      jnp.asarray(y))
        else:
            out = self.bj.DARTransformer(cfg)(p, x.astype(np.float32), t.astype(np.float32), y)
        return np.asarray(out, dtype=np.float32)

    def loss_and_grads(self, cfg, params, batch, dtype="float32"):
        jnp = self.jnp
        p = self._params(cfg, params)
        buffers = {"pos_embed": p.pop("pos_embed")}
        b = {k: jnp.asarray(batch[k].astype(np.float32)) for k in ("x", "noise", "t")}
        b["y"] = jnp.asarray(batch["y"])
        cdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        loss, grads = self.jax.value_and_grad(self.jt.loss_fn)(p, buffers, b, cfg, cdt)
        return float(loss), {k: np.asarray(v, np.float64) for k, v in grads.items()}

    def route(self, v, q, w, g, dtype="float32"):
        jnp = self.jnp
        vs = [jnp.asarray(a, jnp.float32) for a in v]
        qq, ww, gg = (jnp.asarray(a, jnp.float32) for a in (q, w, g))
        (h, alpha), vjp = self.jax.vjp(self.jr.route, vs, qq, ww)
        dv, dq, dw = vjp((gg, jnp.zeros_like(alpha)))
        return (np.asarray(h), np.asarray(alpha), np.stack([np.asarray(a) for a in dv]),
                np.asarray(dq), np.asarray(dw))

    def velocity_model(self, cfg, weights):
        return self.bj.velocity_model(cfg, weights, device="cpu")

    def train(self, tc):
        return self.bj.train(tc)


ADAPTERS: dict[str, Any] = {"torch": TorchAdapter, "jax": JaxAdapter, "mlx": MlxAdapter}


def load(name: str):
    """The adapter, or None when the backend's framework is not installed."""
    if not _installed(name):
        return None
    return ADAPTERS[name]()


def trainable(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in grads.items() if k not in NON_TRAINABLE}
