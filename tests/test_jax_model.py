"""JAX DARTransformer: forward against the float64 reference, gradients of the efficient
routing against a naive routing through the core ``route``, structure, and input checks."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

from dar_core.backends.jax import DARTransformer, velocity_model  # noqa: E402
from dar_core.backends.jax import model as jax_model  # noqa: E402
from dar_core.backends.jax.model import forward  # noqa: E402
from dar_core.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from dar_core.spec import reference  # noqa: E402
from dar_core.spec.config import model_config  # noqa: E402
from dar_core.spec.routing import source_sets  # noqa: E402
from dar_core.spec.schema import init_params, param_shapes, random_params, router_prefixes  # noqa: E402
from dar_core.testing import PARITY_VARIANTS, parity_inputs, rel_err  # noqa: E402

VARIANTS = PARITY_VARIANTS


def _config(routing, depth=4):
    """L = 2 * depth = 8 sublayers, d = 32, T = 4 tokens: small and quick to compile."""
    return model_config("micro", routing=routing, depth=depth)


def _params(cfg, seed=1):
    """Dense random weights with sharp routing (queries scaled up), so that mixing the wrong
    sources or weights changes the output far beyond the tolerance."""
    p = random_params(cfg, seed=seed)
    for k in p:
        if k.endswith(".query") or k.endswith(".query_proj.weight"):
            p[k] = p[k] * 30.0
    return p


_inputs = parity_inputs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_float32_matches_float64_reference(name):
    cfg = _config(VARIANTS[name])
    p = _params(cfg)
    x, t, y = _inputs(cfg)
    ref = reference.forward(p, cfg, x, t, y)
    model = DARTransformer(cfg)
    out = model(model.load_weights(p), x.astype(np.float32), t.astype(np.float32), y)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4
    if cfg.routing.is_dar:  # the test is sensitive to routing: uniform routing is far off
        flat = {k: (v * 0 if k.endswith("query") or "query_proj" in k else v)
                for k, v in p.items()}
        assert rel_err(reference.forward(flat, cfg, x, t, y), ref) > 1e-2


# Compile quickly (LLVM optimization level 0): these graphs run once.
_QUICK = {"xla_backend_optimization_level": 0}


@pytest.mark.parametrize("name", ["dense_dynamic", "c4_static_t", "c3_dynamic_no_final"])
def test_float64_forward_and_gradients_match_naive_routing(name):
    """In float64 (scoped x64): the buffered, folded-query routing equals the naive routing
    in the forward pass and in the gradient of every parameter, routing parameters included;
    and its output equals the NumPy reference forward."""
    cfg = _config(VARIANTS[name], depth=3)  # L = 6: chunk 4 leaves a partial last chunk
    p = _params(cfg, seed=2)
    x, t, y = _inputs(cfg)
    ref = reference.forward(p, cfg, x, t, y)
    w = np.random.default_rng(5).standard_normal(ref.shape)
    with jax.enable_x64(True):
        pj = {k: jnp.asarray(v, jnp.float64) for k, v in p.items()}
        xj, tj, yj, wj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(w)

        def loss(params, routing_impl):
            out = forward(params, cfg, xj, tj, yj, routing_impl=routing_impl)  # [B, C, H, W]
            return jnp.sum(out * wj), out

        results = {}
        for impl in ("history", "naive"):
            grad_fn = jax.value_and_grad(lambda q, impl=impl: loss(q, impl), has_aux=True)
            (value, out), grads = jax.jit(grad_fn, compiler_options=_QUICK)(pj)
            assert out.dtype == jnp.float64
            results[impl] = (float(value), np.asarray(out), jax.tree.map(np.asarray, grads))
    (lf, out, gf), (ln, out_naive, gn) = results["history"], results["naive"]
    assert rel_err(out, ref) < 1e-12 and rel_err(out, out_naive) < 1e-12
    assert abs(lf - ln) <= 1e-12 * abs(ln)
    assert set(gf) == set(param_shapes(cfg))
    for k in gf:
        assert rel_err(gf[k], gn[k]) < 1e-10, k
    sets = source_sets(cfg.num_sublayers, cfg.routing)[: len(router_prefixes(cfg))]
    for prefix, sources in zip(router_prefixes(cfg), sets, strict=True):
        if len(sources) > 1:  # a softmax over one source has no routing gradient
            for k in gf:
                if k.startswith(prefix + "."):
                    assert np.abs(gf[k]).max() > 0, k


def test_rematerialized_sublayers_give_the_same_gradients():
    """``grad_checkpoint`` recomputes attention/MLP internals in the backward pass only."""
    cfg = _config(VARIANTS["dense_dynamic"], depth=1)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(cfg).items()}
    x, t, y = (jnp.asarray(a, dt) for a, dt in zip(_inputs(cfg), (jnp.float32, jnp.float32,
                                                                    jnp.int32), strict=True))
    grads = []
    for remat in (False, True):
        loss = lambda q, remat=remat: jnp.sum(forward(q, cfg, x, t, y, remat=remat) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(loss))(p)
        assert any("remat" in e.primitive.name for e in _equations(jaxpr.jaxpr)) == remat
        grads.append(jax.jit(jax.grad(loss), compiler_options=_QUICK)(p))
    for k in grads[0]:
        assert rel_err(grads[1][k], grads[0][k]) < 1e-5, k


def _equations(jaxpr):
    """Every equation of a jaxpr, nested jaxprs (inner jits) included."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


@pytest.mark.parametrize("name", ["residual", "c4_static_t", "dense_dynamic"])
def test_sources_are_written_once_and_never_restacked(name):
    """Efficient routing, read off the traced program: the only gather is the label lookup,
    no 4-D array (a stack of sources) is ever built, and each source's RMS statistic is
    computed once (B*T roots per source, plus B*T per LayerNorm) - the naive routing, checked
    the same way, fails both."""

    def primitives(routing_impl):
        cfg = _config(VARIANTS[name])
        p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(cfg).items()}
        x, t, y = _inputs(cfg)
        fn = lambda q: forward(q, cfg, jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                               jnp.asarray(y), routing_impl=routing_impl)
        eqns = list(_equations(jax.make_jaxpr(fn)(p).jaxpr))
        stacked = [e for e in eqns if e.primitive.name in ("concatenate", "stack")
                   and e.outvars[0].aval.ndim == 4]
        roots = sum(e.outvars[0].aval.size for e in eqns  # root elements computed
                    if e.primitive.name in ("sqrt", "rsqrt"))
        return cfg, [e.primitive.name for e in eqns], stacked, roots

    cfg, prims, stacked, roots = primitives("history")
    L = cfg.num_sublayers
    assert prims.count("gather") == 1
    assert not stacked
    tokens = 3 * cfg.num_tokens  # B * T per source or LayerNorm
    assert roots == (L + 1) * tokens * (2 if cfg.routing.is_dar else 1)
    if cfg.routing.is_dar:
        _, _, naive_stacked, naive_roots = primitives("naive")
        assert naive_stacked and naive_roots > roots


def test_init_is_the_core_init_and_loads_checkpoint_dicts():
    cfg = _config(VARIANTS["c4_static_t"])
    model = DARTransformer(cfg)
    params = model.init(seed=3)
    core = init_params(cfg, seed=3)
    assert set(params) == set(param_shapes(cfg))
    for k, v in core.items():
        assert params[k].dtype == jnp.float32 and np.array_equal(np.asarray(params[k]), v), k
    x, t, y = _inputs(cfg)
    loaded = model.load_weights(core)
    out = model(loaded, x.astype(np.float32), t.astype(np.float32), y)
    assert rel_err(out, reference.forward(core, cfg, x, t, y)) < 1e-4


def test_bf16_precision_is_close_to_fp32():
    cfg = _config(VARIANTS["c4_static_t"])
    p = random_params(cfg, seed=4)
    x, t, y = _inputs(cfg)
    ref = reference.forward(p, cfg, x, t, y)
    vm = velocity_model(cfg, p, precision="bf16", device="cpu")
    out = vm.to_numpy(vm.velocity(vm.asarray(x.astype(np.float32)), 0.37, vm.asarray(y)))
    assert out.dtype == np.float32
    err = rel_err(out, reference.forward(p, cfg, x, np.full(3, 0.37), y))
    assert 1e-5 < err < 5e-2  # really computed in bf16, and still close
    assert ref.shape == out.shape


@pytest.mark.parametrize("change, error, match", [
    (dict(x=np.zeros((2, 3, 8))), InputError, r"x must be \[B, C, H, W\] = \[B, 3, 8, 8\]"),
    (dict(x=np.zeros((2, 1, 8, 8))), InputError, r"got \[2, 1, 8, 8\]"),
    (dict(x=np.zeros((2, 3, 16, 16))), InputError, r"got \[2, 3, 16, 16\]"),
    (dict(t=np.zeros(3)), InputError, r"t must have shape \[B\] = \[2\], got \[3\]"),
    (dict(y=np.array([0, 11])), InputError, r"label 11 is out of range"),
    (dict(y=np.array([-1, 0])), InputError, r"label -1 is out of range"),
    (dict(y=np.array([0.0, 1.0])), InputError, r"integer class labels"),
    (dict(t=np.array([0.5, 1.5])), InputError, r"t must lie in \[0, 1\].*1\.5"),
    (dict(t=np.array([-0.25, 0.5])), InputError, r"-0\.25"),
    (dict(t=np.array([np.nan, 0.5])), InputError, r"t must lie in \[0, 1\]"),
    (dict(x=np.full((2, 3, 8, 8), np.nan)), InputError, r"NaN or inf"),
])
def test_bad_inputs_raise_named_errors_before_tracing(change, error, match, monkeypatch):
    cfg = _config(VARIANTS["c4_static_t"])
    model = DARTransformer(cfg)
    params = model.init()
    good = dict(x=np.zeros((2, 3, 8, 8), np.float32), t=np.array([0.1, 0.9], np.float32),
                y=np.array([0, 10]))
    args = {**good, **change}

    def traced(*a, **k):
        raise AssertionError("bad input reached the jitted forward")

    monkeypatch.setattr(jax_model, "forward_jit", traced)  # rejected before any tracing
    with pytest.raises(error, match=match):
        model(params, **args)
    with pytest.raises(AssertionError, match="reached the jitted forward"):
        model(params, **good)  # while good input does reach it


def test_weights_of_another_config_are_rejected():
    model = DARTransformer(_config(VARIANTS["c4_static_t"]))
    other = init_params(_config(VARIANTS["dense_dynamic"]))
    with pytest.raises(CheckpointError, match=r"query"):
        model.load_weights(other)
    wider = init_params(model_config("micro", routing=VARIANTS["c4_static_t"], depth=4,
                                     hidden_size=64))
    with pytest.raises(CheckpointError, match=r"pos_embed.*has shape \(1, 4, 64\)"):
        model.load_weights(wider)
    with pytest.raises(CheckpointError, match=r"query"):  # the call checks names too
        model({k: jnp.asarray(v) for k, v in other.items()}, np.zeros((1, 3, 8, 8), np.float32),
              np.zeros(1, np.float32), np.zeros(1, np.int64))


def test_velocity_model_rejects_bad_precision_and_device():
    cfg = _config(VARIANTS["residual"])
    with pytest.raises(ConfigError, match=r"'fp16'"):
        velocity_model(cfg, init_params(cfg), precision="fp16")
    with pytest.raises(ConfigError, match=r"'tpu:7'"):
        velocity_model(cfg, init_params(cfg), device="tpu:7")
