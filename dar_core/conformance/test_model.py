"""Checks 2 and 5: whole-model forward, loss and every parameter's gradient; residual mode
against a plain DiT; dense zero-query DAR against residual mode."""

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from dar_core.conformance.adapters import trainable
from dar_core.conformance.plain_dit import dit_forward
from dar_core.conformance.report import check, record
from dar_core.conformance.strategies import batches, model_configs, param_scales, param_seeds
from dar_core.conformance.tolerances import WELL_CONDITIONED, forward_tol, sensitivity, tol
from dar_core.pretrained.graft import graft_config, graft_params
from dar_core.spec.config import RoutingConfig, model_config
from dar_core.spec.reference import forward
from dar_core.spec.schema import random_params
from dar_core.testing import cosine, rel_err


@given(data=st.data())
def test_forward_matches_reference(adapter, data):
    cfg = data.draw(model_configs(), label="config")
    note(f"config: {cfg}")
    p = random_params(cfg, data.draw(param_seeds), scale=data.draw(param_scales))
    b = data.draw(batches(cfg))
    ref = forward(p, cfg, b["x"], b["t"], b["y"])
    sens = sensitivity(lambda q, x: forward(q, cfg, x, b["t"], b["y"]), p, b["x"])
    note(f"float32 sensitivity of this draw: {sens:.2e}")
    out = adapter.forward(cfg, p, b["x"], b["t"], b["y"], "float32")
    assert out.shape == ref.shape and out.dtype == np.float32
    err = rel_err(out, ref)
    record("model.forward/sensitivity", adapter.name, err / max(sens, 1e-12))
    if sens < WELL_CONDITIONED:
        record("model.forward[well-conditioned]", adapter.name, err)
    check("model.forward", adapter.name, err, forward_tol("forward", sens))


@given(data=st.data())
def test_forward_agrees_pairwise(adapters_pair, data):
    a, b_ = adapters_pair
    cfg = data.draw(model_configs(), label="config")
    note(f"config: {cfg}")
    p = random_params(cfg, data.draw(param_seeds), scale=data.draw(param_scales))
    b = data.draw(batches(cfg))
    sens = sensitivity(lambda q, x: forward(q, cfg, x, b["t"], b["y"]), p, b["x"])
    note(f"float32 sensitivity of this draw: {sens:.2e}")
    out_a = a.forward(cfg, p, b["x"], b["t"], b["y"], "float32")
    out_b = b_.forward(cfg, p, b["x"], b["t"], b["y"], "float32")
    err = rel_err(out_a, out_b)
    if sens < WELL_CONDITIONED:
        record("model.forward_pair[well-conditioned]", f"{a.name}-{b_.name}", err)
    check("model.forward_pair", f"{a.name}-{b_.name}", err, forward_tol("forward_pair", 2 * sens))


@given(data=st.data())
def test_loss_and_every_gradient(adapter, oracle, data):
    cfg = data.draw(model_configs(max_depth=2), label="config")
    note(f"config: {cfg}")
    p = random_params(cfg, data.draw(param_seeds))
    b = data.draw(batches(cfg))
    loss64, g64 = oracle.loss_and_grads(cfg, p, b, "float64")
    loss, g = adapter.loss_and_grads(cfg, p, b, "float32")
    g, g64 = trainable(g), trainable(g64)
    assert sorted(g) == sorted(g64)
    check("model.loss", adapter.name, abs(loss - loss64) / abs(loss64), tol("loss"))
    big = max(float(np.abs(v).max()) for v in g64.values())
    for k in g64:
        bound = tol("grad_rtol") * float(np.abs(g64[k]).max()) + tol("grad_atol") * big
        err = float(np.abs(g[k] - g64[k]).max())
        check("model.grad", adapter.name, err, bound, f"(|g - g64| of {k})")


# The time gain (docs/spec.md §3.1) on its own, so every run checks it whatever Hypothesis draws.
TIME_GAIN = RoutingConfig(query="static_t", chunk_size=3, time_gain=True)


def test_time_gain_forward_and_every_gradient(adapter, oracle):
    cfg = model_config("micro", routing=TIME_GAIN, depth=3)
    p = random_params(cfg, 21)
    rng = np.random.default_rng(1)
    shape = (3, cfg.in_channels, cfg.input_size, cfg.input_size)
    b = {"x": rng.standard_normal(shape), "noise": rng.standard_normal(shape),
         "t": np.array([0.0, 0.45, 1.0]), "y": np.array([0, 4, cfg.num_classes])}
    ref = forward(p, cfg, b["x"], b["t"], b["y"])
    sens = sensitivity(lambda q, x: forward(q, cfg, x, b["t"], b["y"]), p, b["x"])
    out = adapter.forward(cfg, p, b["x"], b["t"], b["y"], "float32")
    check("time_gain.forward", adapter.name, rel_err(out, ref), forward_tol("forward", sens))
    _, g64 = oracle.loss_and_grads(cfg, p, b, "float64")
    _, g = adapter.loss_and_grads(cfg, p, b, "float32")
    g, g64 = trainable(g), trainable(g64)
    assert sorted(g) == sorted(g64) and sum(k.endswith(".time_gain") for k in g) == 7
    big = max(float(np.abs(v).max()) for v in g64.values())
    for k in g64:
        bound = tol("grad_rtol") * float(np.abs(g64[k]).max()) + tol("grad_atol") * big
        check("time_gain.grad", adapter.name, float(np.abs(g[k] - g64[k]).max()), bound,
              f"(|g - g64| of {k})")


BF16_CONFIGS = [RoutingConfig(query="static_t", chunk_size=4),
                RoutingConfig(query="dynamic", chunk_size=1), RoutingConfig(mode="residual")]


@pytest.mark.parametrize("routing", BF16_CONFIGS, ids=lambda r: f"{r.mode}-{r.query}")
def test_bf16_forward_and_gradient_direction(adapter, oracle, routing):
    if "bfloat16" not in adapter.dtypes:
        pytest.skip(f"{adapter.name} has no bf16 path")
    cfg = model_config("tiny", routing=routing)
    p = random_params(cfg, 11)
    rng = np.random.default_rng(0)
    shape = (4, 3, 16, 16)
    b = {"x": rng.standard_normal(shape), "noise": rng.standard_normal(shape),
         "t": np.array([0.0, 0.3, 0.7, 1.0]), "y": np.array([0, 3, 10, 9])}
    ref = forward(p, cfg, b["x"], b["t"], b["y"])
    out = adapter.forward(cfg, p, b["x"], b["t"], b["y"], "bfloat16")
    check("bf16.forward", adapter.name, rel_err(out, ref), tol("forward", "bfloat16"))
    _, g64 = oracle.loss_and_grads(cfg, p, b, "float64")
    _, g = adapter.loss_and_grads(cfg, p, b, "bfloat16")
    keys = sorted(trainable(g64))
    c = cosine(np.concatenate([g[k].ravel() for k in keys]),
               np.concatenate([g64[k].ravel() for k in keys]))
    check("bf16.grad_1-cosine", adapter.name, 1.0 - c, 1.0 - tol("grad_cosine", "bfloat16"))


@given(data=st.data())
def test_residual_mode_is_a_plain_dit(adapter, data):
    cfg = data.draw(model_configs(), label="config").replace(
        routing=RoutingConfig(mode="residual"))
    note(f"config: {cfg}")
    p = random_params(cfg, data.draw(param_seeds))
    b = data.draw(batches(cfg))
    ref = dit_forward(p, cfg, b["x"], b["t"], b["y"])
    out = adapter.forward(cfg, p, b["x"], b["t"], b["y"], "float32")
    check("residual_vs_plain_dit", adapter.name, rel_err(out, ref), tol("forward"))


@given(data=st.data(), query=st.sampled_from(["static", "static_t", "dynamic"]))
def test_dense_zero_query_dar_matches_residual(adapter, data, query):
    """A residual model grafted onto dense DAR (``graft_params``; ``static_t`` with its time
    gain at 0, docs/spec.md §3.1) computes the residual function up to the LayerNorm eps."""
    res = data.draw(model_configs(), label="config").replace(
        routing=RoutingConfig(mode="residual"))
    dar = graft_config(res, query, 1)
    note(f"config: {dar}")
    p = random_params(res, data.draw(param_seeds))
    p_dar = graft_params(p, res, dar)
    b = data.draw(batches(res))
    out_res = adapter.forward(res, p, b["x"], b["t"], b["y"], "float32")
    out_dar = adapter.forward(dar, p_dar, b["x"], b["t"], b["y"], "float32")
    # Exactly: dense zero-query DAR feeds LayerNorm(sum / n), a plain DiT on the mean.
    mean_dit = dit_forward(p, res, b["x"], b["t"], b["y"], mean_inputs=True)
    sens = sensitivity(lambda q, x: dit_forward(q, res, x, b["t"], b["y"], mean_inputs=True),
                       p, b["x"])
    check("dense_zero_query_vs_mean_dit", adapter.name, rel_err(out_dar, mean_dit),
          forward_tol("forward", sens))
    # Against residual mode: LayerNorm(sum / n) = LayerNorm(sum) with eps n^2 eps, so the two
    # differ by the eps alone. That gap, computed in float64, bounds theirs (plus rounding);
    # it grows as n^2 eps / var(token) and reaches 1e-3 for narrow, low-variance draws.
    eps_gap = rel_err(mean_dit, dit_forward(p, res, b["x"], b["t"], b["y"]))
    gap = rel_err(out_dar, out_res)
    check("dense_zero_query_vs_residual", adapter.name, gap,
          eps_gap * (1 + 1e-2) + 2 * tol("forward"), f"(float64 eps gap {eps_gap:.3e})")
