"""The one backend contract (``dar_core.backend.Backend``), checked once for every installed
backend: the same public names and signatures, and the same errors for the same misuse."""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest

from dar_core.backend import (
    BACKENDS,
    Backend,
    Numerics,
    RoutingState,
    installed_backends,
    load_backend,
)
from dar_core.errors import CheckpointError, ConfigError
from dar_core.io.checkpoint import check_optimizer_state, optimizer_state_keys
from dar_core.spec.config import model_config
from dar_core.spec.schema import random_params, trainable_names

CONTRACT = ("DARTransformer", "train", "velocity_model", "resolve_device", "compute_dtype",
            "History", "NaiveHistory", "ResidualStream", "numerics")
FUNCTIONS = ("train", "velocity_model", "resolve_device", "compute_dtype")
STATES = ("History", "NaiveHistory", "ResidualStream")
NUMERICS = ("forward", "loss_and_grads", "route", "strict_float32")
INSTALLED = installed_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in INSTALLED:
        pytest.skip(f"{request.param} is not installed")
    return load_backend(request.param)


def _public(fn) -> list[tuple[str, object]]:
    """Positional-or-keyword parameters with their defaults (keyword-only extras are a
    backend's own, e.g. JAX's explicit device list)."""
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD]


def test_every_backend_satisfies_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert set(CONTRACT) <= set(backend.__all__)
    assert inspect.isclass(backend.DARTransformer)


def test_signatures_agree_across_backends():
    if len(INSTALLED) < 2:
        pytest.skip("fewer than two backends installed")
    mods = {name: importlib.import_module(f"dar_core.backends.{name}") for name in INSTALLED}
    members = [(fn, lambda m, fn=fn: getattr(m, fn)) for fn in FUNCTIONS]
    members += [(f"numerics.{fn}", lambda m, fn=fn: getattr(m.numerics, fn)) for fn in NUMERICS]
    members += [(f"{c}.{meth}", lambda m, c=c, meth=meth: getattr(getattr(m, c), meth))
                for c in STATES for meth in ("__init__", "write", "read")]
    for what, get in members:
        sigs = {name: _public(get(m)) for name, m in mods.items()}
        assert len({repr(s) for s in sigs.values()}) == 1, f"{what}: {sigs}"


def test_routing_states_read_like_the_core_route(backend):
    """Every routing state class satisfies ``RoutingState``, and in DAR mode reads what the
    core's ``route`` gives on the same sources (the residual stream: their sum)."""
    from dar_core.spec.routing import route

    rng = np.random.default_rng(0)
    vs = rng.standard_normal((3, 2, 4, 8)).astype(np.float32)  # N=3 sources [B, T, d]
    q = rng.standard_normal((2, 1, 8)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(8)).astype(np.float32)
    h64, _ = route(vs.astype(np.float64), q.astype(np.float64), w.astype(np.float64))
    vm = backend.velocity_model(model_config("micro"), random_params(model_config("micro")),
                                device="cpu")
    slices = [(slice(0, 3),)]
    for cls in STATES:
        state = getattr(backend, cls)(vm.asarray(vs[0]), slices, 1e-6)
        assert isinstance(state, RoutingState), cls
        for v in vs[1:]:
            state.write(vm.asarray(v))
        h = vm.to_numpy(state.read(0, vm.asarray(q), vm.asarray(w)))
        want = vs.sum(0) if cls == "ResidualStream" else h64
        # a softmax over 3 dot products of length 8 and a 3-term sum, in float32
        np.testing.assert_allclose(h, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=cls)


def test_numerics_satisfy_the_contract_and_reject_unknown_dtypes(backend):
    assert isinstance(backend.numerics, Numerics)
    assert {"float32", "bfloat16"} <= set(backend.numerics.DTYPES)
    cfg = model_config("micro")
    x = np.zeros((1, cfg.in_channels, cfg.input_size, cfg.input_size), np.float32)
    with pytest.raises(ConfigError, match="'float16'"):
        backend.numerics.forward(cfg, random_params(cfg), x, np.zeros(1), np.zeros(1, int),
                                 "float16")


def test_weights_round_trip_under_the_canonical_names(backend):
    """``load_weights`` takes a canonical name -> NumPy dict and ``export_weights`` gives the
    same dict back (torch and MLX modules hold the weights; JAX returns them as its params)."""
    cfg = model_config("micro", routing="dar")
    weights = {k: v.astype(np.float32) for k, v in random_params(cfg, seed=3).items()}
    model = backend.DARTransformer(cfg)
    loaded = model.load_weights(weights)
    out = model.export_weights() if loaded is model else model.export_weights(loaded)
    assert sorted(out) == sorted(weights)
    for k, v in weights.items():
        assert out[k].dtype == np.float32 and out[k].shape == v.shape, k
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    bad = dict(weights)
    bad.pop("final_layer.linear.weight")
    with pytest.raises(CheckpointError, match="final_layer.linear.weight"):
        model.load_weights(bad)


def test_bad_precision_is_a_config_error(backend):
    with pytest.raises(ConfigError, match="'fp16'"):
        backend.compute_dtype("fp16")
    cfg = model_config("micro")
    with pytest.raises(ConfigError, match="'fp16'"):
        backend.velocity_model(cfg, random_params(cfg), precision="fp16", device="cpu")
    assert backend.compute_dtype("fp32") is not None


def test_bad_device_is_a_config_error(backend):
    with pytest.raises(ConfigError, match="'warp-drive'"):
        backend.resolve_device("warp-drive")
    backend.resolve_device("cpu")


def test_optimizer_state_layout_names_the_missing_key():
    cfg = model_config("micro")
    names = trainable_names(cfg)
    keys = optimizer_state_keys(names)
    assert keys[0] == "step" and len(keys) == 1 + 2 * len(names)
    full = {k: np.zeros(1) for k in keys}
    check_optimizer_state(full, names)
    del full[f"v/{names[3]}"]
    with pytest.raises(CheckpointError, match=f"'opt/v/{names[3]}'"):
        check_optimizer_state(full, names)
    with pytest.raises(CheckpointError, match="'opt/step'"):
        check_optimizer_state(None, names)
