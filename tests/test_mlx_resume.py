"""Kill-and-resume: a training subprocess SIGKILLed after its first checkpoint, resumed with
``resume="auto"``, ends bit-identical to an uninterrupted run (params, EMA, AdamW state)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from dar_core.backends.mlx import train  # noqa: E402
from dar_core.io.checkpoint import load_checkpoint  # noqa: E402
from dar_core.train.run import TrainConfig  # noqa: E402

# The child trains normally; only its log call sleeps, so the kill lands mid-run.
CHILD = """
import json, sys, time
from dar_core.train.run import Run, TrainConfig
from dar_core.backends.mlx import train
log = Run.log
def slow_log(self, *args, **kwargs):
    log(self, *args, **kwargs)
    time.sleep(0.25)
Run.log = slow_log
train(TrainConfig(**json.loads(sys.argv[1])))
"""


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    tc = TrainConfig(model="micro", image_size=16, batch_size=8, steps=10, lr=1e-3,
                     ckpt_every=4, sample_every=1000, log_every=1, progress=False, compile=True,
                     out=str(tmp_path / "killed"))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(dataclasses.asdict(tc))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = tmp_path / "killed" / "checkpoints" / "ckpt-0000004.safetensors"
    deadline = time.monotonic() + 120
    while not first.exists():
        if proc.poll() is not None:
            pytest.fail(f"training child exited early:\n{proc.stdout.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 120 s")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()
    ckpts = sorted(p.name for p in first.parent.iterdir() if p.suffix == ".safetensors")
    assert ckpts == ["ckpt-0000004.safetensors"], ckpts  # killed before the next one

    train(tc.replace(resume="auto"))
    train(tc.replace(out=str(tmp_path / "straight")))

    final = "checkpoints/ckpt-0000010.safetensors"
    a = load_checkpoint(tmp_path / "killed" / final)
    b = load_checkpoint(tmp_path / "straight" / final)
    for section in ("params", "ema", "opt"):
        da, db = getattr(a, section), getattr(b, section)
        assert sorted(da) == sorted(db)
        for k in db:
            assert np.array_equal(da[k], db[k]), f"{section}/{k} differs after resume"
    metrics = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text()
               .splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text()
                .splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))  # no duplicates from the kill
    assert [m["loss"] for m in metrics] == [m["loss"] for m in straight]
