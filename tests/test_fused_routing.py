"""The fused routing kernels (Triton for torch, Pallas for JAX) against the naive four-pass
``dar_core.spec.routing.route``: output, weights and the gradients of sources, query and norm
weight, on the conformance suite's routing inputs, run interpreted on the CPU
(``TRITON_INTERPRET=1``, Pallas ``interpret=True``).

float32 uses the conformance tolerances (``tol("route")``, ``tol("route_grad")`` relative to
``route_grad_scales``); bf16 sources compare at rtol = atol = 5e-2 against the float32 route of
the same bf16 values, gradients by cosine >= ``tol("grad_cosine", "bfloat16")``.
"""

from __future__ import annotations

import importlib
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dar_core.conformance import test_routing_op as routing_op
from dar_core.conformance.kernel_check import grad_err
from dar_core.conformance.tolerances import route_grad_scales, tol
from dar_core.errors import InputError
from dar_core.spec.routing import fold_query, route
from dar_core.testing import rel_err

torch = pytest.importorskip("torch", reason="the float64 oracle is torch autograd")

# Interpreters are slow: few examples, fixed per kernel (the Pallas kernel is traced afresh
# for every shape, ~2 s a draw on this machine).
EXAMPLES = {"triton": 12, "pallas": 4}
if os.environ.get("HYPOTHESIS_PROFILE") == "thorough":
    EXAMPLES = {"triton": 100, "pallas": 25}


def _load_triton():
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed (pip install 'dar[kernels]', Linux only)"
    if not torch.cuda.is_available():
        # Read when the kernels are decorated and again at launch: it stays set in this
        # process (nothing else here uses triton on the CPU).
        os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module("dar_core.backends.torch.triton_route")
    if not torch.cuda.is_available() and not mod.interpreted():
        return None, "triton_route was imported before TRITON_INTERPRET=1 could be set"
    return mod, ""


def _load_pallas():
    try:
        return importlib.import_module("dar_core.backends.jax.pallas_route"), ""
    except ImportError as e:
        return None, f"jax with pallas is not importable: {e}"


TRITON, TRITON_WHY = _load_triton()
PALLAS, PALLAS_WHY = _load_pallas()
KERNELS = [pytest.param("triton", marks=pytest.mark.skipif(TRITON is None, reason=TRITON_WHY)),
           pytest.param("pallas", marks=pytest.mark.skipif(PALLAS is None, reason=PALLAS_WHY))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def oracle(v, q, w, g, ga=None, dtype=torch.float64):
    """The naive route under torch autograd: ``h, alpha, dv, dq, dw`` as float64 NumPy."""
    v, q, w = (torch.tensor(np.asarray(a, np.float64), dtype=dtype, requires_grad=True)
               for a in (v, q, w))
    h, a = route(v, q, w)
    loss = (h * torch.tensor(g, dtype=dtype)).sum()
    if ga is not None:
        loss = loss + (a * torch.tensor(ga, dtype=dtype)).sum()
    loss.backward()
    return [x.detach().double().numpy() for x in (h, a, v.grad, q.grad, w.grad)]


def fused(kernel, v, q, w, g, ga=None, src_dtype="float32", cached=False):
    """The kernel's ``h, alpha, dv, dq, dw`` as float64 NumPy (sources in ``src_dtype``,
    query and norm weight float32; ``cached``: the inverse RMS passed in, as History does)."""
    if kernel == "triton":
        return _fused_triton(v, q, w, g, ga, src_dtype, cached)
    return _fused_pallas(v, q, w, g, ga, src_dtype, cached)


def _fused_triton(v, q, w, g, ga, src_dtype, cached):
    vt = torch.tensor(v, device=DEVICE).to(getattr(torch, src_dtype)).requires_grad_()
    qt, wt = (torch.tensor(a, dtype=torch.float32, device=DEVICE, requires_grad=True)
              for a in (q, w))
    values = list(vt.unbind(0))
    if cached:
        rstd = [torch.rsqrt(x.float().square().mean(-1) + 1e-6) for x in values]
        h, a = TRITON.fused_mix(values, rstd, fold_query(qt, wt))
    else:
        h, a = TRITON.fused_route(values, qt, wt)
    loss = (h * torch.tensor(g, dtype=torch.float32, device=DEVICE)).sum()
    if ga is not None:
        loss = loss + (a * torch.tensor(ga, dtype=torch.float32, device=DEVICE)).sum()
    loss.backward()
    assert h.dtype == torch.float32 and vt.grad.dtype == vt.dtype
    return [x.detach().cpu().double().numpy() for x in (h, a, vt.grad, qt.grad, wt.grad)]


def _fused_pallas(v, q, w, g, ga, src_dtype, cached):
    import jax
    import jax.numpy as jnp

    def loss(vj, qj, wj):
        values = [vj[i] for i in range(vj.shape[0])]
        if cached:
            rstd = [jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1) + 1e-6)
                    for x in values]
            h, a = PALLAS.fused_mix(values, rstd, fold_query(qj, wj))
        else:
            h, a = PALLAS.fused_route(values, qj, wj)
        out = jnp.sum(h * jnp.asarray(g, jnp.float32))
        if ga is not None:
            out = out + jnp.sum(a * jnp.asarray(ga, jnp.float32))
        return out, (h, a)

    args = (jnp.asarray(v, getattr(jnp, src_dtype)), jnp.asarray(q, jnp.float32),
            jnp.asarray(w, jnp.float32))
    (_, (h, a)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*args)
    assert h.dtype == jnp.float32 and grads[0].dtype == args[0].dtype
    return [np.asarray(x.astype(jnp.float32), np.float64) for x in (h, a, *grads)]


def _check_float32(kernel, inp, cached):
    v, q, w, g = inp
    h64, a64, dv64, dq64, dw64 = oracle(v, q, w, g)
    h, a, dv, dq, dw = fused(kernel, v, q, w, g, cached=cached)
    assert h.shape == h64.shape and a.shape == a64.shape and dq.shape == dq64.shape
    assert rel_err(h, h64) <= tol("route"), rel_err(h, h64)
    assert rel_err(a, a64) <= tol("route"), rel_err(a, a64)
    scales = route_grad_scales(v, q, w, g)
    for what, got, ref in (("dv", dv, dv64), ("dq", dq, dq64), ("dw", dw, dw64)):
        err = grad_err(got, ref, scales[what])
        assert err <= tol("route_grad"), (what, err)


@pytest.mark.skipif(TRITON is None, reason=TRITON_WHY)
@settings(max_examples=EXAMPLES["triton"])
@given(inp=routing_op.route_inputs(), cached=st.booleans())
def test_triton_float32_matches_route(inp, cached):
    _check_float32("triton", inp, cached)


@pytest.mark.skipif(PALLAS is None, reason=PALLAS_WHY)
@settings(max_examples=EXAMPLES["pallas"])
@given(inp=routing_op.route_inputs(), cached=st.booleans())
def test_pallas_float32_matches_route(inp, cached):
    _check_float32("pallas", inp, cached)


def _cosine(a, b):
    a, b = a.ravel(), b.ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("src_dtype", "query"), [
    ("bfloat16", "static"), ("bfloat16", "per_sample"), ("bfloat16", "per_token"),
    ("float16", "per_token")])
def test_half_sources_match_float32_route(kernel, src_dtype, query):
    rng = np.random.default_rng(7)
    n, b, t, d = 6, 2, 4, 32
    v = rng.standard_normal((n, b, t, d)) * rng.choice([0.1, 1.0, 4.0], (n, 1, 1, 1))
    v = torch.tensor(v).to(getattr(torch, src_dtype)).double().numpy()  # the values it sees
    qshape = {"static": (d,), "per_sample": (b, 1, d), "per_token": (b, t, d)}[query]
    q, w = 2.0 * rng.standard_normal(qshape), 1.0 + 0.3 * rng.standard_normal(d)
    g = rng.standard_normal((b, t, d))
    ref = oracle(v, q, w, g, dtype=torch.float32)  # float32-accumulated reference
    got = fused(kernel, v, q, w, g, src_dtype=src_dtype)
    for name, x, r in zip(("h", "alpha"), got[:2], ref[:2], strict=True):
        np.testing.assert_allclose(x, r, rtol=5e-2, atol=5e-2, err_msg=name)
    for name, x, r in zip(("dv", "dq", "dw"), got[2:], ref[2:], strict=True):
        assert _cosine(x, r) >= tol("grad_cosine", "bfloat16"), (name, _cosine(x, r))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("cached", "query"), [
    (False, "static"), (True, "per_sample"), (False, "per_token"), (True, "per_token")])
def test_gradient_through_the_weights(kernel, cached, query):
    """A loss on ``alpha`` as well as ``h`` (the kernels take its cotangent)."""
    rng = np.random.default_rng(3)
    n, b, t, d = 4, 2, 3, 8
    v = rng.standard_normal((n, b, t, d))
    qshape = {"static": (d,), "per_sample": (b, 1, d), "per_token": (b, t, d)}[query]
    q, w = 2.0 * rng.standard_normal(qshape), 1.0 + 0.3 * rng.standard_normal(d)
    g, ga = rng.standard_normal((b, t, d)), rng.standard_normal((n, b, t))
    ref = oracle(v, q, w, g, ga)
    got = fused(kernel, v, q, w, g, ga, cached=cached)
    for name, x, r in zip(("h", "alpha", "dv", "dq", "dw"), got, ref, strict=True):
        assert rel_err(x, r) <= tol("route_grad"), (name, rel_err(x, r))


@pytest.mark.skipif(TRITON is None, reason=TRITON_WHY)
def test_triton_reads_strided_and_noncontiguous_sources():
    """Sources as strided views of one buffer (every other history entry) and a transposed
    one (copied to rows): the same numbers as the stacked route."""
    rng = np.random.default_rng(5)
    buf = torch.tensor(rng.standard_normal((7, 2, 3, 8)), dtype=torch.float32)
    q, w = torch.tensor(rng.standard_normal(8)), torch.tensor(1.0 + rng.standard_normal(8))
    views = list(buf[::2].unbind(0)) + [buf[1].transpose(0, 1).contiguous().transpose(0, 1)]
    h, a = TRITON.fused_route(views, q.float(), w.float())
    h64, a64 = route(torch.stack(views).double(), q, w)
    assert rel_err(h.double().numpy(), h64.numpy()) <= tol("route")
    assert rel_err(a.double().numpy(), a64.numpy()) <= tol("route")


def _bad_inputs(make):
    v = make((3, 2, 4, 8), "float32")
    return [
        ("sources must be [N>=1", lambda f: f.fused_route([], make((8,), "float32"),
                                                       make((8,), "float32"))),
        ("(2, 5, 8)", lambda f: f.fused_route(v, make((2, 5, 8), "float32"),
                                              make((8,), "float32"))),
        ("norm_weight must be [8], got (7,)",
         lambda f: f.fused_route(v, make((8,), "float32"), make((7,), "float32"))),
        ("float64", lambda f: f.fused_route(make((3, 2, 4, 8), "float64"),
                                            make((8,), "float32"), make((8,), "float32"))),
        ("sources differ", lambda f: f.fused_route([v[0], v[1][:, :3]], make((8,), "float32"),
                                                   make((8,), "float32"))),
    ]


@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_inputs_raise_input_error_naming_the_value(kernel):
    if kernel == "triton":
        mod = TRITON

        def make(shape, dtype):
            return torch.zeros(shape, dtype=getattr(torch, dtype), device=DEVICE)
    else:
        mod = PALLAS

        def make(shape, dtype):  # NumPy: every check runs before the kernel, float64 exists
            return np.zeros(shape, dtype)
    for needle, call in _bad_inputs(make):
        with pytest.raises(InputError, match=re.escape(needle)):
            call(mod)


@pytest.mark.skipif(TRITON is None, reason=TRITON_WHY)
@pytest.mark.parametrize("query", ["static", "per_token"])
def test_torch_history_fused_reads_match_reference(query):
    """``FusedHistory`` over a chunked source set (c2, final aggregator): every
    read and every gradient as the per-source path's."""
    from dar_core.backends.torch.routing import FusedHistory, History
    from dar_core.spec.config import RoutingConfig
    from dar_core.spec.routing import source_slices

    assert not History.fused and FusedHistory.fused  # the default keeps the per-source ops
    L, (b, t, d) = 5, (2, 3, 8)
    slices = source_slices(L, RoutingConfig(chunk_size=2, final_aggregator=True))
    rng = np.random.default_rng(11)
    vs = [torch.tensor(rng.standard_normal((b, t, d)), dtype=torch.float32) for _ in range(L + 1)]
    qs = [torch.tensor(rng.standard_normal((d,) if query == "static" else (b, t, d)),
                       dtype=torch.float32) for _ in range(L + 1)]
    w = torch.tensor(1.0 + 0.3 * rng.standard_normal(d), dtype=torch.float32)

    def run(kernel):
        leaves = [v.clone().requires_grad_() for v in vs] + [q.clone().requires_grad_()
                                                             for q in qs]
        state, loss = kernel(leaves[0], slices, 1e-6), 0.0
        for k in range(L + 1):
            h = state.read(k, leaves[L + 1 + k], w)
            loss = loss + (h * torch.cos(h)).sum()
            if k < L:
                state.write(leaves[k + 1] * h.tanh())  # the next source depends on this read
        loss.backward()
        return [x.grad.double().numpy() for x in leaves], [a.double().numpy()
                                                           for a in state.weights]

    (gf, af), (gr, ar) = run(FusedHistory), run(History)
    for x, r in zip(af + gf, ar + gr, strict=True):
        assert rel_err(x, r) <= tol("route_grad"), rel_err(x, r)


@pytest.mark.skipif(TRITON is None, reason=TRITON_WHY)
def test_torch_model_with_the_fused_kernel_matches_the_history_path():
    """``DARTransformer(routing_impl="fused")``: the whole micro model's velocity and every
    parameter gradient as the per-source path's (dynamic queries, chunk 2)."""
    from dar_core.backends.torch import DARTransformer
    from dar_core.spec.config import RoutingConfig, model_config
    from dar_core.spec.schema import random_params

    cfg = model_config("micro", routing=RoutingConfig(query="dynamic", chunk_size=2))
    w = random_params(cfg, seed=3, dtype=np.float32)
    x = torch.tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8)), dtype=torch.float32)
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    outs = {}
    for impl in ("fused", "history"):
        m = DARTransformer(cfg, routing_impl=impl)
        m.load_weights(w)
        v = m(x, t, y)
        v.square().sum().backward()
        outs[impl] = [v.detach().double().numpy()] + [
            p.grad.double().numpy() for _, p in sorted(m.named_parameters()) if p.grad is not None]
    assert len(outs["fused"]) == len(outs["history"]) > 10
    # two float32 implementations of one model: the suite's whole-model bounds (as between
    # two backends), the velocity relative, each gradient to its largest entry and itself
    (vf, *gf), (vh, *gh) = outs["fused"], outs["history"]
    assert rel_err(vf, vh) <= tol("forward"), rel_err(vf, vh)
    for a, b in zip(gf, gh, strict=True):
        bound = tol("grad_atol") * np.abs(b).max() + tol("grad_rtol") * np.abs(b)
        assert np.all(np.abs(a - b) <= bound), float((np.abs(a - b) / bound).max())


# routing_impl="auto": the kernel's self-check and the dispatch ------------------------------
def _history_run(impl, *inputs):
    """``kernel_check``'s ``run`` with the torch per-source path on both sides."""
    from dar_core.backends.torch.routing import _check_read

    return _check_read(torch.device("cpu"), "history", *inputs)


def test_kernel_check_names_a_failing_or_wrong_kernel():
    from dar_core.conformance.kernel_check import disagreement

    assert disagreement(_history_run) is None

    def raises(impl, *inputs):
        if impl == "fused":
            raise RuntimeError("PTX assembly failed\nsecond line")
        return _history_run(impl, *inputs)

    def scaled(what, factor):
        def run(impl, *inputs):
            out = _history_run(impl, *inputs)
            if impl == "fused":
                out[what] = out[what] * factor
            return out
        return run

    assert disagreement(raises) == "static float32: RuntimeError: PTX assembly failed"
    assert disagreement(scaled(2, 1 + 1e-3)).startswith("static float32: dv off by")
    assert disagreement(scaled(0, np.nan)) == "static float32: the kernel's h is not finite"
    # the bounds are relative to the terms where they cancel (the shared query's gradient)
    assert "float32: dq off by" in disagreement(scaled(3, 1 + 1e-3))


@pytest.mark.skipif(TRITON is None, reason=TRITON_WHY)
def test_triton_kernel_passes_its_self_check():
    from dar_core.backends.torch.routing import _check_read
    from dar_core.conformance.kernel_check import disagreement

    assert disagreement(lambda impl, *a: _check_read(torch.device(DEVICE), impl, *a),
                        DEVICE) is None


def test_torch_auto_takes_the_kernel_only_on_cuda_after_its_check(monkeypatch):
    from types import SimpleNamespace

    from dar_core.backends.torch import routing as R

    assert R.resolve_impl("auto", torch.zeros(1)) == "history"  # the CPU
    assert R.resolve_impl("history", torch.zeros(1)) == "history"
    cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    if TRITON is not None:
        monkeypatch.setattr(R, "fused_checked", lambda device: True)
        assert R.resolve_impl("auto", cuda) == "fused"
        assert R.resolve_impl("auto", SimpleNamespace(device=cuda.device,
                                                      dtype=torch.float64)) == "history"
    monkeypatch.setattr(R, "fused_checked", lambda device: False)
    assert R.resolve_impl("auto", cuda) == "history"


def test_torch_failed_check_warns_once_and_keeps_the_per_source_path(monkeypatch):
    from dar_core.backends.torch import routing as R

    original = R._check_read

    def broken(device, impl, *inputs):
        if impl == "fused":
            raise RuntimeError("no kernel image is available")
        return original(device, impl, *inputs)

    monkeypatch.setattr(R, "_check_read", broken)
    monkeypatch.setattr(R, "_CHECKED", {})
    with pytest.warns(RuntimeWarning, match=r"failed its check on cpu \(static float32: "
                                            r"RuntimeError: no kernel image"):
        assert R.fused_checked(torch.device("cpu")) is False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once per device: no second warning
        assert R.fused_checked(torch.device("cpu")) is False


@pytest.mark.skipif(TRITON is None, reason=TRITON_WHY)
def test_torch_fused_history_keeps_half_sources():
    from dar_core.backends.torch.routing import FusedHistory

    v = torch.randn(2, 3, 8, dtype=torch.bfloat16, device=DEVICE)
    state = FusedHistory(v, [(slice(0, 1),)], 1e-6)
    assert state.values[0].dtype == torch.bfloat16 and state.rstd[0].dtype == torch.float32


@pytest.mark.skipif(PALLAS is None, reason=PALLAS_WHY)
def test_pallas_self_check_runs_inside_a_trace_and_passes():
    """``fused_checked`` is reached while a forward pass is traced: its thread computes
    concrete numbers there, and the interpreted kernel passes."""
    import jax

    from dar_core.backends.jax import routing as R

    result = jax.jit(lambda x: x * float(R.fused_checked.__wrapped__("cpu")))(1.0)
    assert float(result) == 1.0


@pytest.mark.skipif(PALLAS is None, reason=PALLAS_WHY)
def test_jax_auto_takes_the_kernel_only_on_an_accelerator_after_its_check(monkeypatch):
    import jax
    import jax.numpy as jnp

    from dar_core.backends.jax import routing as R

    assert R.resolve_impl("auto", jnp.float32) == "history"  # the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(R, "fused_checked", lambda platform: platform == "tpu")
    assert R.resolve_impl("auto", jnp.bfloat16) == "fused"
    assert R.resolve_impl("auto", jnp.float64) == "history"  # float64 accumulation
    monkeypatch.setattr(R, "fused_checked", lambda platform: False)
    assert R.resolve_impl("auto", jnp.float32) == "history"


@pytest.mark.skipif(PALLAS is None, reason=PALLAS_WHY)
def test_jax_model_with_the_fused_kernel_matches_the_history_path():
    """``forward(routing_impl="fused")``: the micro model's velocity and every parameter
    gradient as the per-source path's (dynamic queries, chunk 2)."""
    import jax
    import jax.numpy as jnp

    from dar_core.backends.jax.model import forward
    from dar_core.spec.config import RoutingConfig, model_config
    from dar_core.spec.schema import random_params

    cfg = model_config("micro", routing=RoutingConfig(query="dynamic", chunk_size=2))
    p = {k: jnp.asarray(v) for k, v in random_params(cfg, seed=3, dtype=np.float32).items()}
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8, 8)), jnp.float32)
    t, y = jnp.asarray([0.3, 0.8], jnp.float32), jnp.asarray([1, 2])

    def run(impl):
        def loss(params):
            v = forward(params, cfg, x, t, y, routing_impl=impl)
            return jnp.sum(jnp.square(v)), v
        (_, v), g = jax.value_and_grad(loss, has_aux=True)(p)
        return np.asarray(v, np.float64), {k: np.asarray(a, np.float64) for k, a in g.items()}

    (vf, gf), (vh, gh) = run("fused"), run("history")
    assert rel_err(vf, vh) <= tol("forward"), rel_err(vf, vh)
    for k, b in gh.items():
        bound = tol("grad_atol") * np.abs(b).max() + tol("grad_rtol") * np.abs(b)
        assert np.all(np.abs(gf[k] - b) <= bound), (k, float((np.abs(gf[k] - b) / bound).max()))
