"""Check 1: each backend's efficient routing op against the float64 reference and oracle."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from dar_core.conformance.report import check
from dar_core.conformance.tolerances import route_grad_scales, tol
from dar_core.spec.routing import route
from dar_core.testing import rel_err


@st.composite
def route_inputs(draw):
    n, b, t = draw(st.integers(1, 9)), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    d = draw(st.sampled_from([4, 8, 32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["static", "per_sample", "per_token"]))
    qshape = {"static": (d,), "per_sample": (b, 1, d), "per_token": (b, t, d)}[kind]
    scales = rng.choice([0.01, 1.0, 30.0], size=(n, 1, 1, 1))
    return (rng.standard_normal((n, b, t, d)) * scales, 2.0 * rng.standard_normal(qshape),
            1.0 + 0.3 * rng.standard_normal(d), rng.standard_normal((b, t, d)))


@given(inp=route_inputs())
def test_route_op_matches_reference(adapter, oracle, inp):
    v, q, w, g = inp
    h64, a64 = route(v, q, w)
    _, _, dv64, dq64, dw64 = oracle.route(v, q, w, g, "float64")
    h, a, dv, dq, dw = adapter.route(v, q, w, g, "float32")
    assert np.asarray(h).shape == h64.shape and np.asarray(a).shape == a64.shape
    check("route.output", adapter.name, rel_err(h, h64), tol("route"))
    check("route.weights", adapter.name, rel_err(a, a64), tol("route"))
    scales = route_grad_scales(v, q, w, g)
    for what, got, ref in (("dv", dv, dv64), ("dq", dq, dq64), ("dw", dw, dw64)):
        # relative to the gradient's size or, where its terms cancel, to theirs
        err = float(np.abs(np.asarray(got, np.float64) - ref).max()) / max(
            float(np.abs(ref).max()), scales[what], 1e-30)
        check(f"route.grad_{what}", adapter.name, err, tol("route_grad"))
