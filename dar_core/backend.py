"""The backend contract, and finding and loading backends without importing a framework
until one is asked for.

Each backend package ``dar_core.backends.<name>`` satisfies :class:`Backend`; a test checks
every installed backend against it (names and signatures).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dar_core.errors import ConfigError

BACKENDS = ("torch", "jax", "mlx")
PRECISIONS = ("fp32", "bf16")  # compute precision; weights and the routing math stay float32


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ConfigError`` naming it."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision
_FRAMEWORK = {"torch": "torch", "jax": "jax", "mlx": "mlx.core"}


@dataclass
class VelocityModel:
    """What the core samplers need from a backend: ``velocity(x, t: float, y)`` over backend
    arrays, and conversions from/to NumPy."""

    velocity: Callable[[Any, float, Any], Any]
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]


@runtime_checkable
class Backend(Protocol):
    """What every ``dar_core.backends.<name>`` module offers, under the same names and
    signatures in torch, JAX and MLX. Every error it raises on bad input is a ``DARError``.

    - ``DARTransformer``: the model; parameters under the canonical names of
      ``dar_core.spec.schema`` (DiT/SiT's names plus the routers).
    - ``train(tc)``: the full training loop (resume, EMA, NaN stop, launcher-aware data
      parallel); returns the run folder.
    - ``velocity_model(config, weights, precision, device)``: a :class:`VelocityModel` for the
      core samplers, inputs validated on every call.
    - ``resolve_device(device)``: ``"auto"`` or a device name -> the framework's device;
      ``ConfigError`` for a name the framework does not have on this machine.
    - ``compute_dtype(precision)``: ``"fp32"`` / ``"bf16"`` -> the framework's dtype;
      ``ConfigError`` otherwise.
    """

    DARTransformer: type

    def train(self, tc: Any) -> Path: ...

    def velocity_model(self, config: Any, weights: dict[str, np.ndarray],
                       precision: str = "fp32", device: Any = "auto") -> VelocityModel: ...

    def resolve_device(self, device: Any = "auto") -> Any: ...

    def compute_dtype(self, precision: str) -> Any: ...


def is_installed(name: str) -> bool:
    """Whether the backend's framework is importable (checked without importing it)."""
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    top = _FRAMEWORK[name].split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None and (
            "." not in _FRAMEWORK[name] or importlib.util.find_spec(_FRAMEWORK[name]) is not None)
    except (ImportError, ValueError):
        return False


def installed_backends() -> list[str]:
    return [b for b in BACKENDS if is_installed(b)]


def load_backend(name: str) -> Any:
    """Import ``dar_core.backends.<name>`` (``"auto"``: the first installed of torch, jax, mlx)."""
    if name == "auto":
        found = installed_backends()
        if not found:
            raise ConfigError(
                "no backend installed: pip install 'dar-core[torch]' (or [jax], [mlx])")
        name = found[0]
    if not is_installed(name):
        raise ConfigError(f"backend {name!r} is not installed: pip install 'dar-core[{name}]'")
    return importlib.import_module(f"dar_core.backends.{name}")
