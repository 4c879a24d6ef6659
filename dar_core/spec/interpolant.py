"""SiT's linear interpolant, its velocity target, and training-time distributions of t.

See ``dar_core.spec.timestep`` for the convention: t = 0 noise, t = 1 data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dar_core.errors import ConfigError

TIME_SAMPLINGS = ("uniform", "logit_normal")


def _per_sample(t: Any, ndim: int) -> Any:
    return t.reshape(t.shape + (1,) * (ndim - 1))


def interpolate(x: Any, noise: Any, t: Any) -> Any:
    """``x_t = t * x + (1 - t) * noise`` with ``t`` of shape ``[B]`` and ``x`` ``[B, ...]``."""
    tb = _per_sample(t, len(x.shape))
    return tb * x + (1 - tb) * noise


def velocity_target(x: Any, noise: Any) -> Any:
    """The velocity ``d x_t / dt = x - noise`` the network learns."""
    return x - noise


def sample_time(
    rng: np.random.Generator,
    n: int,
    kind: str = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
) -> np.ndarray:
    """Training times in [0, 1] (float32): ``uniform`` or ``logit_normal`` (sigmoid of a
    normal with the given mean and std, SD3-style)."""
    if kind == "uniform":
        t = rng.random(n)
    elif kind == "logit_normal":
        t = 1.0 / (1.0 + np.exp(-(mean + std * rng.standard_normal(n))))
    else:
        raise ConfigError(f"time sampling must be one of {list(TIME_SAMPLINGS)}, got {kind!r}")
    return t.astype(np.float32)
