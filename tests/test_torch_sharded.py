"""FSDP2 sharded training and DCP sharded checkpoints in real torchrun launches (gloo, CPU):
the sharded run trains what the single process trains, each rank writes only its shards,
SIGKILL + resume is bit-identical, and the consolidated file loads in every backend."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dar_core.backend import installed_backends, load_backend  # noqa: E402
from dar_core.errors import CheckpointError  # noqa: E402
from dar_core.io.checkpoint import load_checkpoint  # noqa: E402
from dar_core.io.sharded import consolidate  # noqa: E402
from dar_core.train.run import process_running  # noqa: E402

SMALL = ["--model", "micro", "--image-size", "16", "--batch-size", "8", "--lr", "1e-3",
         "--adam-eps", "1e-4", "--no-progress", "--sample-every", "100000", "--chunk-size", "2",
         "--query", "dynamic", "--log-every", "1", "--no-tensorboard"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _dar(*args):
    return [sys.executable, "-m", "dar_core.cli", *args]


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(n), "-m", "dar_core.cli", "train", "--backend", "torch", *SMALL, *args]


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").open()]


def _process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended while being listed
            continue
        ppid = int(text[text.rfind(")") + 2:].split()[1])  # after "(comm) state"
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree



@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The unsharded single-process run every sharded run is compared with."""
    out = tmp_path_factory.mktemp("single")
    subprocess.run(_dar("train", "--backend", "torch", *SMALL, "--steps", "4", "--ckpt-every",
                        "4", "--out", str(out)), check=True, env=_env(), timeout=300)
    return out


def _files_per_key(state: Path) -> dict[str, set[str]]:
    """The files holding each key's chunks, from DCP's metadata."""
    import torch.distributed.checkpoint as dcp

    out: dict[str, set[str]] = {}
    for index, info in dcp.FileSystemReader(str(state)).read_metadata().storage_data.items():
        out.setdefault(index.fqn, set()).add(info.relative_path)
    return out


def _close(sharded, one, what):
    # adam_eps=1e-4 keeps Adam out of its sign-like regime on the ~0 gradients of the
    # adaLN-Zero init, so the float32 summation-order differences of a reduce-scatter stay
    # ~1e-7 of a weight; a thousandth of one lr step is far below what wrong data, a missing
    # reduction or a stale shard give (O(lr))
    for section in ("params", "ema"):
        a, b = getattr(sharded, section), getattr(one, section)
        for k in b:
            assert np.abs(a[k] - b[k]).max() <= 1e-3 * 1e-3, (what, section, k)
    # AdamW's moments: summation order moves each element by ~1e-7 of the gradients summed,
    # so the scale is the largest moment of its kind, not the element's own (a router's
    # gradient at its zero init is ~1e-21: rounding noise of a cancellation)
    scale = {m: max(np.abs(v).max() for k, v in one.opt.items() if k.startswith(m))
             for m in ("m/", "v/")}
    for k, b in one.opt.items():
        err = np.abs(sharded.opt[k] - b).max()
        assert err <= (1e-4 * scale[k[:2]] if k != "step" else 0), (what, "opt", k, err)


@pytest.mark.parametrize("mode, save", [("params", "--async-save"), ("opt", "--async-save"),
                                        ("params", "--no-async-save")])
def test_two_rank_sharded_run_matches_single_process(tmp_path, single, mode, save):
    out = tmp_path / "run"
    subprocess.run(_torchrun(2, "--steps", "4", "--ckpt-every", "4", "--shard", mode, save,
                             "--out", str(out)), check=True, env=_env(), timeout=300)
    one = load_checkpoint(single / "checkpoints" / "ckpt-0000004.safetensors")
    files = _files_per_key(out / "checkpoints" / "ckpt-0000004.sharded" / "state")
    assert len({f for fs in files.values() for f in fs}) == 2  # one file per rank
    for k, v in one.params.items():  # a weight's rows: half in each rank's file
        expect = 2 if k != "pos_embed" and v.shape[0] >= 2 else 1  # the buffer is replicated
        trained = f"m/{k}" in one.opt
        for section in ("params", "ema") + (("opt/m", "opt/v") if trained else ()):
            assert len(files[f"{section}/{k}"]) == expect, (section, k, files[f"{section}/{k}"])
    two = load_checkpoint(consolidate(out))
    assert two.meta["world"] == 2 and two.meta["train"]["shard"] == mode
    _close(two, one, mode)
    np.testing.assert_allclose(_losses(out), _losses(single), rtol=1e-5)
    moved = max(np.abs(one.params[k] - one.ema[k]).max() for k in one.params)
    assert moved > 0  # the weights being compared did train


def test_bf16_and_activation_checkpointing_compose_with_sharding(tmp_path):
    common = ["--steps", "3", "--ckpt-every", "3", "--precision", "bf16", "--grad-checkpoint"]
    subprocess.run(_dar("train", "--backend", "torch", *SMALL, *common, "--out",
                        str(tmp_path / "one")), check=True, env=_env(), timeout=300)
    subprocess.run(_torchrun(2, *common, "--shard", "params", "--out", str(tmp_path / "two")),
                   check=True, env=_env(), timeout=300)
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "ckpt-0000003.safetensors")
    two = load_checkpoint(consolidate(tmp_path / "two"))
    # both compute in bf16 from the same float32 weights (autocast casts them per op, FSDP2
    # gathers them in bf16: the same rounding); what differs is float32 reduction order and
    # bf16 rounding of the differing partial sums, ~2^-8 of a loss, a few % of a step
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-2)
    for k in one.params:
        assert np.abs(two.params[k] - one.params[k]).max() <= 0.5 * 1e-3, k  # half a step


def test_hybrid_sharding_over_a_2x2_mesh_matches_single_process(tmp_path, single):
    out = tmp_path / "run"  # 4 ranks: 2 replicas x 2 shards (HSDP)
    subprocess.run(_torchrun(4, "--steps", "4", "--ckpt-every", "4", "--shard", "params",
                             "--fsdp-size", "2", "--out", str(out)), check=True, env=_env(),
                   timeout=300)
    two = load_checkpoint(consolidate(out))
    _close(two, load_checkpoint(single / "checkpoints" / "ckpt-0000004.safetensors"), "hsdp")


def test_sigkill_and_resume_of_a_sharded_run_is_bit_identical(tmp_path):
    common = ["--steps", "8", "--ckpt-every", "2", "--keep-checkpoints", "10", "--shard",
              "params"]
    subprocess.run(_torchrun(2, *common, "--out", str(tmp_path / "full")), check=True,
                   env=_env(), timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(2, *common, "--out", str(killed)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = killed / "checkpoints" / "ckpt-0000002.sharded"
    deadline = time.monotonic() + 240
    while not first.is_dir():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    # torch's elastic agent starts each rank in a session of its own, so a signal to the
    # launcher's group misses them: kill the whole process tree at once, as a crashed node
    tree = _process_tree(proc.pid)
    assert len(tree) >= 3, tree  # the launcher and two ranks
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended on its own before the kill
            pass
    proc.wait()
    deadline = time.monotonic() + 30  # a live rank would still hold the run folder's lock
    while any(process_running(pid) for pid in tree):
        assert time.monotonic() < deadline, [pid for pid in tree if process_running(pid)]
        time.sleep(0.1)
    kept = sorted(p.name for p in (killed / "checkpoints").glob("ckpt-*.sharded"))
    assert kept and "ckpt-0000008.sharded" not in kept, kept
    (killed / "checkpoints" / ".ckpt-0000099.sharded.tmp" / "state").mkdir(parents=True)
    subprocess.run(_torchrun(2, *common, "--resume", "auto", "--out", str(killed)), check=True,
                   env=_env(), timeout=300)
    assert not list((killed / "checkpoints").glob(".*.tmp"))  # the dead save is cleared
    a = load_checkpoint(consolidate(tmp_path / "full"))
    b = load_checkpoint(consolidate(killed))
    for section in ("params", "ema", "opt"):
        for k, v in getattr(a, section).items():
            assert np.array_equal(v, getattr(b, section)[k]), (section, k)


def test_consolidated_checkpoint_gives_the_same_velocity_in_every_backend(tmp_path):
    out = tmp_path / "run"
    subprocess.run(_torchrun(2, "--steps", "3", "--ckpt-every", "3", "--shard", "params",
                             "--out", str(out)), check=True, env=_env(), timeout=300)
    with pytest.raises(CheckpointError, match="dar consolidate"):
        load_checkpoint(out / "checkpoints" / "ckpt-0000003.sharded")
    res = subprocess.run(_dar("consolidate", str(out), "--out", str(tmp_path / "c.safetensors")),
                         check=True, env=_env(), capture_output=True, text=True, timeout=120)
    assert "wrote" in res.stdout
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    cfg = ckpt.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cfg.in_channels, cfg.input_size, cfg.input_size), np.float32)
    t, y = np.array([0.3, 0.8], np.float32), np.array([1, cfg.num_classes], np.int64)
    outs = {b: load_backend(b).numerics.forward(cfg, ckpt.ema, x, t, y)
            for b in installed_backends()}
    ref = outs["torch"]
    for b, v in outs.items():
        # float32 forwards of a 2-block width-32 model differ by accumulation order only:
        # ~1e-6 relative (the conformance suite's float32 bound for this depth)
        err = np.abs(v - ref).max() / np.abs(ref).max()
        assert err < 1e-5, (b, err)


@pytest.fixture(scope="module")
def sharded_two_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "run"
    subprocess.run(_torchrun(2, "--steps", "2", "--ckpt-every", "2", "--shard", "params",
                             "--out", str(out)), check=True, env=_env(), timeout=300)
    return out


@pytest.mark.parametrize("backend", ["torch", "jax", "mlx"])
def test_a_single_process_of_any_backend_resumes_a_sharded_run(tmp_path, sharded_two_steps,
                                                               backend):
    if backend not in installed_backends():
        pytest.skip(f"{backend} is not installed")
    out = tmp_path / "run"
    shutil.copytree(sharded_two_steps, out)
    subprocess.run(_dar("train", "--backend", backend, *SMALL, "--steps", "3", "--ckpt-every",
                        "3", "--resume", "auto", "--out", str(out)), check=True, env=_env(),
                   timeout=300)
    ckpt = load_checkpoint(out / "checkpoints" / "ckpt-0000003.safetensors")
    assert ckpt.meta["step"] == 3 and int(ckpt.opt["step"]) == 3
    assert ckpt.meta["backend"] == backend


def test_sharding_one_process_is_a_one_line_error(tmp_path):
    res = subprocess.run(_dar("train", "--backend", "torch", *SMALL, "--steps", "1",
                              "--shard", "params", "--out", str(tmp_path / "r")), env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "needs several processes" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(_dar("train", "--backend", "torch", *SMALL, "--shard", "zero3",
                              "--out", str(tmp_path / "r")), env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "'zero3'" in res.stderr
