"""One generic adapter over the backend contract (``dar_core.backend.Backend``): the only module
of the suite that touches a backend, and it knows none by name.

Each adapter takes NumPy in and gives NumPy out, so the checks are written once:

- ``forward``, ``loss_and_grads``, ``route`` and ``dtypes``: the backend's ``numerics`` module
  (``dar_core.backend.Numerics``);
- ``velocity_model(cfg, weights)`` and ``train(tc)``: the backend contract itself, on the CPU.

``dtype`` is ``"float32"``, ``"bfloat16"`` (compute in bf16, float32 master weights) or, for
backends that can be a float64 oracle, ``"float64"``.
"""

from __future__ import annotations

import os

import numpy as np

from dar_core.backend import BACKENDS, Backend, Numerics, is_installed, load_backend
from dar_core.spec.schema import NON_TRAINABLE


def requested_backends() -> list[str]:
    """``DAR_BACKENDS`` (comma-separated) or every backend."""
    env = os.environ.get("DAR_BACKENDS", "").strip()
    names = [b.strip() for b in env.split(",") if b.strip()] if env else list(BACKENDS)
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise ValueError(f"DAR_BACKENDS names unknown backend(s) {bad}; known: {list(BACKENDS)}")
    return names


class Adapter:
    """A backend seen through its contract."""

    def __init__(self, name: str) -> None:
        backend = load_backend(name)
        if not isinstance(backend, Backend) or not isinstance(backend.numerics, Numerics):
            raise TypeError(f"dar_core.backends.{name} does not satisfy the backend contract")
        self.name, self.backend, self.numerics = name, backend, backend.numerics
        self.dtypes = backend.numerics.DTYPES

    def forward(self, cfg, params, x, t, y, dtype="float32") -> np.ndarray:
        return self.numerics.forward(cfg, params, x, t, y, dtype)

    def loss_and_grads(self, cfg, params, batch, dtype="float32"):
        return self.numerics.loss_and_grads(cfg, params, batch, dtype)

    def route(self, v, q, w, g, dtype="float32"):
        return self.numerics.route(v, q, w, g, dtype)

    def velocity_model(self, cfg, weights):
        return self.backend.velocity_model(cfg, weights, device="cpu")

    def train(self, tc):
        return self.backend.train(tc)


def load(name: str) -> Adapter | None:
    """The adapter, or None when the backend's framework is not installed."""
    return Adapter(name) if is_installed(name) else None


def trainable(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in grads.items() if k not in NON_TRAINABLE}
