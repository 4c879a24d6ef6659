"""Samplers against Gaussian data, whose exact velocity field is known in closed form."""

import numpy as np
import pytest

from dar_core.errors import ConfigError
from dar_core.sampling.samplers import guided, sample

MU = np.array([2.0, -1.0])
SIGMA = np.array([[1.5, 0.6], [0.6, 0.5]])


def gaussian_velocity(x, t, y):
    """E[x - noise | x_t] for x ~ N(MU, SIGMA), x_t = t x + (1 - t) noise."""
    C = t * t * SIGMA + (1 - t) ** 2 * np.eye(2)
    A = (t * SIGMA - (1 - t) * np.eye(2)) @ np.linalg.inv(C)
    return MU + (x - t * MU) @ A.T


def _check(out, tol):
    mean_err = np.linalg.norm(out.mean(0) - MU) / np.linalg.norm(MU)
    cov_err = np.linalg.norm(np.cov(out.T) - SIGMA) / np.linalg.norm(SIGMA)
    assert mean_err < tol and cov_err < tol, (mean_err, cov_err)
    return mean_err, cov_err


def test_heun_50_steps_within_one_percent():
    noise = np.random.default_rng(0).standard_normal((200_000, 2))
    out = sample(gaussian_velocity, noise, None, sampler="heun", steps=50)
    _check(out, 0.01)


def test_euler_converges_first_order():
    noise = np.random.default_rng(1).standard_normal((20_000, 2))
    exact = sample(gaussian_velocity, noise, None, sampler="heun", steps=400)
    e10 = np.abs(sample(gaussian_velocity, noise, None, sampler="euler", steps=10) - exact).max()
    e40 = np.abs(sample(gaussian_velocity, noise, None, sampler="euler", steps=40) - exact).max()
    h10 = np.abs(sample(gaussian_velocity, noise, None, sampler="heun", steps=10) - exact).max()
    assert 3.0 < e10 / e40 < 5.0  # first order: 4x steps -> ~4x smaller error
    assert h10 < e10 / 5  # second order beats first order


def test_sde_matches_the_target_distribution():
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((100_000, 2))
    out = sample(gaussian_velocity, noise, None, sampler="sde", steps=250, rng=rng)
    _check(out, 0.03)
    # a different path from the ODE for the same start
    ode = sample(gaussian_velocity, noise, None, sampler="heun", steps=50)
    assert np.abs(out - ode).mean() > 0.05


def test_cfg_combines_conditional_and_unconditional():
    def v(x, t, y):
        return np.where(y[:, None] == 5, 1.0, 3.0) * np.ones_like(x)

    x, y = np.zeros((2, 2)), np.array([0, 1])
    g = guided(v, 2.0, null_class=5)
    np.testing.assert_allclose(g(x, 0.5, y), 1.0 + 2.0 * (3.0 - 1.0))
    g_int = guided(v, 2.0, null_class=5, interval=(0.0, 0.3))
    np.testing.assert_allclose(g_int(x, 0.5, y), 3.0)  # outside the interval: conditional only
    assert guided(v, 1.0, 5) is v


def test_sampler_errors_name_the_value():
    with pytest.raises(ConfigError, match="'rk4'"):
        sample(gaussian_velocity, np.zeros((1, 2)), None, sampler="rk4")
    with pytest.raises(ConfigError, match="steps.*0"):
        sample(gaussian_velocity, np.zeros((1, 2)), None, steps=0)
    with pytest.raises(ConfigError, match="interval"):
        guided(gaussian_velocity, 2.0, 5, interval=(0.5, 0.2))
