"""One generic adapter over the backend contract (``dar_core.backend.Backend``): the only module
of the suite that touches a backend, and it knows none by name.

Each adapter takes NumPy in and gives NumPy out, so the checks are written once:

- ``forward``, ``loss_and_grads``, ``route`` and ``dtypes``: the backend's ``numerics`` module
  (``dar_core.backend.Numerics``);
- ``velocity_model(cfg, weights)`` and ``train(tc)``: the backend contract itself,

all on the device of the chosen kind (``DAR_CONFORMANCE_DEVICE``: ``cpu``, ``cuda``, ``tpu`` or
``gpu``, Apple's; ``DEVICES`` names it per backend). Building an adapter sets the framework's
flags for true float32 (``strict_float32``: no TF32, XLA ``highest``) and keeps them for the
report, so the suite never inherits whatever precision the user's process had set.

``dtype`` is ``"float32"``, ``"bfloat16"`` (compute in bf16, float32 master weights) or, for
backends that can be a float64 oracle, ``"float64"``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dar_core.backend import BACKENDS, Backend, Numerics, is_installed, load_backend
from dar_core.errors import ConfigError
from dar_core.spec.schema import NON_TRAINABLE

# Device kind -> each backend's name for it (a backend missing from a kind has no such device).
DEVICES = {
    "cpu": {"torch": "cpu", "jax": "cpu", "mlx": "cpu"},
    "cuda": {"torch": "cuda", "jax": "gpu"},
    "tpu": {"jax": "tpu"},
    "gpu": {"torch": "mps", "mlx": "gpu"},  # Apple silicon: Metal
}


def requested_device() -> str:
    """``DAR_CONFORMANCE_DEVICE`` (default ``cpu``)."""
    kind = os.environ.get("DAR_CONFORMANCE_DEVICE", "cpu").strip() or "cpu"
    if kind not in DEVICES:
        raise ValueError(f"DAR_CONFORMANCE_DEVICE must be one of {list(DEVICES)}, got {kind!r}")
    return kind


def requested_backends() -> list[str]:
    """``DAR_BACKENDS`` (comma-separated) or every backend."""
    env = os.environ.get("DAR_BACKENDS", "").strip()
    names = [b.strip() for b in env.split(",") if b.strip()] if env else list(BACKENDS)
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise ValueError(f"DAR_BACKENDS names unknown backend(s) {bad}; known: {list(BACKENDS)}")
    return names


class Unavailable(Exception):
    """A backend or device this machine does not have; the message says which and why."""


class Adapter:
    """A backend seen through its contract, on one device."""

    def __init__(self, name: str, kind: str = "cpu") -> None:
        if not is_installed(name):
            raise Unavailable(f"backend {name!r} is not installed "
                              f"(pip install 'dar-core[{name}]')")
        device = DEVICES[kind].get(name)
        if device is None:
            raise Unavailable(f"backend {name!r} has no {kind!r} device")
        backend = load_backend(name)
        if not isinstance(backend, Backend) or not isinstance(backend.numerics, Numerics):
            raise TypeError(f"dar_core.backends.{name} does not satisfy the backend contract")
        try:
            self.resolved = str(backend.resolve_device(device))
        except ConfigError as e:
            raise Unavailable(f"{name}: {e}") from e
        self.name, self.kind, self.device = name, kind, device
        self.backend, self.numerics = backend, backend.numerics
        self.dtypes = backend.numerics.DTYPES
        self.flags = backend.numerics.strict_float32()

    def forward(self, cfg, params, x, t, y, dtype="float32") -> np.ndarray:
        return self.numerics.forward(cfg, params, x, t, y, dtype, self.device)

    def loss_and_grads(self, cfg, params, batch, dtype="float32"):
        return self.numerics.loss_and_grads(cfg, params, batch, dtype, self.device)

    def route(self, v, q, w, g, dtype="float32"):
        return self.numerics.route(v, q, w, g, dtype, self.device)

    def velocity_model(self, cfg, weights):
        return self.backend.velocity_model(cfg, weights, device=self.device)

    def train(self, tc):
        return self.backend.train(dataclasses.replace(tc, device=self.device))


def load(name: str, kind: str = "cpu") -> Adapter | Unavailable:
    """The adapter, or the reason it cannot be built here."""
    try:
        return Adapter(name, kind)
    except Unavailable as e:
        return e


def trainable(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in grads.items() if k not in NON_TRAINABLE}
