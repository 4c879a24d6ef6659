"""JAX training in real subprocesses: data parallel over two (host-platform) devices against
one device, and a SIGKILLed run resumed to bit-identical final state."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from dar_core.io.checkpoint import load_checkpoint  # noqa: E402
from dar_core.spec.schema import init_params  # noqa: E402
from dar_core.train.run import TrainConfig  # noqa: E402

# The step settings of examples/jax_tpu.py's CPU preset, so that its test reuses compiled code.
TRAIN = dict(model="micro", batch_size=8, lr=1e-3, ema_decay=0.99, sample_every=1000,
             per_class=1, sample_steps=1, sample_sampler="euler", log_every=1, progress=False)

# Trains one run from a JSON TrainConfig; prints how many times the step was traced.
RUN_SCRIPT = textwrap.dedent("""
    import json, sys
    from dar_core.train.run import TrainConfig
    from dar_core.backends.jax import train
    from dar_core.backends.jax.trainer import TRACE_COUNTS
    train(TrainConfig(**json.loads(sys.argv[1])))
    print(json.dumps({"traces": TRACE_COUNTS["train_step"]}))
""")

# Two devices: one run on a 1-device mesh, one on the 2-device mesh, and the placement of a
# sharded batch and of the replicated state.
TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from dar_core.train.run import TrainConfig, TrainStream, make_train_dataset
    from dar_core.backends.jax import train
    from dar_core.backends.jax.trainer import (TRACE_COUNTS, initial_state, make_mesh,
        make_optimizer, make_train_step, replicate, shard_batch)
    tc = TrainConfig(**json.loads(sys.argv[1]))
    train(tc.replace(out=tc.out + "/one"), devices=jax.devices()[:1])
    train(tc.replace(out=tc.out + "/two"))
    mesh = make_mesh()
    cfg = tc.model_config()
    stream = TrainStream(make_train_dataset(tc), tc, cfg.null_class)
    batch = shard_batch(stream.batch(0), NamedSharding(mesh, PartitionSpec("data")),
                        tc.batch_size)
    opt = make_optimizer(tc)
    state, buffers = replicate(initial_state(cfg, tc, opt, None), mesh)
    state, loss, _ = make_train_step(cfg, tc, mesh)(state, buffers, batch)
    w = state.params["blocks.0.attn.qkv.weight"]
    copies = [np.asarray(s.data) for s in w.addressable_shards]
    print(json.dumps({
        "devices": jax.device_count(),
        "mesh": mesh.size,
        "batch_shards": [list(s.data.shape) for s in batch["x"].addressable_shards],
        "batch_shard_devices": len({s.device for s in batch["x"].addressable_shards}),
        "params_replicated": bool(w.sharding.is_fully_replicated),
        "replicas_equal": all(np.array_equal(copies[0], c) for c in copies),
        "traces": TRACE_COUNTS["train_step"],
    }))
""")


def jax_env(tmp_path_factory, **extra):
    """Subprocess environment: CPU, and a persistent compilation cache shared by the
    subprocesses of this test session (a cache hit loads the identical executable)."""
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    env.update(extra)
    return env


def _run(script, tc, env, timeout=240):
    res = subprocess.run([sys.executable, "-c", script, json.dumps(tc.to_dict())], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _metric(run_dir, key="loss"):
    return [json.loads(ln)[key] for ln in (run_dir / "metrics.jsonl").open()]


def assert_bit_identical(a, b, run_a, run_b):
    """Checkpoints ``a`` and ``b`` hold the same tensors bit for bit, and their runs logged
    the same step, loss and grad norm at every step."""
    for section in ("params", "ema", "opt"):
        sa, sb = getattr(a, section), getattr(b, section)
        assert set(sa) == set(sb)
        for k in sa:
            assert np.array_equal(sa[k], sb[k]), (section, k)
    for key in ("step", "loss", "grad_norm"):
        assert _metric(run_b, key) == _metric(run_a, key), key


def test_two_device_data_parallel_matches_one_device(tmp_path, tmp_path_factory):
    tc = TrainConfig(**TRAIN, steps=3, ckpt_every=3, adam_eps=1e-4,
                     out=str(tmp_path / "runs"))
    env = jax_env(tmp_path_factory, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    info = _run(TWO_DEVICE_SCRIPT, tc, env)
    assert info["devices"] == 2 and info["mesh"] == 2
    assert info["batch_shards"] == [[4, 3, 16, 16], [4, 3, 16, 16]]
    assert info["batch_shard_devices"] == 2
    assert info["params_replicated"] and info["replicas_equal"]
    assert info["traces"] == 2  # one per mesh; the probe step reuses the 2-device run's

    one = load_checkpoint(tmp_path / "runs" / "one" / "checkpoints" / "ckpt-0000003.safetensors")
    two = load_checkpoint(tmp_path / "runs" / "two" / "checkpoints" / "ckpt-0000003.safetensors")
    assert one.meta["world"] == two.meta["world"] == 1  # one process, two devices
    start = init_params(tc.model_config(), tc.seed)
    # Parameters after 3 steps. adam_eps=1e-4 keeps Adam out of its sign-like regime on the
    # coordinates whose gradient is ~0 at the adaLN-Zero init (where float summation order
    # would otherwise be amplified to ~1% of lr); the bound is a thousandth of a step, far
    # below what wrong data, a missing all-reduce or drifting replicas give (O(lr)).
    for k in one.params:
        assert np.abs(two.params[k] - one.params[k]).max() <= 1e-3 * tc.lr, k
        assert np.abs(two.ema[k] - one.ema[k]).max() <= 1e-3 * tc.lr, k
    moved = max(np.abs(one.params[k] - start[k]).max() for k in one.params)
    assert moved > 0.5 * tc.lr  # training did change the weights being compared
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(_metric(tmp_path / "runs" / "two", key),
                                   _metric(tmp_path / "runs" / "one", key), rtol=1e-5)


def test_sigkill_and_resume_is_bit_identical(tmp_path, tmp_path_factory):
    steps = 12
    base = TrainConfig(**TRAIN, steps=steps, ckpt_every=3, keep_checkpoints=10)
    env = jax_env(tmp_path_factory)
    full = base.replace(out=str(tmp_path / "full"))
    assert _run(RUN_SCRIPT, full, env)["traces"] == 1

    killed = base.replace(out=str(tmp_path / "killed"))
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, json.dumps(killed.to_dict())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (ckpt_dir.is_dir() and any(ckpt_dir.glob("ckpt-*.safetensors"))):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    left = sorted(p.name for p in ckpt_dir.glob("ckpt-*.safetensors"))
    assert left and left[-1] < f"ckpt-{steps:07d}.safetensors"  # killed mid-run

    assert _run(RUN_SCRIPT, killed.replace(resume="auto"), env)["traces"] == 1
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / f"ckpt-{steps:07d}.safetensors")
    b = load_checkpoint(ckpt_dir / f"ckpt-{steps:07d}.safetensors")
    assert_bit_identical(a, b, tmp_path / "full", tmp_path / "killed")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tmp_path_factory):
    """The multi-host path for real: two processes (one CPU device each, gloo collectives)
    join through ``jax.distributed``, each feeds its own slice of the global batch, and the
    result matches one process training on the whole batch; only rank 0 writes."""
    tc = TrainConfig(**TRAIN, steps=3, ckpt_every=3, adam_eps=1e-4)
    env = jax_env(tmp_path_factory)
    port = _free_port()
    multi = tc.replace(out=str(tmp_path / "multi"))
    procs = [subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, json.dumps(multi.to_dict())],
        env={**env, "DAR_JAX_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
             "DAR_JAX_NUM_PROCESSES": "2", "DAR_JAX_PROCESS_ID": str(rank)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    _run(RUN_SCRIPT, tc.replace(out=str(tmp_path / "single")), env)

    ckpt = "checkpoints/ckpt-0000003.safetensors"
    two = load_checkpoint(tmp_path / "multi" / ckpt)
    one = load_checkpoint(tmp_path / "single" / ckpt)
    assert two.meta["world"] == 2 and one.meta["world"] == 1
    for k in one.params:  # see the two-device test for the bound
        assert np.abs(two.params[k] - one.params[k]).max() <= 1e-3 * tc.lr, k
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(_metric(tmp_path / "multi", key),
                                   _metric(tmp_path / "single", key), rtol=1e-5)
