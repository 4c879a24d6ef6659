"""Array-namespace dispatch on the array type, never by importing a framework to look.

NumPy, array_api_strict, torch and jax arrays go through array-api-compat. MLX is not covered
by array-api-compat, so MLX arrays get a tiny shim exposing the handful of functions the core's
array-generic code uses (the MLX module is already imported by whoever made the array).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import array_api_compat


def _is_mlx(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "mlx"


def _mlx_namespace() -> SimpleNamespace:
    mx = sys.modules["mlx.core"]  # present: an mlx array exists
    return SimpleNamespace(
        __name__="dar_core.xp.mlx",
        sqrt=mx.sqrt,
        cos=mx.cos,
        sin=mx.sin,
        concat=lambda arrays, axis=0: mx.concatenate(list(arrays), axis=axis),
        exp=mx.exp,
        sum=mx.sum,
        mean=mx.mean,
        max=mx.max,
        expand_dims=mx.expand_dims,
        matmul=mx.matmul,
        reshape=mx.reshape,
        stack=lambda arrays, axis=0: mx.stack(list(arrays), axis=axis),
        permute_dims=mx.transpose,
        asarray=mx.array,
        float32=mx.float32,
        float64=getattr(mx, "float64", None),
    )


def namespace(*arrays: Any) -> Any:
    """The array namespace of ``arrays`` (python scalars are ignored)."""
    arrs = [a for a in arrays if not isinstance(a, (int, float, complex, bool))]
    if any(_is_mlx(a) for a in arrs):
        if not all(_is_mlx(a) for a in arrs):
            kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in arrs})
            raise TypeError(f"cannot mix MLX arrays with other array types: {kinds}")
        return _mlx_namespace()
    return array_api_compat.array_namespace(*arrs)
