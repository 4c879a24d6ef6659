"""What every backend's training loop must do, written once and run for each installed
backend through the contract's ``train(tc)``: stop on a NaN loss naming the step and keeping
the last good checkpoint; resume after SIGKILL bit-identical to an uninterrupted run (params,
EMA and the AdamW state round-tripped through the checkpoint); take a first AdamW step that a
NumPy AdamW reproduces; give the same run with gradient checkpointing as without; and run the
backend's example (``examples/``, one command line for all: ``dar_core.train.example``) end to
end on a CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dar_core.backend import BACKENDS, installed_backends, load_backend
from dar_core.errors import NonFiniteLossError
from dar_core.io.checkpoint import load_checkpoint
from dar_core.spec.schema import NON_TRAINABLE, init_params
from dar_core.testing import assert_close, ulp_tol
from dar_core.train.run import TrainConfig, TrainStream

INSTALLED = installed_backends()
BASE = TrainConfig(model="micro", image_size=16, batch_size=8, lr=1e-3, sample_every=1000,
                   log_every=1, progress=False)

# The child trains normally; only its log call sleeps, so a kill lands mid-run.
CHILD = """
import json, sys, time
from dar_core.backend import load_backend
from dar_core.train.run import Run, TrainConfig
log = Run.log
def slow_log(self, *args, **kwargs):
    log(self, *args, **kwargs)
    time.sleep(0.25)
Run.log = slow_log
load_backend(sys.argv[1]).train(TrainConfig(**json.loads(sys.argv[2])))
"""


@pytest.fixture(params=BACKENDS)
def name(request):
    if request.param not in INSTALLED:
        pytest.skip(f"{request.param} is not installed")
    return request.param


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}


def _run(name: str, tc: TrainConfig) -> subprocess.CompletedProcess:
    """Train in a fresh process (no framework state shared with this one or other runs)."""
    return subprocess.run([sys.executable, "-c", CHILD.replace("time.sleep(0.25)", "pass"),
                           name, json.dumps(dataclasses.asdict(tc))], env=_env(),
                          capture_output=True, text=True, timeout=600, check=True)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        name, tmp_path, monkeypatch):
    clean = TrainStream.batch

    def poisoned(self, step, rank=0, world=1):
        b = clean(self, step, rank, world)
        if step == 5:  # the loop's step index 5: the sixth step, after 5 good ones
            b["noise"] = np.full_like(b["noise"], np.nan)
        return b

    monkeypatch.setattr(TrainStream, "batch", poisoned)
    tc = BASE.replace(steps=12, ckpt_every=4, out=str(tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match=r"at step 5\b"):
        load_backend(name).train(tc)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["ckpt-0000004.safetensors"]
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / ckpts[0])
    assert all(np.isfinite(v).all() for v in ck.params.values())
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]


def _resume_and_compare(name: str, tc: TrainConfig, interrupted: Path, straight: Path) -> None:
    """Resume the interrupted run to its end, run it uninterrupted elsewhere, and require the
    final params, EMA and AdamW state to be bit-identical."""
    _run(name, tc.replace(resume="auto"))
    _run(name, tc.replace(out=str(straight)))
    final = "checkpoints/ckpt-0000010.safetensors"
    a, b = load_checkpoint(interrupted / final), load_checkpoint(straight / final)
    for section in ("params", "ema", "opt"):
        da, db = getattr(a, section), getattr(b, section)
        assert sorted(da) == sorted(db), section
        for k in db:
            assert np.array_equal(da[k], db[k]), f"{section}/{k} differs after resume"


def _start_until_first_checkpoint(name: str, tc: TrainConfig) -> subprocess.Popen:
    """A slowed training child, returned once its step-4 checkpoint exists."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, name,
                             json.dumps(dataclasses.asdict(tc))], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = Path(tc.out) / "checkpoints" / "ckpt-0000004.safetensors"
    deadline = time.monotonic() + 240
    while not first.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no first checkpoint:\n{proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.02)
    return proc


def test_sigkill_then_resume_is_bit_identical(name, tmp_path):
    tc = BASE.replace(steps=10, ckpt_every=4, out=str(tmp_path / "killed"))
    proc = _start_until_first_checkpoint(name, tc)
    first = tmp_path / "killed" / "checkpoints" / "ckpt-0000004.safetensors"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()
    ckpts = sorted(p.name for p in first.parent.iterdir() if p.suffix == ".safetensors")
    assert ckpts == ["ckpt-0000004.safetensors"], ckpts  # killed before the next one

    _resume_and_compare(name, tc, tmp_path / "killed", tmp_path / "straight")
    killed, straight = _metrics(tmp_path / "killed"), _metrics(tmp_path / "straight")
    assert [m["step"] for m in killed] == list(range(1, 11))  # no duplicates from the kill
    assert [m["loss"] for m in killed] == [m["loss"] for m in straight]


def test_first_step_is_adamw_with_decoupled_weight_decay(name, tmp_path):
    """After one step from the core init, the checkpoint holds ``m = (1 - b1) g`` and
    ``v = (1 - b2) g^2`` of the (clipped) gradient ``g``; NumPy AdamW from ``g`` must give the
    saved weights: ``p1 = p0 (1 - lr wd) - lr (m / (1 - b1)) / (sqrt(v / (1 - b2)) + eps)``."""
    tc = BASE.replace(steps=1, ckpt_every=1, weight_decay=0.1, lr=1e-2, adam_eps=1e-3,
                      out=str(tmp_path / "run"))
    load_backend(name).train(tc)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-0000001.safetensors")
    assert int(ck.opt["step"]) == 1
    p0 = init_params(ck.config, tc.seed)
    for k, p1 in ck.params.items():
        if k in NON_TRAINABLE:
            np.testing.assert_array_equal(p1, p0[k].astype(np.float32), err_msg=k)
            continue
        m, v = ck.opt[f"m/{k}"].astype(np.float64), ck.opt[f"v/{k}"].astype(np.float64)
        g = m / (1 - tc.beta1)
        # v is the square of the same g: both moments came from one float32 gradient
        np.testing.assert_allclose(v, (1 - tc.beta2) * g * g, rtol=ulp_tol(8, np.float32),
                                   atol=0, err_msg=f"v/{k}")
        want = (p0[k] * (1 - tc.lr * tc.weight_decay)
                - tc.lr * g / (np.sqrt(v / (1 - tc.beta2)) + tc.adam_eps))
        # float32 arithmetic: a few roundings of |p0| and of the step (<= lr); and a backend
        # may form the bias corrections 1 - b^t in float32, where the subtraction cancels by
        # b / (1 - b) (999x for b2 = 0.999): the step u = m_hat / (sqrt(v_hat) + eps), |u| <= 1,
        # moves by that relative error of m_hat, and half of it of v_hat
        cancel = tc.beta1 / (1 - tc.beta1) + 0.5 * tc.beta2 / (1 - tc.beta2)
        tol = (ulp_tol(8, np.float32) * (np.abs(p0[k]) + tc.lr)
               + ulp_tol(cancel, np.float32) * tc.lr * np.abs(g / (np.abs(g) + tc.adam_eps)))
        np.testing.assert_array_less(np.abs(p1 - want), tol + 1e-30, err_msg=k)


def test_grad_checkpoint_gives_the_same_run(name, tmp_path):
    train = load_backend(name).train
    tc = BASE.replace(steps=2, ckpt_every=2)
    train(tc.replace(out=str(tmp_path / "plain")))
    train(tc.replace(out=str(tmp_path / "remat"), grad_checkpoint=True))
    final = "checkpoints/ckpt-0000002.safetensors"
    a = load_checkpoint(tmp_path / "plain" / final)
    b = load_checkpoint(tmp_path / "remat" / final)
    init = init_params(a.config, tc.seed)
    # Recomputation may re-associate the float32 sums over the batch's B*T tokens that form
    # each weight gradient (on this CPU it does not: the runs agree bitwise). AdamW's step is a
    # ratio of gradient statistics, so its relative change is bounded by the gradient's.
    tokens = tc.batch_size * a.config.num_tokens
    for k in a.params:
        assert_close(b.params[k] - init[k], a.params[k] - init[k],
                     ulp_tol(2 * tokens, np.float32), f"params/{k}")


EXAMPLES = {"torch": "torch_cuda.py", "jax": "jax_tpu.py", "mlx": "mlx_apple.py"}


def test_example_answers_help_and_runs_end_to_end_on_a_cpu(name, tmp_path, tmp_path_factory):
    example = Path(__file__).resolve().parents[1] / "examples" / EXAMPLES[name]
    # --help answers before any framework is imported (a second at most, not a JIT warm-up)
    res = subprocess.run([sys.executable, str(example), "--help"], capture_output=True,
                         text=True, timeout=60, env=_env())
    assert res.returncode == 0, res.stderr
    assert "--final-steps" in res.stdout and "--every" in res.stdout
    out = tmp_path / "demo"
    env = {**_env(),  # JAX: the session's shared compilation cache
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    res = subprocess.run(
        [sys.executable, str(example), "--device", "cpu", "--model", "micro", "--steps", "2",
         "--batch-size", "8", "--every", "2", "--per-class", "1", "--sample-steps", "2",
         "--final-steps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training micro (dar, query=static_t, chunk=4, fp32, batch 8)" in res.stdout
    assert "for 2 steps" in res.stdout and "step 2: loss" in res.stdout
    assert (out / "checkpoints" / "ckpt-0000002.safetensors").is_file()
    assert (out / "samples" / "step-0000002.png").is_file()
    for png in ("final-cfg1.5.png", "final-cfg1.0.png", "training.png"):
        assert (out / png).is_file(), png


def test_sigterm_checkpoints_the_current_step_and_resume_is_bit_identical(name, tmp_path):
    """A cluster's preemption: SIGTERM mid-run finishes the step, writes its checkpoint, says
    how to resume and exits non-zero; the resumed run equals an uninterrupted one."""
    tc = BASE.replace(steps=10, ckpt_every=4, out=str(tmp_path / "stopped"))
    proc = _start_until_first_checkpoint(name, tc)
    first = tmp_path / "stopped" / "checkpoints" / "ckpt-0000004.safetensors"
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode not in (0, -signal.SIGTERM), out[-3000:]
    assert "TrainingInterrupted: stopped by SIGTERM after step" in out, out[-3000:]
    assert "continue with --resume auto" in out
    metrics = _metrics(tmp_path / "stopped")
    last = metrics[-1]["step"]
    assert 4 <= last < 10, last  # stopped mid-run ...
    ckpts = sorted(p.name for p in first.parent.iterdir() if p.suffix == ".safetensors")
    assert ckpts[-1] == f"ckpt-{last:07d}.safetensors", ckpts  # ... with the step it reached
    assert not (tmp_path / "stopped" / ".lock").exists()

    _resume_and_compare(name, tc, tmp_path / "stopped", tmp_path / "straight")
    assert [m["loss"] for m in _metrics(tmp_path / "stopped")] == [
        m["loss"] for m in _metrics(tmp_path / "straight")]
