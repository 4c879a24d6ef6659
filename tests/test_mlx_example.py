"""``examples/mlx_apple.py``: answers --help, and trains end to end on a CPU."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mlx_apple.py"


def test_help():
    res = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Apple silicon" in res.stdout and "--ema-decay" in res.stdout


def test_cpu_run_writes_checkpoint_and_samples(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", "micro", "--steps", "2", "--batch-size", "8",
         "--every", "2", "--per-class", "1", "--sample-steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "micro dar/static_t c4, fp32, batch 8, 2 steps" in res.stdout
    assert "step 2: loss" in res.stdout
    assert (out / "checkpoints" / "ckpt-0000002.safetensors").is_file()
    assert (out / "samples" / "step-0000002.png").is_file()
    assert (out / "training.png").is_file()
