"""The time convention and the timestep-embedding contract, defined once for every backend.

SiT's linear interpolant: ``t`` in [0, 1], ``t = 0`` is pure noise and ``t = 1`` is data;
``x_t = t * x + (1 - t) * noise``; the network predicts the velocity ``x - noise``.
The embedding takes raw ``t`` (no rescaling to 0..1000): a 256-dim sinusoid with max period
10000 in ``[cos, sin]`` order, followed by the model's ``Linear -> SiLU -> Linear``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dar_core.xp import namespace

FREQUENCY_DIM = 256
MAX_PERIOD = 10000.0


def timestep_frequencies(dim: int = FREQUENCY_DIM, max_period: float = MAX_PERIOD) -> np.ndarray:
    """The ``dim // 2`` angular frequencies ``max_period ** (-k / (dim // 2))`` (float64)."""
    half = dim // 2
    return np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)


def timestep_embedding(
    t: Any, dim: int = FREQUENCY_DIM, max_period: float = MAX_PERIOD, freqs: Any = None
) -> Any:
    """``[B] -> [B, dim]`` sinusoidal embedding ``[cos(t f), sin(t f)]`` in t's namespace.

    ``freqs`` may be passed pre-converted to t's array type (backends cache it).
    """
    xp = namespace(t)
    if freqs is None:
        freqs = xp.asarray(timestep_frequencies(dim, max_period).astype(np.float32))
        if getattr(t, "dtype", None) is not None and "64" in str(t.dtype):
            freqs = xp.asarray(timestep_frequencies(dim, max_period))
    args = xp.expand_dims(t, axis=-1) * freqs  # [B, half]
    emb = xp.concat([xp.cos(args), xp.sin(args)], axis=-1)  # [B, 2*half]
    if dim % 2:
        emb = xp.concat([emb, emb[:, :1] * 0], axis=-1)
    return emb
