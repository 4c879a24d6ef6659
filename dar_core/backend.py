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


def check_numerics_dtype(dtype: Any, supported: tuple[str, ...]) -> str:
    """``dtype`` if the backend's numerics support it, else a ``ConfigError`` naming it."""
    if dtype not in supported:
        raise ConfigError(f"dtype must be one of {list(supported)} here, got {dtype!r}")
    return dtype


_FRAMEWORK = {"torch": "torch", "jax": "jax", "mlx": "mlx.core"}


@dataclass
class VelocityModel:
    """What the core samplers need from a backend: ``velocity(x, t: float, y)`` over backend
    arrays, and conversions from/to NumPy."""

    velocity: Callable[[Any, float, Any], Any]
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]


@runtime_checkable
class RoutingState(Protocol):
    """The routing state of one forward pass (docs/spec.md §8.2): ``History`` (efficient),
    ``NaiveHistory`` (the core's four-pass ``route`` on re-stacked sources, for tests) and
    ``ResidualStream`` (routing off) in every backend, each built as ``cls(v0, slices, eps)``
    with ``v0`` ``[B, T, d]``, ``slices`` from ``dar_core.spec.routing.source_slices`` and the
    key RMSNorm's ``eps``.

    - ``newest``: the last source written (the dynamic query's input ``v_{l-1}``);
    - ``write(v)``: append the next source ``v_l`` ``[B, T, d]``;
    - ``read(k, raw_query, norm_weight)``: the input ``[B, T, d]`` of aggregator ``k``
      (0-indexed) from its unfolded query (``dar_core.spec.routing.router_query``) and RMSNorm
      weight; ``ResidualStream`` ignores both and returns the running sum.
    """

    newest: Any

    def write(self, v: Any) -> None: ...

    def read(self, k: int, raw_query: Any, norm_weight: Any) -> Any: ...


@runtime_checkable
class Numerics(Protocol):
    """NumPy in, NumPy out: a backend's numerics as the conformance suite checks them
    (``dar_core.backends.<name>.numerics``). ``dtype`` is one of ``DTYPES``: ``"float32"``,
    ``"bfloat16"`` (bf16 compute over float32 weights), ``"float64"`` where the backend can be
    a float64 oracle; any other is a ``ConfigError``.

    - ``forward(config, weights, x, t, y, dtype)``: velocity through the checked public model;
    - ``loss_and_grads(config, weights, batch, dtype)``: the training loss at fixed
      ``(x, noise, t, y)`` and the gradient of every trainable parameter (float64 NumPy);
    - ``route(v, q, w, g, dtype)``: the backend's routing op over ``N`` sources
      ``v [N, B, T, d]`` (query ``q``, norm weight ``w``) with cotangent ``g`` on its output:
      ``(h, alpha [N, B, T], dv, dq, dw)``;
    - ``strict_float32()``: set the framework's flags so that float32 matmuls and convolutions
      are float32 on every device (no TF32, XLA ``highest``); returns the flags as set.

    Each runs on ``device`` (a name the backend's ``resolve_device`` takes, default ``"cpu"``).
    """

    DTYPES: tuple[str, ...]

    def forward(self, config: Any, weights: dict, x: np.ndarray, t: np.ndarray,
                y: np.ndarray, dtype: str = "float32", device: str = "cpu") -> np.ndarray: ...

    def loss_and_grads(self, config: Any, weights: dict, batch: dict, dtype: str = "float32",
                       device: str = "cpu") -> tuple[float, dict]: ...

    def route(self, v: np.ndarray, q: np.ndarray, w: np.ndarray, g: np.ndarray,
              dtype: str = "float32", device: str = "cpu") -> tuple: ...

    def strict_float32(self) -> dict[str, Any]: ...


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
    - ``History``, ``NaiveHistory``, ``ResidualStream``: the :class:`RoutingState` classes.
    - ``numerics``: the :class:`Numerics` module the conformance suite drives.
    """

    DARTransformer: type
    History: type
    NaiveHistory: type
    ResidualStream: type
    numerics: Any

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
