"""The benchmarks' optimized routing cases compute the same as the naive ones."""

import importlib
import importlib.util

import pytest

from dar_core.testing import rel_err

FRAMEWORK = {"torch": "torch", "jax": "jax", "mlx": "mlx"}


@pytest.mark.parametrize("backend", list(FRAMEWORK))
@pytest.mark.parametrize("shape", [(1, 2, 3, 8), (6, 2, 5, 16), (17, 1, 4, 32)])
def test_optimized_routing_matches_naive(backend, shape):
    if importlib.util.find_spec(FRAMEWORK[backend]) is None:
        pytest.skip(f"{backend} not installed")
    if importlib.util.find_spec(f"benchmarks.{backend}_cases") is None:
        pytest.skip(f"no benchmark cases for {backend}")
    cases = importlib.import_module(f"benchmarks.{backend}_cases")
    opt = cases.to_numpy(cases.routing_case(*shape, "optimized")())
    naive = cases.to_numpy(cases.routing_case(*shape, "naive")())
    assert opt.shape == naive.shape == shape[1:]
    assert rel_err(opt, naive) < 1e-5
