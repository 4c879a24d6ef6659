"""Faults of real processes on one run folder: two trainers at once, a disk that fills up
during a checkpoint write. Each case asserts the exit code, the one-line message and that
nothing already on disk changed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")

TRAIN = [sys.executable, "-m", "dar_core.cli", "train", "--backend", "torch", "--model", "micro",
         "--image-size", "16", "--batch-size", "4", "--sample-every", "100000", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_second_real_trainer_refuses_while_the_first_runs(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(TRAIN + ["--steps", "100000", "--ckpt-every", "5", "--out",
                                      str(out)], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("ckpt-*.safetensors")):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first trainer wrote no checkpoint"
            time.sleep(0.2)
        second = subprocess.run(TRAIN + ["--steps", "10", "--resume", "auto", "--out", str(out)],
                                capture_output=True, text=True, timeout=300, env=ENV)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"dar train: error: run folder {str(out)!r} is in use by "
                                   "another trainer"), lines[0]
        assert f" {first.pid})" in lines[0]  # names the holder
        assert first.poll() is None  # the holder trains on, undisturbed
    finally:
        first.send_signal(signal.SIGTERM)  # preemption: it saves the step and says so
        _, err = first.communicate(timeout=120)
    assert first.returncode == 2 and "--resume auto" in err, err
    assert not (out / ".lock").exists()  # released on exit
    steps = sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("ckpt-*"))
    assert steps and not list(out.rglob("*.tmp"))


# Runs a command whose writes past argv[1] bytes fail with EFBIG, as on a full disk (the
# signal a process gets for it is ignored so that the write returns the error).
LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
os.execv(sys.argv[2], sys.argv[2:])
"""


def _limit_file_size(max_bytes: int, cmd: list[str]) -> list[str]:
    return [sys.executable, "-c", LIMITED, str(max_bytes), *cmd]


def test_a_checkpoint_write_that_fails_for_space_loses_nothing(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(TRAIN + ["--steps", "2", "--ckpt-every", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    before = _snapshot(out)
    size = max(len(v) for k, v in before.items() if k.startswith("checkpoints/"))
    res = subprocess.run(_limit_file_size(size // 2, TRAIN + [
        "--steps", "4", "--ckpt-every", "1", "--resume", "auto", "--out", str(out)]),
        capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dar train: error: File too large"), lines
    after = _snapshot(out)
    for name, data in before.items():  # every earlier file is there, checkpoints unchanged
        if name.startswith("checkpoints/"):
            assert after.get(name) == data, name
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    again = subprocess.run(TRAIN + ["--steps", "4", "--ckpt-every", "1", "--resume", "auto",
                                    "--out", str(out)],
                           capture_output=True, text=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stderr[-2000:]  # space back: it resumes and finishes
