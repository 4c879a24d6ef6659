"""The float64 reference forward: spec identities at the level of the whole model."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dar_core.errors import InputError
from dar_core.spec.config import RoutingConfig, model_config
from dar_core.spec.reference import Trace, forward, layer_norm, patchify, unpatchify
from dar_core.spec.schema import init_params, random_params
from dar_core.spec.timestep import timestep_embedding
from dar_core.testing import rel_err, ulp_tol


def _batch(cfg, seed=0, b=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, cfg.input_size, cfg.input_size))
    return x, rng.uniform(0, 1, b), rng.integers(0, cfg.num_classes + 1, b)


def _zero_query_dense_from(res_params, cfg_dar):
    p = {k: v.copy() for k, v in res_params.items()}
    for k, v in init_params(cfg_dar, dtype=np.float64).items():
        if "router" in k:
            p[k] = v  # zero query (or query_proj), unit norm weight
    return p


@pytest.mark.parametrize("query", ["static", "dynamic"])
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 4))
def test_dense_zero_query_dar_equals_residual(query, seed, depth):
    """docs/spec.md §7: dense DAR with zero queries feeds LayerNorm(mean) where the residual
    model feeds LayerNorm(sum): the same function up to the LayerNorm eps. A pretrained residual
    model maps onto dense DAR."""
    res = model_config("micro", routing="residual", depth=depth)
    dar = res.replace(routing=RoutingConfig(query=query, chunk_size=1))
    p_res = random_params(res, seed, scale=1.0)
    p_dar = _zero_query_dense_from(p_res, dar)
    x, t, y = _batch(res, seed)
    out_res = forward(p_res, res, x, t, y)
    out_dar = forward(p_dar, dar, x, t, y)
    # LN(s / n) = (s - mu) / sqrt(var + n^2 eps): the gap is O(n^2 eps / var), n <= 2 depth + 1.
    assert rel_err(out_dar, out_res) < 1e-3
    # and with the trace we see the routing was exactly uniform
    tr = Trace()
    forward(p_dar, dar, x, t, y, trace=tr)
    for w, idx in zip(tr.weights, tr.sources):
        # zero queries give exactly zero logits: each weight is 1/n correctly rounded
        np.testing.assert_allclose(w, 1.0 / len(idx), rtol=ulp_tol(0.5), atol=0)


def test_dense_zero_query_gap_is_the_layernorm_eps():
    """The residual/dense gap vanishes as LayerNorm eps -> 0: nothing else differs."""
    import dar_core.spec.reference as ref

    res = model_config("micro", routing="residual")
    dar = res.replace(routing=RoutingConfig(query="static", chunk_size=1))
    p_res = random_params(res, 3, scale=1.0)
    p_dar = _zero_query_dense_from(p_res, dar)
    x, t, y = _batch(res, 3)
    gaps = []
    for eps in (1e-6, 1e-12):
        old = ref.layer_norm.__defaults__
        ref.layer_norm.__defaults__ = (eps,)
        try:
            gaps.append(rel_err(forward(p_dar, dar, x, t, y), forward(p_res, res, x, t, y)))
        finally:
            ref.layer_norm.__defaults__ = old
    assert gaps[1] < 1e-9 < gaps[0]


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
def test_init_is_adaln_zero_and_uniform_routing(query):
    cfg = model_config("micro", routing=RoutingConfig(query=query, chunk_size=2))
    p = init_params(cfg, seed=0, dtype=np.float64)
    x, t, y = _batch(cfg)
    tr = Trace()
    out = forward(p, cfg, x, t, y, trace=tr)
    np.testing.assert_array_equal(out, 0.0)  # zero final layer
    for v in tr.history[1:]:
        np.testing.assert_array_equal(v, 0.0)  # adaLN-Zero gates
    for w, idx in zip(tr.weights, tr.sources):
        np.testing.assert_allclose(w, 1.0 / len(idx))
    if query == "static_t":
        np.testing.assert_array_equal(p["t_embedder.mlp.2.weight"], 0.0)


def test_weights_sum_to_one_in_every_aggregator():
    cfg = model_config("micro", routing=RoutingConfig(query="dynamic", chunk_size=3))
    tr = Trace()
    forward(random_params(cfg, 1), cfg, *_batch(cfg), trace=tr)
    assert len(tr.weights) == cfg.num_sublayers + 1
    for w in tr.weights:
        # each weight carries ~(n + 1) roundings, and n of them are summed
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=0, atol=ulp_tol(2 * len(w)))


def test_patchify_unpatchify_round_trip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8))
    tok = patchify(x, 4)  # [B, T, C*p*p], features (c, i, j)
    assert tok.shape == (2, 4, 48)
    # unpatchify expects per-token features in (i, j, c) order
    tok_ijc = tok.reshape(2, 4, 3, 4, 4).transpose(0, 1, 3, 4, 2).reshape(2, 4, 48)
    np.testing.assert_array_equal(unpatchify(tok_ijc, 4, 3), x)


def test_timestep_embedding_contract():
    t = np.array([0.0, 0.5, 1.0])
    e = timestep_embedding(t)
    assert e.shape == (3, 256)
    np.testing.assert_allclose(e[:, :128], np.cos(t[:, None] * 10000 ** (-np.arange(128) / 128)))
    np.testing.assert_allclose(e[0, :128], 1.0)
    np.testing.assert_allclose(e[0, 128:], 0.0)


def test_layer_norm_has_no_affine_and_eps_1e6():
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    y = layer_norm(x)
    np.testing.assert_allclose(y, (x - 2.5) / np.sqrt(1.25 + 1e-6))


@pytest.mark.parametrize("args,match", [
    (dict(x=np.zeros((2, 4, 8, 8))), r"\[B, 3, 8, 8\].*\[2, 4, 8, 8\]"),
    (dict(x=np.zeros((2, 3, 16, 16))), r"\[2, 3, 16, 16\]"),
    (dict(t=np.array([0.5, 1.5])), "1.5"),
    (dict(t=np.array([-0.1, 0.5])), "-0.1"),
    (dict(y=np.array([0, 11])), "label 11"),
    (dict(y=np.array([-1, 0])), "label -1"),
    (dict(y=np.array([0.5, 1.0])), "integer"),
    (dict(x=np.full((2, 3, 8, 8), np.nan)), "NaN"),
    (dict(t=np.array([0.5])), r"t must have shape \[B\] = \[2\]"),
])
def test_bad_inputs_name_the_value(args, match):
    cfg = model_config("micro")
    p = init_params(cfg)
    inputs = dict(x=np.zeros((2, 3, 8, 8)), t=np.array([0.1, 0.2]), y=np.array([0, 1]))
    inputs.update(args)
    with pytest.raises(InputError, match=match):
        forward(p, cfg, **inputs)
