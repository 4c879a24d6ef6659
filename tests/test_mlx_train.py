"""The MLX training loop: run folder, the compiled step (no retracing), AdamW/EMA/clipping
against NumPy, flat memory, NaN stop, bf16, checkpoint state and the ``dar`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402

from dar_core import cli  # noqa: E402
from dar_core.backends.mlx import train  # noqa: E402
from dar_core.backends.mlx.model import DARTransformer  # noqa: E402
from dar_core.backends.mlx.trainer import (  # noqa: E402
    TrainStep,
    loss_fn,
    make_optimizer,
    opt_from_numpy,
    opt_to_numpy,
)
from dar_core.errors import CheckpointError  # noqa: E402
from dar_core.io.checkpoint import load_checkpoint  # noqa: E402
from dar_core.spec.schema import param_shapes, trainable_names  # noqa: E402
from dar_core.testing import assert_close  # noqa: E402
from dar_core.train.run import Run, TrainConfig  # noqa: E402


def tiny_tc(tmp_path, **kw):
    base = dict(model="micro", image_size=16, batch_size=8, steps=4, lr=1e-3, ckpt_every=2,
                sample_every=100, sample_steps=2, per_class=1, log_every=1, progress=False,
                compile=True, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def build_step(tc, **model_kw):
    run = Run(tc, backend="mlx")
    model = DARTransformer(run.cfg, seed=tc.seed, **model_kw)
    opt = make_optimizer(tc)
    opt.init(model.trainable_parameters())
    ema = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    step = TrainStep(model, opt, ema, grad_clip=tc.grad_clip, ema_decay=tc.ema_decay,
                     compile=tc.compile)
    return run, model, opt, ema, step


def batch(run, s):
    b = run.stream.batch(s)
    return (mx.array(b["x"]), mx.array(b["t"]), mx.array(b["y"].astype(np.int32)),
            mx.array(b["noise"]))


def flat_np(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def test_train_writes_run_folder_and_checkpoint_layout(tmp_path):
    tc = tiny_tc(tmp_path, steps=4, sample_every=4)
    out = train(tc)
    assert out == tmp_path / "run"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in recs)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "ckpt-0000002.safetensors", "ckpt-0000004.safetensors"]
    assert (out / "samples" / "step-0000004.png").stat().st_size > 0
    ck = load_checkpoint(out / "checkpoints" / "ckpt-0000004.safetensors")
    names = trainable_names(ck.config)
    assert sorted(ck.opt) == sorted(["step"] + [f"{k}/{n}" for n in names for k in "mv"])
    assert ck.opt["step"] == 4 and ck.opt["step"].dtype == np.int64
    assert ck.meta["step"] == 4 and ck.meta["backend"] == "mlx"
    assert all(v.dtype == np.float32 for v in ck.params.values())
    moved = [n for n in names if not np.array_equal(ck.params[n], ck.ema[n])]
    assert moved, "EMA must lag behind the parameters"
    assert np.array_equal(ck.params["pos_embed"], ck.ema["pos_embed"])


def test_compiled_step_traces_once_and_matches_eager(tmp_path):
    tc = tiny_tc(tmp_path)
    run, model, _, ema, step = build_step(tc)
    _, model_e, _, ema_e, eager = build_step(tc.replace(compile=False))
    for s in range(6):
        lc, nc = step(*batch(run, s))
        le, ne = eager(*batch(run, s))
        assert abs(lc.item() - le.item()) <= 1e-6 * abs(le.item())
    assert step.traces == 1, f"the compiled step was traced {step.traces} times in 6 steps"
    assert eager.traces == 6
    a, b = flat_np(model.parameters()), flat_np(model_e.parameters())
    for k in a:
        assert_close(a[k], b[k], 1e-5, k)


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_step_is_adamw_with_bias_correction_clipping_and_ema(tmp_path, clip):
    """Each optimizer step against a NumPy AdamW on the same gradients (clip 0 = off)."""
    tc = tiny_tc(tmp_path, lr=1e-2, weight_decay=0.1, grad_clip=clip, ema_decay=0.9)
    run, model, opt, ema, step = build_step(tc)
    vg = nn.value_and_grad(model, loss_fn)
    for s in range(2):
        args = batch(run, s)
        _, grads = vg(model, *args)
        g = flat_np(grads)
        p, e = flat_np(model.trainable_parameters()), {k: np.array(v) for k, v in ema.items()}
        st = opt_to_numpy(opt, list(g))
        norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in g.values()))
        coef = min(tc.grad_clip / (norm + 1e-6), 1.0) if tc.grad_clip > 0 else 1.0
        assert (coef < 1) == (tc.grad_clip > 0), "clipping must be exercised, or be off"
        n = int(st["step"]) + 1
        expect_p, expect_e = {}, {}
        for k in g:
            gk = g[k] * coef
            m = tc.beta1 * st[f"m/{k}"] + (1 - tc.beta1) * gk
            v = tc.beta2 * st[f"v/{k}"] + (1 - tc.beta2) * gk**2
            m_hat, v_hat = m / (1 - tc.beta1**n), v / (1 - tc.beta2**n)
            pk = p[k] * (1 - tc.lr * tc.weight_decay) - tc.lr * m_hat / (np.sqrt(v_hat)
                                                                         + tc.adam_eps)
            expect_p[k] = pk
            expect_e[k] = tc.ema_decay * e[k] + (1 - tc.ema_decay) * pk
        _, got_norm = step(*args)
        assert_close(got_norm.item(), norm, 1e-5, "pre-clip grad norm")
        got_p = flat_np(model.trainable_parameters())
        for k in g:  # MLX forms 1 - beta2**n in float32: ~1e-5 relative at n = 2
            assert_close(got_p[k], expect_p[k], 1e-4, f"step {n} param {k}")
            assert_close(np.array(ema[k]), expect_e[k], 1e-4, f"step {n} ema {k}")
        assert opt.state["step"].item() == n


def test_memory_is_flat_over_steps(tmp_path):
    tc = tiny_tc(tmp_path)
    run, _, _, _, step = build_step(tc)
    peaks = []
    for s in range(40):
        args = batch(run, s)
        mx.reset_peak_memory()
        mx.eval(step(*args), step.state)
        peaks.append(mx.get_peak_memory())
    assert peaks[4] > 0, "mx.get_peak_memory() must count on this device"
    assert peaks[39] <= 1.05 * peaks[4], (peaks[4], peaks[39])
    assert mx.get_active_memory() < 2 * peaks[4]


def test_bf16_trains_with_float32_master_weights_and_moments(tmp_path):
    tc = tiny_tc(tmp_path, precision="bf16")
    run, model, opt, ema, step = build_step(tc, dtype=mx.bfloat16)
    _, _, _, _, step32 = build_step(tc.replace(precision="fp32"))
    for s in range(3):
        loss, _ = step(*batch(run, s))
        loss32, _ = step32(*batch(run, s))
        assert abs(loss.item() - loss32.item()) < 3e-2 * loss32.item()
    assert loss.dtype == mx.float32
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(opt.state) if v.ndim > 0)
    assert all(v.dtype == mx.float32 for v in ema.values())
    out = train(tc.replace(steps=2, out=str(tmp_path / "bf16")))
    ck = load_checkpoint(out / "checkpoints" / "ckpt-0000002.safetensors")
    assert all(v.dtype == np.float32 for v in ck.params.values())
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "bf16"


def test_optimizer_state_round_trip_and_missing_keys(tmp_path):
    tc = tiny_tc(tmp_path)
    run, model, opt, _, step = build_step(tc)
    step(*batch(run, 0))
    names = trainable_names(run.cfg)
    saved = opt_to_numpy(opt, names)
    fresh = make_optimizer(tc)
    fresh.init(model.trainable_parameters())
    opt_from_numpy(fresh, saved, names)
    again = opt_to_numpy(fresh, names)
    assert sorted(again) == sorted(saved)
    assert all(np.array_equal(again[k], saved[k]) for k in saved)
    del saved["v/final_router.query"]
    with pytest.raises(CheckpointError, match="opt/v/final_router.query"):
        opt_from_numpy(fresh, saved, names)


def test_resume_with_a_different_config_is_refused(tmp_path):
    tc = tiny_tc(tmp_path, steps=2)
    train(tc)
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-0000002.safetensors"
    with pytest.raises(CheckpointError, match="different model config(.|\n)*query='dynamic'"):
        train(tc.replace(query="dynamic", resume=str(ckpt), out=str(tmp_path / "other")))


def test_dar_cli_trains_and_samples_with_mlx(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["train", "--backend", "mlx", "--model", "micro", "--steps", "2",
                     "--batch-size", "4", "--ckpt-every", "2", "--sample-every", "2",
                     "--sample-steps", "2", "--per-class", "1", "--no-progress",
                     "--out", str(out)]) == 0
    ckpt = out / "checkpoints" / "ckpt-0000002.safetensors"
    png = tmp_path / "s.png"
    assert cli.main(["sample", "--backend", "mlx", "--checkpoint", str(ckpt), "--steps", "2",
                     "--per-class", "1", "--sampler", "sde", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    assert set(load_checkpoint(ckpt).params) == set(param_shapes(load_checkpoint(ckpt).config))
