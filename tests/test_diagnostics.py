"""Diagnostics: routing weights are distributions, importance equals finite differences."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dar_core.backends.torch import DARTransformer, measure  # noqa: E402
from dar_core.backends.torch.diagnostics import gated_velocity  # noqa: E402
from dar_core.cli import main  # noqa: E402
from dar_core.diagnostics.symptoms import block_state_indices, diagnose, eval_batch  # noqa: E402
from dar_core.io.checkpoint import save_checkpoint  # noqa: E402
from dar_core.spec.config import RoutingConfig, model_config  # noqa: E402
from dar_core.spec.schema import random_params  # noqa: E402


def _ckpt(tmp_path, routing, name):
    cfg = model_config("micro", routing=routing, input_size=16)
    return save_checkpoint(tmp_path / f"{name}.safetensors", cfg,
                           random_params(cfg, 0, dtype=np.float32), meta={"step": 3})


def test_block_states_are_the_inputs_handed_onward():
    cfg = model_config("tiny")  # depth 4, L = 8
    assert block_state_indices(cfg) == [2, 4, 6, 8]


def test_routing_weights_sum_to_one_and_cli_writes_report(tmp_path):
    a = _ckpt(tmp_path, RoutingConfig(query="static_t", chunk_size=2), "dar")
    b = _ckpt(tmp_path, RoutingConfig(mode="residual"), "res")
    out = tmp_path / "diag"
    assert main(["diagnose", "--checkpoint", str(a), "--checkpoint", str(b), "--n", "4",
                 "--timesteps", "0", "0.5", "1", "--out", str(out)]) == 0
    result = json.loads((out / "diagnostics.json").read_text())
    dar, res = result["models"]
    assert result["backend"] == "torch" and result["timesteps"] == [0.0, 0.5, 1.0]
    for p in dar["per_t"]:
        assert len(p["routing"]) == len(dar["sources"]) == 5  # L + 1 aggregators
        for w, src in zip(p["routing"], dar["sources"]):
            assert len(w) == len(src)
            assert min(w) >= 0 and abs(sum(w) - 1.0) < 1e-5
        assert len(p["state_rms"]) == len(p["grad_rms"]) == 2 and len(p["cosine"]) == 1
    assert "routing" not in res["per_t"][0] and len(res["per_t"][0]["importance"]) == 5
    for png in ("symptoms.png", "importance.png", "routing-0.png"):
        assert (out / png).stat().st_size > 5000
    assert not (out / "routing-1.png").exists()


def test_reference_backend_agrees_on_forward_metrics(tmp_path):
    a = _ckpt(tmp_path, RoutingConfig(query="dynamic", chunk_size=3), "dar")
    r_t = diagnose([str(a)], (0.3,), n=4, backend="torch")["models"][0]["per_t"][0]
    r_np = diagnose([str(a)], (0.3,), n=4, backend="reference")["models"][0]["per_t"][0]
    assert r_np["grad_rms"] is None and r_np["importance"] is None
    np.testing.assert_allclose(r_t["state_rms"], r_np["state_rms"], rtol=1e-4)
    np.testing.assert_allclose(r_t["cosine"], r_np["cosine"], rtol=1e-4)
    np.testing.assert_allclose(r_t["routing"][-1], r_np["routing"][-1], rtol=1e-4, atol=1e-6)
    assert abs(r_t["loss"] - r_np["loss"]) < 1e-4 * r_np["loss"]


@pytest.mark.parametrize("t", [0.2, 0.9])
def test_residual_importance_equals_finite_differences(t):
    cfg = model_config("micro", routing="residual", input_size=16)
    params = random_params(cfg, 1)
    batch = eval_batch(cfg, n=4)
    got = measure(cfg, {k: v.astype(np.float32) for k, v in params.items()}, batch, t)
    model = DARTransformer(cfg).double()
    model.load_weights(params)
    x, noise = (torch.from_numpy(batch[k]).double() for k in ("x", "noise"))
    y, tt = torch.from_numpy(batch["y"]), torch.full((4,), t, dtype=torch.float64)
    x_t = tt[:, None, None, None] * x + (1 - tt[:, None, None, None]) * noise

    def loss(i, eps):
        gates = [torch.ones((), dtype=torch.float64) for _ in range(cfg.num_sublayers + 1)]
        gates[i] = gates[i] + eps
        with torch.no_grad():
            pred, _ = gated_velocity(model, x_t, tt, y, gates)
        return float((pred - (x - noise)).square().mean())

    eps = 1e-5
    fd = [(loss(i, eps) - loss(i, -eps)) / (2 * eps) for i in range(cfg.num_sublayers + 1)]
    scale = max(abs(v) for v in fd)
    assert scale > 1e-4
    np.testing.assert_allclose(got["importance"], fd, rtol=0, atol=1e-3 * scale)
