"""``examples/jax_tpu.py``: answers --help without JAX work, and runs end to end on a CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "jax_tpu.py"


def test_help():
    res = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "TPU/GPU with bf16" in res.stdout and "--final-steps" in res.stdout


def test_cpu_run_writes_checkpoint_and_sample_grids(tmp_path, tmp_path_factory):
    out = tmp_path / "demo"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # the session's shared compilation cache
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    res = subprocess.run(
        [sys.executable, str(EXAMPLE), "--device", "cpu", "--model", "micro", "--steps", "2",
         "--batch-size", "8", "--per-class", "1", "--final-steps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 1 cpu device(s) for 2 steps" in res.stdout
    assert (out / "checkpoints" / "ckpt-0000002.safetensors").is_file()
    assert (out / "samples" / "step-0000002.png").is_file()
    for name in ("final-cfg1.5.png", "final-cfg1.0.png", "training.png"):
        assert (out / name).is_file(), name
