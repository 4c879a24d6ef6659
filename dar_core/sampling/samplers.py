"""Samplers over a ``velocity(x, t, y)`` callable, written once for every backend.

``x`` is any array type supporting arithmetic (numpy, torch, jax, mlx); ``t`` is a Python
float in [0, 1] (0 = noise, 1 = data); ``y`` holds integer labels. Integration runs from
t = 0 to t = 1 on a uniform grid.

- ``euler`` / ``heun``: the probability-flow ODE ``dx = v dt``.
- ``sde``: Euler-Maruyama on ``dx = [v + (w_t / 2) s] dt + sqrt(w_t) dW`` with the score
  ``s = -(x - t v) / (1 - t)`` implied by the linear interpolant and ``w_t = diffusion (1 - t)``
  (so the drift stays finite at t = 1); the last step adds no noise.
- ``guided``: classifier-free guidance ``v_u + w (v_c - v_u)`` inside an optional interval of t.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from dar_core.errors import ConfigError
from dar_core.xp import namespace

Velocity = Callable[[Any, float, Any], Any]
SAMPLERS = ("euler", "heun", "sde")


def time_grid(steps: int) -> list[float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    return [i / steps for i in range(steps + 1)]


def function_evaluations(sampler: str, steps: int) -> int:
    """Velocity calls one ``sample`` makes (a guided call counts once): Heun two per step,
    Euler and the SDE one."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    return len(time_grid(steps)[1:]) * (2 if sampler == "heun" else 1)


def euler(velocity: Velocity, x: Any, y: Any, steps: int) -> Any:
    ts = time_grid(steps)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * velocity(x, t0, y)
    return x


def heun(velocity: Velocity, x: Any, y: Any, steps: int) -> Any:
    ts = time_grid(steps)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        v0 = velocity(x, t0, y)
        v1 = velocity(x + dt * v0, t1, y)
        x = x + (0.5 * dt) * (v0 + v1)
    return x


def sde(
    velocity: Velocity,
    x: Any,
    y: Any,
    steps: int,
    *,
    rng: np.random.Generator,
    asarray: Callable[[np.ndarray], Any] = lambda a: a,
    diffusion: float = 1.0,
) -> Any:
    """Euler-Maruyama. Noise comes from the NumPy ``rng`` (converted by ``asarray``) so every
    backend can be fed the same draws."""
    if not diffusion >= 0.0:
        raise ConfigError(f"diffusion must be >= 0, got {diffusion!r}")
    ts = time_grid(steps)
    shape = tuple(x.shape)
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t1 - t0
        v = velocity(x, t0, y)
        w = diffusion * (1.0 - t0)
        drift = v - (0.5 * diffusion) * (x - t0 * v)  # v + (w/2) * score, with (1-t) cancelled
        x = x + dt * drift
        if i < steps - 1:
            noise = rng.standard_normal(shape).astype(np.float32)
            x = x + math.sqrt(w * dt) * asarray(noise)
    return x


def guided(
    velocity: Velocity,
    scale: float,
    null_class: int,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Velocity:
    """Classifier-free guidance: one batched call on ``[x, x]`` with ``[y, null]`` labels.

    Guidance applies for ``t`` in ``interval`` (inclusive); outside it the conditional
    velocity is used alone. ``scale = 1`` is plain conditional sampling.
    """
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {interval!r}")
    if scale == 1.0:
        return velocity

    def v(x: Any, t: float, y: Any) -> Any:
        if not lo <= t <= hi:
            return velocity(x, t, y)
        xp = namespace(x)
        n = x.shape[0]
        out = velocity(xp.concat([x, x], axis=0), t, xp.concat([y, y * 0 + null_class], axis=0))
        v_c, v_u = out[:n], out[n:]
        return v_u + scale * (v_c - v_u)

    return v


def sample(
    velocity: Velocity,
    noise: Any,
    y: Any,
    *,
    sampler: str = "heun",
    steps: int = 50,
    cfg_scale: float = 1.0,
    null_class: int | None = None,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    rng: np.random.Generator | None = None,
    asarray: Callable[[np.ndarray], Any] = lambda a: a,
) -> Any:
    """Integrate from ``noise`` (t = 0) to data (t = 1) with the named sampler."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if cfg_scale != 1.0:
        if null_class is None:
            raise ConfigError("cfg_scale != 1 needs null_class (the model's num_classes)")
        velocity = guided(velocity, cfg_scale, null_class, guidance_interval)
    if sampler == "euler":
        return euler(velocity, noise, y, steps)
    if sampler == "heun":
        return heun(velocity, noise, y, steps)
    return sde(velocity, noise, y, steps, rng=rng or np.random.default_rng(0), asarray=asarray)
