"""The MLX DARTransformer against the core: forward parity with the float64 reference, gradients
against the naive routing path and finite differences, weights, bf16 and input errors."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from dar_core.backends.mlx import DARTransformer, velocity_model  # noqa: E402
from dar_core.backends.mlx.routing import route as mlx_route  # noqa: E402
from dar_core.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from dar_core.sampling.samplers import sample  # noqa: E402
from dar_core.spec import reference  # noqa: E402
from dar_core.spec.config import RoutingConfig, model_config  # noqa: E402
from dar_core.spec.routing import route as core_route  # noqa: E402
from dar_core.spec.schema import (  # noqa: E402
    param_shapes,
    pos_embed_2d,
    random_params,
    trainable_names,
)
from dar_core.testing import PARITY_VARIANTS, assert_close, rel_err  # noqa: E402

ROUTINGS = PARITY_VARIANTS


def micro(routing: RoutingConfig):
    return model_config("micro", routing=routing, depth=4)  # L = 8 sublayers, d = 32


def inputs(cfg, B=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, cfg.in_channels, cfg.input_size, cfg.input_size))
    t = rng.random(B)
    y = rng.integers(0, cfg.num_classes + 1, size=B)
    y[-1] = cfg.num_classes  # the null class is a valid label
    return x.astype(np.float32), t.astype(np.float32), y.astype(np.int64)


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_forward_matches_float64_reference(name):
    cfg = micro(ROUTINGS[name])
    params = random_params(cfg, seed=1)
    x, t, y = inputs(cfg)
    ref = reference.forward(params, cfg, x, t, y)
    out = DARTransformer(cfg).load_weights(params)(x, t, y)
    assert isinstance(out, mx.array) and out.dtype == mx.float32
    assert tuple(out.shape) == ref.shape
    assert_close(np.array(out), ref, 1e-4, f"{name} forward")


def _grads(model, x, t, y, g):
    def loss(m):
        return mx.sum(m.forward(x, t, y) * g)

    _, grads = nn.value_and_grad(model, loss)(model)
    return {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.mark.parametrize("name", [n for n in ROUTINGS if n != "residual"])
def test_gradients_match_naive_route(name):
    cfg = micro(ROUTINGS[name])
    params = random_params(cfg, seed=2)
    x, t, y = (mx.array(a) for a in inputs(cfg, seed=3))
    g = mx.array(np.random.default_rng(4).standard_normal((3, 3, 8, 8)).astype(np.float32))
    fast = _grads(DARTransformer(cfg).load_weights(params), x, t, y, g)
    naive = _grads(DARTransformer(cfg, routing_impl="naive").load_weights(params), x, t, y, g)
    assert sorted(fast) == sorted(trainable_names(cfg))  # every trainable name, no pos_embed
    routers = [k for k in fast if "router" in k]
    assert routers, "a DAR config must have routing parameters"
    worst = 0.0
    for k in fast:
        if k.startswith("blocks.0.attn_router."):  # one source (v_0): alpha = 1, no gradient
            assert not np.any(fast[k]) and not np.any(naive[k]), k
            continue
        assert np.abs(naive[k]).max() > 0, f"{k}: gradient is identically zero"
        worst = max(worst, assert_close(fast[k], naive[k], 1e-4, f"{name} d/d {k}"))
    print(f"{name}: worst relative gradient error {worst:.2e}")


@pytest.mark.parametrize("name", ["residual", "c3_dynamic_no_final", "c4_static_t"])
def test_gradient_matches_reference_finite_difference(name):
    """Directional derivative of a loss vs a central difference of the float64 reference."""
    cfg = micro(ROUTINGS[name])
    params = random_params(cfg, seed=5)
    x, t, y = inputs(cfg, seed=6)
    g = np.random.default_rng(7).standard_normal((3, 3, 8, 8))
    grads = _grads(DARTransformer(cfg).load_weights(params), *map(mx.array, (x, t, y)),
                   mx.array(g.astype(np.float32)))
    rng = np.random.default_rng(8)
    direction = {k: rng.standard_normal(params[k].shape) for k in grads}
    analytic = sum(float(np.sum(grads[k] * direction[k])) for k in grads)
    eps = 1e-4

    def loss(sign):
        p = {k: v + sign * eps * direction[k] if k in direction else v for k, v in params.items()}
        return float(np.sum(reference.forward(p, cfg, x, t, y) * g))

    numeric = (loss(1) - loss(-1)) / (2 * eps)
    assert abs(analytic - numeric) <= 2e-5 * abs(numeric), (analytic, numeric)


def test_efficient_route_matches_core_route():
    rng = np.random.default_rng(9)
    vs = rng.standard_normal((5, 2, 7, 16))
    w = 1 + 0.1 * rng.standard_normal(16)
    for q in (rng.standard_normal(16), rng.standard_normal((2, 1, 16)),
              rng.standard_normal((2, 7, 16))):
        h_ref, a_ref = core_route(vs, q, w)
        h, a = mlx_route([mx.array(v.astype(np.float32)) for v in vs],
                         mx.array(q.astype(np.float32)), mx.array(w.astype(np.float32)))
        assert_close(np.array(h), h_ref, 1e-5, "h")
        assert_close(np.moveaxis(np.array(a), -1, 0), a_ref, 1e-5, "alpha")


def test_parameter_names_and_frozen_pos_embed():
    cfg = micro(ROUTINGS["c4_static_t"])
    m = DARTransformer(cfg)
    names = dict(tree_flatten(m.parameters()))
    assert list(param_shapes(cfg)) == list(m.export_weights())
    assert {k: tuple(v.shape) for k, v in names.items()} == param_shapes(cfg)
    trainable = [k for k, _ in tree_flatten(m.trainable_parameters())]
    assert sorted(trainable) == sorted(trainable_names(cfg)) and "pos_embed" not in trainable
    pos = m.export_weights()["pos_embed"]
    np.testing.assert_allclose(pos[0], pos_embed_2d(cfg.hidden_size, cfg.grid_size), atol=1e-6)


def test_core_weights_load_through_mlx_apis():
    cfg = micro(ROUTINGS["dense_dynamic"])
    params = random_params(cfg, seed=10, dtype=np.float32)
    x, t, y = inputs(cfg)
    ref = reference.forward(params, cfg, x, t, y)
    a = DARTransformer(cfg)
    a.load_weights([(k, mx.array(v)) for k, v in params.items()])  # strict: every name
    b = DARTransformer(cfg)
    b.update(tree_unflatten([(k, mx.array(v)) for k, v in params.items()]))
    for m in (a, b):
        assert_close(np.array(m(x, t, y)), ref, 1e-4, "forward after load")
    for k, v in a.export_weights().items():
        assert np.array_equal(v, params[k]), k


def test_wrong_config_weights_raise_checkpoint_error():
    small = random_params(micro(ROUTINGS["c4_static_t"]))
    with pytest.raises(CheckpointError, match="query_proj"):
        DARTransformer(micro(ROUTINGS["dense_dynamic"])).load_weights(small)
    deeper = micro(ROUTINGS["c4_static_t"]).replace(depth=5)
    with pytest.raises(CheckpointError, match="blocks.4"):
        DARTransformer(deeper).load_weights(small)
    wide = micro(ROUTINGS["c4_static_t"]).replace(hidden_size=64)
    with pytest.raises(CheckpointError, match=r"'pos_embed' has shape \(1, 4, 32\)"):
        DARTransformer(wide).load_weights(small)


def test_bad_inputs_raise_named_errors():
    cfg = micro(ROUTINGS["c4_static_t"])
    m = DARTransformer(cfg)
    x, t, y = inputs(cfg, B=2)
    with pytest.raises(InputError, match=r"\[2, 3, 8\]"):
        m(x[..., 0], t, y)
    with pytest.raises(InputError, match=r"\[2, 4, 8, 8\]"):
        m(np.zeros((2, 4, 8, 8), np.float32), t, y)
    with pytest.raises(InputError, match=r"\[2, 3, 16, 16\]"):
        m(np.zeros((2, 3, 16, 16), np.float32), t, y)
    with pytest.raises(InputError, match=r"t must have shape \[B\] = \[2\], got \[3\]"):
        m(x, np.zeros(3, np.float32), y)
    with pytest.raises(InputError, match="label 11 is out of range"):
        m(x, t, np.array([0, 11]))
    with pytest.raises(InputError, match="label -1 is out of range"):
        m(x, t, np.array([-1, 3]))
    with pytest.raises(InputError, match="integer"):
        m(x, t, np.array([1.0, 2.0], np.float32))
    with pytest.raises(InputError, match="1.5"):
        m(x, np.array([0.5, 1.5], np.float32), y)
    with pytest.raises(InputError, match="-0.25"):
        m(mx.array(x), mx.array(np.array([-0.25, 0.5], np.float32)), mx.array(y))
    x_nan = x.copy()
    x_nan[1, 0, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        m(x_nan, t, y)
    with pytest.raises(ConfigError, match="'fast'"):
        DARTransformer(cfg, routing_impl="fast")
    with pytest.raises(ConfigError, match="no fused routing kernel"):
        DARTransformer(cfg, routing_impl="fused")
    with pytest.raises(ConfigError, match="fp16"):
        velocity_model(cfg, random_params(cfg), precision="fp16")
    with pytest.raises(ConfigError, match="'mps'"):
        velocity_model(cfg, random_params(cfg), device="mps")


def test_bf16_compute_keeps_float32_weights():
    cfg = micro(ROUTINGS["c4_static_t"])
    params = random_params(cfg, seed=11)
    x, t, y = inputs(cfg)
    ref = reference.forward(params, cfg, x, t, y)
    m = DARTransformer(cfg, dtype=mx.bfloat16).load_weights(params)
    out = m(x, t, y)
    assert out.dtype == mx.float32
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(m.parameters()))
    err = rel_err(np.array(out), ref)
    assert 1e-4 < err < 5e-2, err  # really computed in bf16, and still close


def test_velocity_model_samples_through_the_contract():
    cfg = micro(ROUTINGS["c3_static_t"])
    params = random_params(cfg, seed=12)
    vm = velocity_model(cfg, params, device="cpu")
    noise = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, cfg.num_classes])
    out = vm.to_numpy(sample(vm.velocity, vm.asarray(noise), vm.asarray(y), sampler="euler",
                             steps=3, cfg_scale=2.0, null_class=cfg.null_class))

    def v_ref(x, t, yy):
        return reference.forward(params, cfg, x, np.full(len(x), t), yy)

    expected = sample(v_ref, noise.astype(np.float64), y, sampler="euler", steps=3,
                      cfg_scale=2.0, null_class=cfg.null_class)
    assert out.dtype == np.float32 and out.shape == noise.shape
    assert_close(out, expected, 1e-4, "euler + CFG samples")
    with pytest.raises(InputError, match="label 11"):
        vm.velocity(vm.asarray(noise), 0.5, vm.asarray(np.array([0, 1, 2, 11])))
