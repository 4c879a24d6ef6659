"""Learning-rate schedules, gradient accumulation, TensorBoard and ``--config``: the core says
what they are; every backend's framework schedulers and training step are checked against it."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from dar_core.backend import BACKENDS, is_installed, load_backend
from dar_core.cli import main
from dar_core.conformance.tolerances import tol
from dar_core.errors import ConfigError
from dar_core.io.checkpoint import load_checkpoint
from dar_core.testing import ulp_tol
from dar_core.train.run import TrainConfig

BASE = TrainConfig(model="micro", image_size=16, batch_size=8, lr=1e-3, sample_every=1000,
                   log_every=1, progress=False)
SCHEDULES = [dict(), dict(warmup_steps=5), dict(lr_schedule="cosine", min_lr=1e-5),
             dict(lr_schedule="cosine", warmup_steps=7), dict(warmup_steps=1)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if not is_installed(request.param):
        pytest.skip(f"{request.param} is not installed")
    return request.param


def test_the_schedule_spec():
    tc = BASE.replace(steps=25, warmup_steps=5, lr_schedule="cosine", min_lr=1e-5)
    assert [tc.lr_at(k) for k in range(5)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert tc.lr_at(5) == 1e-3  # the cosine starts at lr where the warm-up ends
    assert tc.lr_at(15) == pytest.approx((1e-5 + 1e-3) / 2)  # half-way through the cosine
    lrs = [tc.lr_at(k) for k in range(5, 25)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 1e-5
    assert BASE.replace(warmup_steps=1).lr_at(0) == BASE.lr == BASE.lr_at(10**6)


@pytest.mark.parametrize("kw, message", [
    (dict(lr_schedule="step"), "lr_schedule must be one of ['constant', 'cosine'], got 'step'"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1"),
    (dict(lr_schedule="cosine", warmup_steps=50, steps=50), "warmup_steps=50 leaves no steps"),
    (dict(min_lr=1.0), "min_lr must be a finite number in [0, lr=0.001], got 1.0"),
    (dict(grad_accum=0), "grad_accum must be a positive integer, got 0"),
    (dict(grad_accum=3), "batch_size=8 is not divisible by grad_accum=3"),
])
def test_bad_schedule_and_accumulation_values_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("]", "\\]")):
        BASE.replace(**kw)


def _framework_lrs(backend: str, tc: TrainConfig) -> list[float]:
    """The lr of each of ``tc.steps`` updates, from the backend's own scheduler objects."""
    if backend == "torch":
        import torch

        from dar_core.backends.torch.trainer import make_scheduler

        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=tc.lr)
        sched, out = make_scheduler(opt, tc), []
        for _ in range(tc.steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    if backend == "jax":
        from dar_core.backends.jax.trainer import make_schedule

        schedule = make_schedule(tc)
        return [float(schedule(k)) for k in range(tc.steps)]
    import mlx.core as mx

    from dar_core.backends.mlx.trainer import make_schedule

    schedule = make_schedule(tc)
    return [float(schedule(mx.array(k)).item()) if callable(schedule) else schedule
            for k in range(tc.steps)]


@pytest.mark.parametrize("kw", SCHEDULES)
def test_framework_schedulers_follow_the_spec(backend, kw):
    tc = BASE.replace(steps=30, **kw)
    # torch computes in float64 (a recursive product over the steps); optax and MLX in float32
    # (a cosine and a few products): bounds relative to lr.
    bound = ulp_tol(tc.steps, np.float64) if backend == "torch" else ulp_tol(8, np.float32)
    got = np.array(_framework_lrs(backend, tc))
    want = np.array([tc.lr_at(k) for k in range(tc.steps)])
    assert np.abs(got - want).max() <= bound * tc.lr, np.abs(got - want).max() / tc.lr


def _event_files(folder) -> list[dict[str, dict[int, float]]]:
    """Scalars of each TensorBoard event file under ``folder``, oldest first (TFRecord
    framing: length, its CRC, the Event protobuf, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    files = []
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        data, pos, out = path.read_bytes(), 0, {}
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
        files.append(out)
    return files


def _events(folder) -> dict[str, dict[int, float]]:
    """All files' scalars, later files overriding earlier ones."""
    out: dict[str, dict[int, float]] = {}
    for f in _event_files(folder):
        for tag, values in f.items():
            out.setdefault(tag, {}).update(values)
    return out


def test_a_run_logs_the_schedule_it_followed_and_tensorboard_events(backend, tmp_path):
    tc = BASE.replace(steps=6, warmup_steps=3, lr_schedule="cosine", grad_accum=2,
                      ckpt_every=6, out=str(tmp_path / backend))
    run_dir = load_backend(backend).train(tc)
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:  # the framework's lr of that update (float32 in optax and MLX)
        assert abs(r["lr"] - tc.lr_at(r["step"] - 1)) <= ulp_tol(8, np.float32) * tc.lr, r
    scalars = _events(run_dir / "tensorboard")
    assert set(scalars) >= {"train/loss", "train/grad_norm", "train/lr"}
    assert sorted(scalars["train/loss"]) == list(range(1, 7))
    for r in recs:  # the events hold metrics.jsonl's values (as float32)
        assert scalars["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)


def test_accumulated_micro_batches_give_the_big_batch_step(backend, tmp_path):
    # adam_eps = 1 makes the first update lr * g / (|g| + 1): proportional to the gradient, so
    # a mis-scaled accumulation (a sum instead of a mean) shows in the parameters.
    tc = BASE.replace(steps=1, ckpt_every=1, adam_eps=1.0, lr=1e-2, grad_clip=0.0)
    one, four = (load_checkpoint(load_backend(backend).train(
        tc.replace(grad_accum=k, out=str(tmp_path / f"k{k}"))) / "checkpoints" /
        "ckpt-0000001.safetensors") for k in (1, 4))
    logs = [json.loads((tmp_path / f"k{k}" / "metrics.jsonl").read_text()) for k in (1, 4)]
    # Two float32 evaluations of one loss and gradient, summed in other orders: the suite's
    # float32 gradient bound, relative to the largest entry; the loss to the same relative.
    g_tol = tol("grad_atol")
    assert abs(logs[0]["loss"] - logs[1]["loss"]) <= g_tol * logs[0]["loss"]
    assert abs(logs[0]["grad_norm"] - logs[1]["grad_norm"]) <= g_tol * logs[0]["grad_norm"]
    for k, p1 in one.params.items():
        m = one.opt.get(f"m/{k}")
        if m is None:  # a fixed buffer
            continue
        g = m / (1 - tc.beta1)  # the first moment after one step is (1 - beta1) g
        dg = g_tol * float(np.abs(g).max())
        np.testing.assert_allclose(four.opt[f"m/{k}"], m, rtol=0, atol=(1 - tc.beta1) * dg + 1e-30)
        # |d(g / (|g| + eps))/dg| <= 1 / eps: the update moves by at most lr * dg / eps
        allowed = tc.lr * dg / tc.adam_eps + ulp_tol(4, np.float32) * float(np.abs(p1).max())
        assert float(np.abs(four.params[k] - p1).max()) <= allowed, k


def test_resume_follows_the_schedule_bit_identically(backend, tmp_path):
    tc = BASE.replace(steps=6, warmup_steps=3, lr_schedule="cosine", ckpt_every=3)
    full = load_backend(backend).train(tc.replace(out=str(tmp_path / "full")))
    part = tc.replace(out=str(tmp_path / "part"))
    load_backend(backend).train(part)
    (tmp_path / "part" / "checkpoints" / "ckpt-0000006.safetensors").unlink()
    load_backend(backend).train(part.replace(resume="auto"))
    a, b = (load_checkpoint(d / "checkpoints" / "ckpt-0000006.safetensors")
            for d in (full, tmp_path / "part"))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    for k in a.opt:
        np.testing.assert_array_equal(a.opt[k], b.opt[k], err_msg=k)
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "part" / "metrics.jsonl")
           .read_text().splitlines()]
    assert lrs == [json.loads(ln)["lr"] for ln in (full / "metrics.jsonl").read_text()
                   .splitlines()]
    first, resumed = _event_files(tmp_path / "part" / "tensorboard")
    assert sorted(first["train/lr"]) == list(range(1, 7))
    assert sorted(resumed["train/lr"]) == [4, 5, 6]  # continued after the checkpoint


def test_train_config_file_with_flags_overriding_it(tmp_path, capsys):
    pytest.importorskip("torch")
    cfg = tmp_path / "run.toml"
    cfg.write_text('[train]\nbackend = "torch"\nmodel = "micro"\nimage-size = 16\n'
                   'batch_size = 4\nsteps = 2\nlr = 2e-3\nwarmup_steps = 2\nprogress = false\n'
                   f'sample_every = 100\nout = "{tmp_path / "from-file"}"\n')
    out = tmp_path / "flag-out"
    assert main(["train", "--config", str(cfg), "--lr", "5e-3", "--out", str(out)]) == 0
    ck = load_checkpoint(out / "checkpoints" / "ckpt-0000002.safetensors")
    train = ck.meta["train"]  # the resolved config: the file's fields, then the flags
    assert (train["lr"], train["warmup_steps"], train["batch_size"]) == (5e-3, 2, 4)
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 5e-3
    assert not (tmp_path / "from-file").exists()


@pytest.mark.parametrize("text, message", [
    ("lrr = 1e-3\n", "unknown key 'lrr'; expected one of"),
    ("lr = 'fast'\n", "lr must be int or float, got 'fast'"),
    ("steps = true\n", "steps must be int, got True"),
    ("steps = \n", "is not valid TOML"),
    ("backend = 'tpu'\n", "backend must be one of"),
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dar train: error: ") and message in err and "\n" not in err, err


def test_wandb_logs_the_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here: W&B's offline mode
    monkeypatch.setenv("WANDB_SILENT", "true")
    tc = BASE.replace(steps=2, ckpt_every=2, wandb="dar-tests", out=str(tmp_path / "run"))
    run = load_backend("torch").train(tc)
    run_id = (run / "wandb-id").read_text().strip()
    load_backend("torch").train(tc.replace(steps=4, ckpt_every=2, resume="auto"))
    assert (run / "wandb-id").read_text().strip() == run_id  # the same W&B run
    logs = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2
    assert all(b"train/loss" in p.read_bytes() and b"grad_accum" in p.read_bytes()
               for p in logs)  # scalars and the run's config


def test_wandb_asked_for_but_not_installed_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    from dar_core.train.writers import WandbWriter

    with pytest.raises(ConfigError, match="wandb='p' needs the wandb package"):
        WandbWriter(tmp_path, "p", {}, 0)


def test_a_wandb_that_cannot_start_is_one_line_and_leaves_no_record(tmp_path, monkeypatch,
                                                                    capsys):
    pytest.importorskip("torch")
    wandb = pytest.importorskip("wandb")

    def refuse(**kw):
        raise wandb.errors.UsageError("No API key configured.")

    monkeypatch.setattr(wandb, "init", refuse)
    out = tmp_path / "run"
    assert main(["train", "--model", "micro", "--steps", "1", "--wandb", "p", "--no-progress",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dar train: error: wandb could not start a run in project 'p' "
                          "(UsageError: No API key configured.)"), err
    assert not (out / "config.json").exists() and not (out / "wandb-id").exists()
