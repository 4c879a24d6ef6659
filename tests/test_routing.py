"""docs/spec.md §7 identities of the routing math, as property tests."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dar_core.spec.config import RoutingConfig, model_config
from dar_core.spec.routing import (
    expand_slices,
    final_sources,
    route,
    source_sets,
    source_slices,
    sublayer_sources,
)
from dar_core.testing import ulp_tol


@st.composite
def routing_inputs(draw, max_n=8):
    n = draw(st.integers(1, max_n))
    d = draw(st.sampled_from([4, 8, 16]))
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    v = rng.standard_normal((n, b, t, d)) * scale
    qshape = draw(st.sampled_from(["static", "per_sample", "per_token"]))
    q = {"static": (d,), "per_sample": (b, 1, d), "per_token": (b, t, d)}[qshape]
    return v, rng.standard_normal(q) * 3, 1.0 + 0.3 * rng.standard_normal(d)


@given(routing_inputs())
def test_weights_are_a_distribution(inp):
    v, q, w = inp
    h, a = route(v, q, w)
    assert a.shape == v.shape[:-1] and h.shape == v.shape[1:]
    assert np.all(a >= 0)
    n = v.shape[0]
    # each weight e_i / sum(e) carries ~(n + 1) roundings, and n of them are summed
    np.testing.assert_allclose(a.sum(0), 1.0, rtol=0, atol=ulp_tol(2 * n))
    # two n-term sums of products in different orders, terms bounded by max|v| (sum a = 1)
    np.testing.assert_allclose(h, np.einsum("nbt,nbtd->btd", a, v), rtol=0,
                               atol=ulp_tol(n) * np.abs(v).max())


@given(routing_inputs(), st.randoms(use_true_random=False))
def test_permutation_invariance(inp, rnd):
    v, q, w = inp
    perm = list(range(v.shape[0]))
    rnd.shuffle(perm)
    h, a = route(v, q, w)
    hp, ap = route(v[perm], q, w)
    n, d = v.shape[0], v.shape[-1]
    # A logit is a d-term dot product (error <= d eps sum|k q| / sqrt(d), whatever order the
    # reduction takes); a softmax weight moves by twice that relatively, plus its own
    # ~(n + 1) roundings and the n-term sum's; the mix is a sum of such weights times |v|.
    keys = v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + 1e-6) * w
    dlogit = ulp_tol(d) * np.abs(keys * q).sum(-1).max() / np.sqrt(d)
    rel = 2 * dlogit + ulp_tol(2 * (n + 1))
    np.testing.assert_allclose(ap, a[perm], rtol=rel, atol=0)
    np.testing.assert_allclose(hp, h, rtol=0, atol=(rel + ulp_tol(n)) * np.abs(v).max())


@given(routing_inputs(max_n=1))
def test_single_source_returns_it(inp):
    v, q, w = inp
    h, a = route(v[:1], q, w)
    np.testing.assert_array_equal(a, 1.0)
    np.testing.assert_array_equal(h, v[0])  # exp(0) / exp(0) = 1 and 1 * v are exact


@given(routing_inputs())
def test_zero_query_gives_the_mean(inp):
    v, q, w = inp
    h, a = route(v, np.zeros_like(q), w)
    n = v.shape[0]
    # zero logits are exact, so every weight is 1/n correctly rounded (half an ulp) ...
    np.testing.assert_allclose(a, 1.0 / n, rtol=ulp_tol(0.5), atol=0)
    # ... and the mix sum_i (1/n) v_i differs from (sum_i v_i) / n by two n-term sums
    np.testing.assert_allclose(h, v.mean(0), rtol=0, atol=ulp_tol(2 * (n + 1)) * np.abs(v).max())


def test_routing_sees_rmsnorm_keys_not_raw_magnitude():
    # Scaling a source changes its value but not its key: weights are unchanged.
    rng = np.random.default_rng(0)
    v, q, w = rng.standard_normal((3, 1, 2, 8)), rng.standard_normal(8), np.ones(8)
    _, a = route(v, q, w)
    v2 = v.copy()
    v2[1] *= 100.0
    _, a2 = route(v2, q, w)
    np.testing.assert_allclose(a, a2, rtol=1e-5)  # equal up to the RMSNorm eps


@given(st.integers(1, 40), st.integers(1, 12), st.booleans())
def test_source_sets_follow_the_chunk_rule(L, S, fin):
    sets = source_sets(L, RoutingConfig(chunk_size=S, final_aggregator=fin))
    assert len(sets) == L + 1
    for l in range(1, L + 1):
        s = sets[l - 1]
        n = (l - 1) // S + 1
        assert s == tuple([0] + [m * S for m in range(1, n)] + list(range((n - 1) * S + 1, l)))
        assert all(i < l for i in s) and len(set(s)) == len(s)
    # every source is read by somebody, the final aggregator always sees v_L
    assert set().union(*map(set, sets)) == set(range(L + 1))
    assert sets[-1][-1] == L


@given(st.integers(1, 40), st.integers(1, 12), st.booleans())
def test_slices_cover_exactly_the_source_sets(L, S, fin):
    r = RoutingConfig(chunk_size=S, final_aggregator=fin)
    slices = source_slices(L, r)
    assert [expand_slices(s) for s in slices] == source_sets(L, r)
    assert all(len(s) <= 2 for s in slices)


@given(st.integers(1, 40), st.booleans())
def test_chunk_size_one_is_dense(L, fin):
    dense = source_sets(L, RoutingConfig(chunk_size=1, final_aggregator=fin))
    assert dense == [tuple(range(l)) for l in range(1, L + 2)]
    assert dense == source_sets(L, RoutingConfig(mode="residual"))


def test_sit_xl2_c4_source_set_sizes():
    cfg = model_config("SiT-XL/2", routing=RoutingConfig(chunk_size=4))
    sets = source_sets(cfg.num_sublayers, cfg.routing)
    assert cfg.num_sublayers == 56
    assert len(sets[55]) == 17  # the last sublayer
    assert len(sets[56]) == 18  # the final aggregator
    assert final_sources(56, 4, False) == tuple(range(0, 57, 4))  # summaries only: 15


def test_partial_last_chunk():
    # L = 10, S = 4: chunks [1-4], [5-8], [9-10]
    assert sublayer_sources(10, 10, 4) == (0, 4, 8, 9)
    assert final_sources(10, 4, True) == (0, 4, 8, 9, 10)
    assert final_sources(10, 4, False) == (0, 4, 8, 10)


def test_bad_sublayer_index():
    with pytest.raises(ValueError, match="l=0"):
        sublayer_sources(0, 8, 4)
