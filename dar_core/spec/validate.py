"""Input checks at the model's public boundary, shared by the reference and every backend.

Backends call ``check_shapes`` with plain shapes and ``check_values`` with a few host scalars
they reduced themselves, so no framework is imported here and checks stay outside traced code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dar_core.errors import InputError
from dar_core.spec.config import ModelConfig


def check_shapes(cfg: ModelConfig, x_shape: tuple, t_shape: tuple, y_shape: tuple) -> None:
    x_shape, t_shape, y_shape = tuple(x_shape), tuple(t_shape), tuple(y_shape)
    expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if len(x_shape) != 4 or x_shape[1:] != expected or x_shape[0] < 1:
        raise InputError(
            f"x must be [B, C, H, W] = [B, {', '.join(map(str, expected))}], got {list(x_shape)}"
        )
    B = x_shape[0]
    if t_shape != (B,):
        raise InputError(f"t must have shape [B] = [{B}], got {list(t_shape)}")
    if y_shape != (B,):
        raise InputError(f"y must have shape [B] = [{B}], got {list(y_shape)}")


def check_values(
    cfg: ModelConfig,
    *,
    x_finite: bool,
    t_min: float,
    t_max: float,
    y_min: int,
    y_max: int,
    y_is_int: bool,
) -> None:
    if not x_finite:
        raise InputError("x contains NaN or inf values; expected finite images")
    if not (np.isfinite(t_min) and np.isfinite(t_max)) or t_min < 0.0 or t_max > 1.0:
        bad = t_min if not (np.isfinite(t_min) and t_min >= 0.0) else t_max
        raise InputError(
            f"t must lie in [0, 1] (0 = noise, 1 = data), got a value {bad!r} "
            f"(range [{t_min!r}, {t_max!r}])"
        )
    if not y_is_int:
        raise InputError("y must hold integer class labels, got a non-integer dtype")
    if y_min < 0 or y_max > cfg.num_classes:
        bad = y_min if y_min < 0 else y_max
        raise InputError(
            f"label {bad} is out of range: expected 0..{cfg.num_classes - 1}, "
            f"or {cfg.null_class} for the null (unconditional) class"
        )


def validate_inputs(cfg: ModelConfig, x: Any, t: Any, y: Any) -> tuple[np.ndarray, ...]:
    """Check NumPy-convertible inputs; return them as NumPy arrays."""
    x, t, y = np.asarray(x), np.asarray(t), np.asarray(y)
    check_shapes(cfg, x.shape, t.shape, y.shape)
    check_values(
        cfg,
        x_finite=bool(np.isfinite(x).all()),
        t_min=float(t.min()),
        t_max=float(t.max()),
        y_min=int(y.min()) if y.dtype.kind in "iu" else 0,
        y_max=int(y.max()) if y.dtype.kind in "iu" else 0,
        y_is_int=y.dtype.kind in "iu",
    )
    return x, t, y
