"""``route`` is array-API generic: the same result on numpy, array_api_strict, torch, jax, mlx."""

import importlib

import numpy as np
import pytest

from dar_core.spec.routing import route
from dar_core.testing import rel_err


def _inputs():
    rng = np.random.default_rng(7)
    v = rng.standard_normal((5, 2, 3, 16))
    q = rng.standard_normal((2, 3, 16))
    w = 1.0 + 0.2 * rng.standard_normal(16)
    return v, q, w


def _convert(name):
    if name == "numpy":
        return lambda a: a.astype(np.float32), np.asarray
    if name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
        return (lambda a: xp.asarray(a.astype(np.float32)),
                lambda a: np.asarray(a._array))
    if name == "torch":
        torch = pytest.importorskip("torch")
        return (lambda a: torch.tensor(a, dtype=torch.float32), lambda a: a.numpy())
    if name == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return lambda a: jnp.asarray(a, dtype=jnp.float32), np.asarray
    mx = pytest.importorskip("mlx.core")
    return lambda a: mx.array(a.astype(np.float32)), np.asarray


@pytest.mark.parametrize("name", ["numpy", "array_api_strict", "torch", "jax", "mlx"])
def test_route_same_on_every_namespace(name):
    v, q, w = _inputs()
    h64, a64 = route(v, q, w)
    to, back = _convert(name)
    h, a = route(to(v), to(q), to(w))
    assert type(h).__module__.split(".")[0] == type(to(v)).__module__.split(".")[0]
    assert "float32" in str(h.dtype)
    assert tuple(h.shape) == (2, 3, 16) and tuple(a.shape) == (5, 2, 3)
    assert rel_err(back(h), h64) < 1e-6
    assert rel_err(back(a), a64) < 1e-6


def test_mixing_mlx_with_numpy_is_an_error():
    if importlib.util.find_spec("mlx") is None:
        pytest.skip("mlx not installed")
    import mlx.core as mx

    v, q, w = _inputs()
    with pytest.raises(TypeError, match="cannot mix MLX"):
        route(mx.array(v.astype(np.float32)), q, w)
