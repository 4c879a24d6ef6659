"""Finding and loading backends without importing a framework until one is asked for.

Each backend package ``dar_core.backends.<name>`` exports:

- ``DARTransformer``: the model, parameters under the canonical core names;
- ``train(tc: TrainConfig) -> Path``: the full training loop (launcher-aware), returns the run
  folder;
- ``velocity_model(config, weights, precision="fp32", device="auto") -> VelocityModel``: a
  sampling handle for the core samplers.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dar_core.errors import ConfigError

BACKENDS = ("torch", "jax", "mlx")
_FRAMEWORK = {"torch": "torch", "jax": "jax", "mlx": "mlx.core"}


@dataclass
class VelocityModel:
    """What the core samplers need from a backend: ``velocity(x, t: float, y)`` over backend
    arrays, and conversions from/to NumPy."""

    velocity: Callable[[Any, float, Any], Any]
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]


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
