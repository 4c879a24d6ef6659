"""Data parallel through MLX's own launcher: ``mlx.launch -n 2 --backend ring`` on localhost
trains the same global batch as one process and ends with the same weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from dar_core.backends.mlx import train  # noqa: E402
from dar_core.io.checkpoint import load_checkpoint  # noqa: E402
from dar_core.spec.schema import init_params  # noqa: E402
from dar_core.testing import assert_close  # noqa: E402
from dar_core.train.run import TrainConfig  # noqa: E402

CHILD = """
import json, sys
import mlx.core as mx
from dar_core.train.run import TrainConfig
from dar_core.backends.mlx import train
train(TrainConfig(**json.loads(sys.argv[1])))
g = mx.distributed.init()
print(f"rank {g.rank()} of {g.size()} finished", flush=True)
"""


def launcher() -> str | None:
    found = shutil.which("mlx.launch")
    local = Path(sys.executable).parent / "mlx.launch"
    return found or (str(local) if local.exists() else None)


@pytest.mark.slow  # ~25 s with MLX's CPU kernel cache warm; minutes when each rank JIT-compiles
def test_two_process_ring_launch_matches_one_process(tmp_path):
    launch = launcher()
    if launch is None:
        pytest.skip("mlx.launch is not installed")
    tc = TrainConfig(model="micro", image_size=16, batch_size=8, steps=3, lr=1e-3,
                     ckpt_every=3, sample_every=1000, log_every=1, progress=False, compile=True,
                     out=str(tmp_path / "dp"))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # --python names the interpreter for every MLX release: older launchers prepend it to a
    # script by default, newer ones run the command as given unless it is set
    res = subprocess.run([launch, "-n", "2", "--backend", "ring", "--python", sys.executable,
                          str(script),
                          json.dumps(dataclasses.asdict(tc))],
                         capture_output=True, text=True, timeout=240)
    log = res.stdout + res.stderr
    # mlx.launch can exit 0 when a rank fails, so check what each rank reported.
    assert "rank 0 of 2 finished" in log and "rank 1 of 2 finished" in log, log

    train(tc.replace(out=str(tmp_path / "single")))
    final = "checkpoints/ckpt-0000003.safetensors"
    dp = load_checkpoint(tmp_path / "dp" / final)
    single = load_checkpoint(tmp_path / "single" / final)
    assert dp.meta["world"] == 2 and single.meta["world"] == 1
    init = init_params(single.config, tc.seed)
    for k, v in single.params.items():
        # AdamW moves every weight by ~lr per step whatever the gradient's size, so compare the
        # change since init (the float32 all-reduce sums in another order than one process).
        assert_close(dp.params[k] - init[k], v - init[k], 2e-3, f"params/{k}")
        # the EMA (warm-up on: mostly the recent weights) follows the params' own bound
        assert_close(dp.ema[k] - init[k], single.ema[k] - init[k], 2e-3, f"ema/{k}")
    rec = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
           for d in ("dp", "single")}
    for key in ("loss", "grad_norm"):  # global-batch mean loss and the averaged gradient's norm
        np.testing.assert_allclose([r[key] for r in rec["dp"]], [r[key] for r in rec["single"]],
                                   rtol=1e-5, err_msg=key)
