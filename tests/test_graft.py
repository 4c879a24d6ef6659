"""Grafting DAR onto a trained residual model (docs/spec.md §3.1, §7 item 9), and the
``static_t`` time gain that makes the graft function-preserving for every query."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dar_core.backend import BACKENDS, installed_backends, load_backend
from dar_core.cli import main
from dar_core.conformance.plain_dit import dit_forward
from dar_core.conformance.tolerances import forward_tol, sensitivity
from dar_core.errors import CheckpointError, ConfigError
from dar_core.io.checkpoint import load_checkpoint, save_checkpoint
from dar_core.pretrained.graft import graft_config, graft_deviation, graft_params
from dar_core.spec.config import ModelConfig, RoutingConfig, model_config
from dar_core.spec.reference import forward
from dar_core.spec.schema import init_params, param_shapes, random_params
from dar_core.testing import parity_inputs, rel_err

RES = model_config("tiny", routing="residual")  # depth 4 (L = 8), d 64, 16x16x3, 10 classes
QUERIES = ("static", "static_t", "dynamic")


def f32(p: dict) -> dict:
    """float32 weights, so the float64 oracles and the backends see the same numbers."""
    return {k: v.astype(np.float32) for k, v in p.items()}


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in installed_backends():
        pytest.skip(f"{request.param} is not installed")
    return load_backend(request.param)


# The time gain ----------------------------------------------------------------------------
def test_time_gain_is_opt_in_and_static_t_only():
    plain = RoutingConfig(query="static_t")
    assert plain.time_gain is False
    assert not any("time_gain" in k for k in param_shapes(RES.replace(routing=plain)))
    gained = RES.replace(routing=RoutingConfig(query="static_t", time_gain=True))
    gains = {k: v for k, v in param_shapes(gained).items() if k.endswith(".time_gain")}
    assert len(gains) == RES.num_sublayers + 1 and set(gains.values()) == {(1,)}
    init = init_params(gained)
    assert all(np.array_equal(init[k], [1.0]) for k in gains)  # from scratch: w + e(t)
    for q in ("static", "dynamic"):
        with pytest.raises(ConfigError, match=f"time_gain=True needs query='static_t'.*{q}"):
            RoutingConfig(query=q, time_gain=True)
    with pytest.raises(ConfigError, match="routing.time_gain must be a bool"):
        RoutingConfig(time_gain=1)
    # old configs (no field) load with the gain off; new ones round-trip it
    old = json.loads(RES.replace(routing=plain).to_json())
    del old["routing"]["time_gain"]
    assert ModelConfig.from_dict(old).routing.time_gain is False
    assert ModelConfig.from_json(gained.to_json()) == gained


def test_unit_time_gain_is_the_paper_query_bit_for_bit(backend):
    """g = 1 multiplies e(t) by one: the same numbers as the paper's w + e(t), exactly."""
    cfg = RES.replace(routing=RoutingConfig(query="static_t", chunk_size=3))
    gained = RES.replace(routing=RoutingConfig(query="static_t", chunk_size=3, time_gain=True))
    p = f32(random_params(cfg, 5))
    pg = {**p, **{k: np.ones(1, np.float32) for k in param_shapes(gained) if "time_gain" in k}}
    x, t, y = parity_inputs(cfg)
    a = backend.numerics.forward(cfg, p, x, t, y, "float32", "cpu")
    b = backend.numerics.forward(gained, pg, x, t, y, "float32", "cpu")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(forward(p, cfg, x, t, y), forward(pg, gained, x, t, y))


# Dense grafts keep the function -----------------------------------------------------------
def _naive_static_t(p: dict, dst: ModelConfig) -> tuple[dict, ModelConfig]:
    """What a static_t graft was before the time gain: routers at init, pretrained e(t)."""
    cfg = dst.replace(routing=RoutingConfig(query="static_t", chunk_size=1))
    q = dict(p)
    q.update({k: v for k, v in init_params(cfg).items() if "_router." in k or "final_router" in k})
    return q, cfg


@pytest.mark.parametrize("query", QUERIES)
def test_dense_graft_keeps_the_function(backend, query):
    """S = 1: the grafted model is exactly a plain DiT fed LayerNorm(sum / n) (within the
    draw's float32 tolerance), so it differs from the residual model by the LayerNorm eps
    alone: |graft - residual| <= tol * |mean DiT| + |mean DiT - DiT| (float64) + tol * |DiT|.
    """
    p = f32(random_params(RES, 3))
    dst = graft_config(RES, query, 1)
    assert dst.routing.time_gain is (query == "static_t")
    notes: list[str] = []
    g = graft_params(p, RES, dst, notes)
    assert "function kept up to the LayerNorm eps" in notes[-1]
    x, t, y = parity_inputs(RES)
    out_g = backend.numerics.forward(dst, g, x, t, y, "float32", "cpu")
    out_r = backend.numerics.forward(RES, p, x, t, y, "float32", "cpu")
    mean64 = dit_forward(p, RES, x, t, y, mean_inputs=True)
    res64 = dit_forward(p, RES, x, t, y)
    tol_m = forward_tol("forward", sensitivity(
        lambda q, xx: dit_forward(q, RES, xx, t, y, mean_inputs=True), p, x))
    tol_r = forward_tol("forward", sensitivity(lambda q, xx: dit_forward(q, RES, xx, t, y), p, x))
    assert rel_err(out_g, mean64) <= tol_m
    bound = (tol_m * np.abs(mean64).max() + np.abs(mean64 - res64).max()
             + tol_r * np.abs(res64).max())
    assert np.abs(out_g - out_r).max() <= bound
    # the bound is tight enough to catch the graft it replaces (static_t without the gain)
    q, cfg = _naive_static_t(p, RES)
    naive = backend.numerics.forward(cfg, q, x, t, y, "float32", "cpu")
    assert np.abs(naive - out_r).max() > 10 * bound


def test_static_t_without_the_gain_is_refused():
    dst = RES.replace(routing=RoutingConfig(query="static_t", chunk_size=1))
    with pytest.raises(ConfigError, match="needs routing.time_gain=True"):
        graft_params(f32(random_params(RES, 0)), RES, dst)


def test_gain_is_zero_after_a_graft_and_trains():
    """The gain starts at 0 but is not stuck there: the loss has a gradient in it."""
    torch = pytest.importorskip("torch")
    from dar_core.backends.torch import DARTransformer

    p = f32(random_params(RES, 3))
    dst = graft_config(RES, "static_t", 1)
    g = graft_params(p, RES, dst)
    assert all(np.array_equal(v, [0.0]) for k, v in g.items() if k.endswith("time_gain"))
    model = DARTransformer(dst).load_weights(g)
    x, t, y = (torch.tensor(a) for a in parity_inputs(RES))
    model(x.float(), t.float(), y).square().mean().backward()
    grads = [float(m.time_gain.grad.abs()) for m in model.modules() if
             getattr(m, "time_gain", None) is not None]
    assert len(grads) == RES.num_sublayers + 1
    assert sum(v > 0 for v in grads) >= RES.num_sublayers  # aggregator 1 sees one source


# Chunked grafts and changed routing -------------------------------------------------------
@pytest.mark.parametrize("chunk", [2, 4])
def test_chunked_graft_is_not_function_preserving_and_says_so(chunk):
    p = random_params(RES, 3)
    dense, chunked = graft_config(RES, "static", 1), graft_config(RES, "static", chunk)
    notes: list[str] = []
    g = graft_params(p, RES, chunked, notes)
    assert notes[-1].startswith(f"function NOT kept: with chunk_size={chunk}")
    gap_dense = graft_deviation(p, RES, graft_params(p, RES, dense), dense)
    gap = graft_deviation(p, RES, g, chunked)
    assert gap > 10 * gap_dense  # well beyond the LayerNorm-eps gap of the dense graft


def test_a_chunk_covering_every_sublayer_is_dense():
    notes: list[str] = []
    graft_params(random_params(RES, 0), RES, graft_config(RES, "dynamic", RES.num_sublayers),
                 notes)
    assert "function kept up to the LayerNorm eps" in notes[-1]


def test_grafts_between_dar_routings_keep_what_they_can():
    src = RES.replace(routing=RoutingConfig(query="static_t", chunk_size=2))
    p = random_params(src, 4)
    x, t, y = parity_inputs(src)
    # the paper's static_t to the gained form: gain 1, the same function exactly
    notes: list[str] = []
    gained = graft_config(src, "static_t", 2)
    g = graft_params(p, src, gained, notes)
    assert all(np.array_equal(v, [1.0]) for k, v in g.items() if k.endswith("time_gain"))
    assert notes[-1].startswith("function kept exactly")
    np.testing.assert_array_equal(forward(g, gained, x, t, y), forward(p, src, x, t, y))
    # static to static_t with gain 0: exactly the static model
    st = src.replace(routing=RoutingConfig(query="static", chunk_size=2))
    ps = random_params(st, 4)
    g = graft_params(ps, st, gained)
    np.testing.assert_array_equal(forward(g, gained, x, t, y), forward(ps, st, x, t, y))
    # a changed chunk size copies the routers but says the function changes
    notes = []
    g = graft_params(p, src, graft_config(src, "static_t", 4), notes)
    np.testing.assert_array_equal(g["final_router.query"], p["final_router.query"])
    assert notes[-1].startswith("function NOT kept: the routing changed")
    # DAR back to residual drops the routers
    notes = []
    g = graft_params(p, src, RES, notes)
    assert sorted(g) == sorted(param_shapes(RES)) and "dropped" in notes[0]


def test_grafts_need_the_same_architecture():
    with pytest.raises(ConfigError, match="hidden_size is 64 in the source and 32"):
        graft_params(random_params(RES, 0), RES, graft_config(RES.replace(hidden_size=32,
                                                                          num_heads=2),
                                                              "static", 1))
    with pytest.raises(CheckpointError, match="graft source: missing parameter"):
        graft_params({}, RES, graft_config(RES, "static", 1))


# The command ------------------------------------------------------------------------------
def test_cli_graft_grafts_params_and_ema(tmp_path, capsys):
    p, ema = f32(random_params(RES, 1)), f32(random_params(RES, 2))
    src = save_checkpoint(tmp_path / "res.safetensors", RES, p, ema=ema, meta={"step": 7})
    out = tmp_path / "dar.safetensors"
    assert main(["graft", str(src), "--query", "static_t", "--chunk-size", "1",
                 "--out", str(out), "--measure", "2"]) == 0
    printed = capsys.readouterr().out
    assert "time gain on" in printed and "relative output change on 2 probe inputs" in printed
    ck = load_checkpoint(out)
    want = graft_config(RES, "static_t", 1)
    assert ck.config == want and ck.ema is not None and "step" not in ck.meta
    for mine, theirs in ((ck.params, graft_params(p, RES, want)),
                         (ck.ema, graft_params(ema, RES, want))):
        assert all(np.array_equal(mine[k], theirs[k]) for k in theirs)
    assert ck.meta["graft"]["deviation"] == pytest.approx(
        graft_deviation(ema, RES, ck.ema, want, n=2), rel=1e-12)


@pytest.mark.parametrize("argv, says", [
    (["--query", "static", "--chunk-size", "0"], "routing.chunk_size must be a positive integer"),
    (["--query", "static", "--chunk-size", "1", "--measure", "-1"], "--measure must be >= 0"),
])
def test_cli_graft_errors_are_one_line(tmp_path, capsys, argv, says):
    src = save_checkpoint(tmp_path / "res.safetensors", RES, f32(random_params(RES, 1)))
    rc = main(["graft", str(src), "--out", str(tmp_path / "o.safetensors"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("dar graft: error: ")
    assert says in err


def test_cli_graft_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 16)
    rc = main(["graft", str(tmp_path / "x.safetensors"), "--query", "static",
               "--chunk-size", "1", "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a safetensors file" in err


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_init_from_starts_at_the_grafted_weights(backend, tmp_path):
    """``dar train --init-from``: a residual run's checkpoint grafted densely with a static_t
    time gain; with lr 0 the first step leaves exactly the grafted weights."""
    from dar_core.backend import is_installed, load_backend
    from dar_core.io.checkpoint import load_checkpoint
    from dar_core.pretrained.graft import graft_params
    from dar_core.train.run import TrainConfig

    if not is_installed(backend):
        pytest.skip(f"{backend} is not installed")
    train = load_backend(backend).train
    base = TrainConfig(model="micro", image_size=16, batch_size=4, steps=2, ckpt_every=2,
                       sample_every=100, progress=False, routing="residual", lr=1e-2)
    src = load_checkpoint(train(base.replace(out=str(tmp_path / "res"))) / "checkpoints"
                          / "ckpt-0000002.safetensors")
    tc = base.replace(routing="dar", query="static_t", chunk_size=1, time_gain=True, lr=0.0,
                      steps=1, ckpt_every=1, out=str(tmp_path / "dar"),
                      init_from=str(tmp_path / "res" / "checkpoints" / "ckpt-0000002.safetensors"))
    got = load_checkpoint(train(tc) / "checkpoints" / "ckpt-0000001.safetensors")
    want = graft_params(src.params, src.config, got.config)
    assert set(got.params) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got.params[k], v.astype(np.float32), err_msg=k)
    with pytest.raises(ConfigError, match="cannot graft between architectures"):
        train(tc.replace(model="tiny", out=str(tmp_path / "other")))
