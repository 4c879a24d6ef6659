"""``dar sample --num-samples N --npz OUT``: the same ``arr_0`` from 1 and 2 processes (torchrun,
JAX multi-process, mlx.launch ring), a killed run resumed to the same file, refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dar_core.errors import ConfigError, InputError
from dar_core.io.checkpoint import save_checkpoint
from dar_core.sampling.bulk import RowNoise, index_labels, index_noise, read_settings, sample_npz
from dar_core.spec.config import model_config
from dar_core.spec.schema import random_params

# SDE with guidance: the per-index noise of every step and the doubled CFG batch both run.
ARGS = ["--sampler", "sde", "--steps", "3", "--cfg", "1.5", "--seed", "3"]
KW = dict(sampler="sde", steps=3, cfg_scale=1.5, seed=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = model_config("micro", num_classes=4)
    params = {k: v.astype(np.float32) for k, v in random_params(cfg, 0, scale=0.3).items()}
    path = tmp_path_factory.mktemp("ckpt") / "micro.safetensors"
    save_checkpoint(path, cfg, params, meta={"step": 5})
    return path


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLX_RANK", "MLX_HOSTFILE")}
    return {**env, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu", **extra}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dar_core.cli", "sample", *args]


def _ranks(cmd: list[str], envs: list[dict], timeout: float = 240) -> list[str]:
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for e in envs]
    try:
        res = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, res):
        assert p.returncode == 0, err[-3000:]
    return [o for o, _ in res]


def _arrays(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_per_index_inputs_do_not_depend_on_the_batch():
    idx = range(5, 9)
    both = RowNoise(2, idx).standard_normal((4, 3, 2, 2))
    alone = RowNoise(2, range(7, 8)).standard_normal((1, 3, 2, 2))
    assert np.array_equal(both[2], alone[0])
    assert np.array_equal(index_noise(2, 7, (3, 2, 2)), index_noise(2, 7, (3, 2, 2)))
    assert not np.array_equal(index_noise(2, 7, (3, 2, 2)), index_noise(2, 8, (3, 2, 2)))
    assert index_labels(0, range(6), 4, "balanced").tolist() == [0, 1, 2, 3, 0, 1]
    r = index_labels(1, range(200), 4, "random")
    assert set(r.tolist()) == {0, 1, 2, 3}
    assert np.array_equal(r[50:60], index_labels(1, range(50, 60), 4, "random"))
    with pytest.raises(InputError, match="holds 4 rows"):
        RowNoise(2, idx).standard_normal((3, 2))


def test_torch_two_ranks_match_one_process_and_batching(ckpt, tmp_path):
    one = tmp_path / "one.npz"
    s = sample_npz(str(ckpt), one, num_samples=10, batch_size=4, backend="torch",
                   progress=False, **KW)
    assert s["assembled"] and s["sampled"] == 10 and not (tmp_path / "one.npz.parts").exists()
    a = _arrays(one)
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (10, 8, 8, 3)
    assert a["labels"].tolist() == [i % 4 for i in range(10)]
    assert a["arr_0"].std() > 20  # real images, not a constant
    st = json.loads(str(a["settings"][0]))
    assert (st["sampler"], st["steps"], st["cfg_scale"], st["seed"], st["num_samples"],
            st["weights"], st["precision"], st["step"]) == ("sde", 3, 1.5, 3, 10, "params",
                                                           "fp32", 5)

    two = tmp_path / "two.npz"  # README's command: torchrun -m dar_core.cli sample ...
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "dar_core.cli", "sample",
                          "--checkpoint", str(ckpt), "--backend", "torch", "--num-samples",
                          "10", "--batch-size", "4", "--npz", str(two), *ARGS],
                         env=_env(), capture_output=True, text=True, timeout=240)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "rank 1/2 sampled" in log and "wrote" in log and "settings " + st["hash"] in log
    assert "holds no EMA weights; sampling its raw weights" in log  # --weights ema, the default
    b = _arrays(two)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert read_settings(two)["hash"] == st["hash"]

    # Another batch size is another float32 summation order, nothing else: every image is
    # the same up to the last uint8 step.
    big = tmp_path / "big.npz"
    sample_npz(str(ckpt), big, num_samples=10, batch_size=10, backend="torch",
               progress=False, **KW)
    d = np.abs(_arrays(big)["arr_0"].astype(int) - a["arr_0"].astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 0.01


def test_killed_run_resumes_to_the_same_file(ckpt, tmp_path):
    n, bs = 24, 2
    args = ["--checkpoint", str(ckpt), "--backend", "torch", "--num-samples", str(n),
            "--batch-size", str(bs), "--sampler", "heun", "--steps", "12", "--seed", "1"]
    full = tmp_path / "full.npz"
    subprocess.run(_cli(*args, "--npz", str(full)), env=_env(), check=True, timeout=240,
                   capture_output=True)
    out = tmp_path / "killed.npz"
    parts = tmp_path / "killed.npz.parts"
    proc = subprocess.Popen(_cli(*args, "--npz", str(out)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (parts.is_dir() and any(parts.glob("part-*.npz"))):
        assert proc.poll() is None, "the run ended before its first part"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    left = len(list(parts.glob("part-*.npz")))
    assert 0 < left < n // bs and not out.exists()  # killed mid-run

    with pytest.raises(ConfigError, match="other settings"):  # parts of seed 1 refused
        sample_npz(str(ckpt), out, num_samples=n, batch_size=bs, backend="torch",
                   sampler="heun", steps=12, seed=2, progress=False)
    r = sample_npz(str(ckpt), out, num_samples=n, batch_size=bs, backend="torch",
                   sampler="heun", steps=12, seed=1, progress=False)
    assert r["sampled"] == n - left * bs and r["assembled"]
    a, b = _arrays(full), _arrays(out)
    assert set(a) == set(b) == {"arr_0", "labels", "settings"}
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    with pytest.raises(ConfigError, match="exists and was sampled with other settings"):
        sample_npz(str(ckpt), out, num_samples=n, batch_size=bs, backend="torch",
                   sampler="euler", steps=12, seed=1, progress=False)


def test_bad_bulk_inputs_are_one_line_errors(ckpt, tmp_path):
    def run(*args):
        return subprocess.run(_cli("--checkpoint", str(ckpt), "--backend", "torch", *args),
                              env=_env(), capture_output=True, text=True, timeout=120)

    for args, msg in ((["--num-samples", "0", "--npz", "x.npz"], "--num-samples must be"),
                      (["--num-samples", "4"], "needs --npz"),
                      (["--npz", str(tmp_path / "x.npz")], "--npz is the output of"),
                      (["--num-samples", "4", "--npz", "x.npz", "--labels", "1"],
                       "--labels '1' is for the PNG grid"),
                      (["--num-samples", "4", "--npz", "x.npz", "--batch-size", "0"],
                       "--batch-size must be"),
                      (["--num-samples", "4", "--npz", "x.npz", "--out", "g.png"],
                       "--out 'g.png' is for the PNG grid")):
        r = run(*args)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_jax_two_processes_match_one_process(ckpt, tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    common = ["--checkpoint", str(ckpt), "--backend", "jax", "--num-samples", "8",
              "--batch-size", "4", *ARGS]
    env = _env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    _ranks(_cli(*common, "--npz", str(one)), [env])
    port = _free_port()
    out = _ranks(_cli(*common, "--npz", str(two)),
                 [{**env, "DAR_JAX_DISTRIBUTED": "1",
                   "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                   "DAR_JAX_NUM_PROCESSES": "2", "DAR_JAX_PROCESS_ID": str(r)}
                  for r in range(2)])
    assert any("rank 1/2" in o for o in out)  # two processes really joined
    a, b = _arrays(one), _arrays(two)
    assert a["arr_0"].std() > 20
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def _mlx_launcher() -> str | None:
    import shutil

    local = Path(sys.executable).parent / "mlx.launch"
    return shutil.which("mlx.launch") or (str(local) if local.exists() else None)


def test_mlx_ring_two_processes_match_one_process(ckpt, tmp_path):
    pytest.importorskip("mlx.core")
    launch = _mlx_launcher()
    if launch is None:
        pytest.skip("mlx.launch is not installed")
    common = ["--checkpoint", str(ckpt), "--backend", "mlx", "--num-samples", "8",
              "--batch-size", "4", *ARGS]
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    _ranks(_cli(*common, "--npz", str(one)), [_env()])
    dar = Path(sys.executable).parent / "dar"  # README's command: after "--", mlx.launch
    res = subprocess.run([launch, "-n", "2", "--backend", "ring", "--",  # leaves --backend
                          str(dar), "sample", *common, "--npz", str(two)],
                         env=_env(), capture_output=True, text=True, timeout=240)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "rank 1/2" in log, log[-3000:]
    a, b = _arrays(one), _arrays(two)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
