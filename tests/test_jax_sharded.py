"""JAX sharded training (``shard="params"`` FSDP, ``shard="opt"`` ZeRO) on two host-platform
devices against one device, Orbax sharded checkpoints consolidated to the portable format,
resume across modes, a SIGKILLed sharded run resumed bit-identically, and the placement rule."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

from jax.sharding import PartitionSpec as P  # noqa: E402
from test_jax_distributed import (  # noqa: E402
    RUN_SCRIPT,
    TRAIN,
    _metric,
    _run,
    assert_bit_identical,
    jax_env,
)

from dar_core.backend import BACKENDS, is_installed, load_backend  # noqa: E402
from dar_core.backends.jax import sharded as shd  # noqa: E402
from dar_core.backends.jax.trainer import (  # noqa: E402
    initial_state,
    make_mesh,
    make_optimizer,
    place,
    restore_sharded,
    state_shardings,
    to_flat,
)
from dar_core.conformance.tolerances import forward_tol, sensitivity  # noqa: E402
from dar_core.errors import CheckpointError  # noqa: E402
from dar_core.io.checkpoint import load_checkpoint  # noqa: E402
from dar_core.io.sharded import ShardedCheckpoint, consolidate, flat_keys  # noqa: E402
from dar_core.spec.reference import forward as reference_forward  # noqa: E402
from dar_core.spec.schema import init_params  # noqa: E402
from dar_core.testing import parity_inputs, rel_err  # noqa: E402
from dar_core.train.run import TrainConfig, trained_names  # noqa: E402

TWO = "--xla_force_host_platform_device_count=2"
QKV = "blocks.0.attn.qkv.weight"  # [96, 32] in the micro preset: rows split over 2 devices

# Two devices: a 1-device unsharded run of 4 steps, 3-step runs in both sharded modes, the
# placement the compiled step gives each mode, and resumes across modes: the unsharded run
# from the FSDP run's sharded checkpoint, the ZeRO run from the unsharded run's single file.
SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, optax
    from jax.sharding import NamedSharding, PartitionSpec
    from dar_core.train.run import TrainConfig, TrainStream, make_train_dataset
    from dar_core.backends.jax import train
    from dar_core.backends.jax.trainer import (TRACE_COUNTS, batch_sharding, initial_state,
        make_mesh, make_optimizer, make_train_step, place, shard_batch, state_shardings)
    tc = TrainConfig(**json.loads(sys.argv[1]))
    out, name = tc.out, "blocks.0.attn.qkv.weight"
    train(tc.replace(out=out + "/one", steps=4), devices=jax.devices()[:1])
    shards = {}
    for mode in ("params", "opt"):
        mtc = tc.replace(shard=mode, out=f"{out}/{mode}")
        train(mtc)
        mesh, cfg, opt = make_mesh(fsdp_size=0), mtc.model_config(), make_optimizer(mtc)
        state, buffers = initial_state(cfg, mtc, opt, None)
        state = place(state, state_shardings(state, mesh, mode))
        buffers = place(buffers, NamedSharding(mesh, PartitionSpec()))
        stream = TrainStream(make_train_dataset(mtc), mtc, cfg.null_class)
        batch = shard_batch(stream.batch(0), batch_sharding(mesh), mtc.batch_size)
        state, _, _ = make_train_step(cfg, mtc, mesh)(state, buffers, batch)
        arrays = {"params": state.params[name], "ema": state.ema[name],
                  "mu": optax.tree_utils.tree_get(state.opt, "mu")[name]}
        shards[mode] = {k: [list(s.data.shape) for s in a.addressable_shards]
                        for k, a in arrays.items()}
    traces = TRACE_COUNTS["train_step"]
    train(tc.replace(out=out + "/from_sharded", steps=4,
                     resume=out + "/params/checkpoints/ckpt-0000003.sharded"),
          devices=jax.devices()[:1])
    train(tc.replace(out=out + "/from_file", steps=4, shard="opt",
                     resume=out + "/one/checkpoints/ckpt-0000003.safetensors"))
    print(json.dumps({"mesh": dict(mesh.shape), "shards": shards, "traces": traces,
                      "traces_after_resumes": TRACE_COUNTS["train_step"]}))
""")


@pytest.fixture(scope="module")
def two_device_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    tc = TrainConfig(**TRAIN, steps=3, ckpt_every=3, adam_eps=1e-4, out=str(root))
    info = _run(SHARDED_SCRIPT, tc, jax_env(tmp_path_factory, XLA_FLAGS=TWO), timeout=400)
    return tc, root, info


def test_sharded_modes_match_one_device(two_device_runs):
    tc, root, info = two_device_runs
    assert info["mesh"] == {"data": 1, "fsdp": 2}
    half = [[48, 32], [48, 32]]  # each device holds its half of the rows
    assert info["shards"]["params"] == {"params": half, "ema": half, "mu": half}
    assert info["shards"]["opt"] == {"params": [[96, 32], [96, 32]], "ema": half, "mu": half}
    # one trace per (mesh, mode); the probes reuse the runs' steps, so the cache key tells
    # the modes apart (a wrong hit would give the probe the other mode's placement)
    assert info["traces"] == 3
    assert info["traces_after_resumes"] == 3

    one = load_checkpoint(root / "one" / "checkpoints" / "ckpt-0000003.safetensors")
    start = init_params(tc.model_config(), tc.seed)
    for mode in ("params", "opt"):
        run = root / mode
        assert not list((run / "checkpoints").glob("*.safetensors"))  # sharded only
        two = load_checkpoint(consolidate(run / "checkpoints" / "ckpt-0000003.sharded"))
        assert two.meta["step"] == 3 and int(two.opt["step"]) == 3
        # see test_jax_distributed's two-device test for the bound (adam_eps=1e-4)
        for k in one.params:
            assert np.abs(two.params[k] - one.params[k]).max() <= 1e-3 * tc.lr, (mode, k)
            assert np.abs(two.ema[k] - one.ema[k]).max() <= 1e-3 * tc.lr, (mode, k)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(_metric(run, key), _metric(root / "one", key)[:3],
                                       rtol=1e-5)
    moved = max(np.abs(one.params[k] - start[k]).max() for k in one.params)
    assert moved > 0.5 * tc.lr  # training did change the weights being compared


def test_resume_across_shard_modes(two_device_runs):
    """Step 3 (the 4th) after resuming an unsharded run from a sharded checkpoint, and a
    sharded run from a single file, matches the uninterrupted unsharded run's."""
    _, root, _ = two_device_runs
    for run in ("from_sharded", "from_file"):
        assert _metric(root / run, "step") == _metric(root / "one", "step")[3:], run
        np.testing.assert_allclose(_metric(root / run), _metric(root / "one")[3:], rtol=1e-5,
                                   err_msg=run)
    assert (root / "from_sharded" / "checkpoints" / "ckpt-0000004.safetensors").is_file()
    assert (root / "from_file" / "checkpoints" / "ckpt-0000004.sharded" / "dar.json").is_file()


def test_consolidated_checkpoint_gives_one_velocity_in_every_backend(two_device_runs):
    _, root, _ = two_device_runs
    ckpt = load_checkpoint(consolidate(root / "params"))
    cfg, weights = ckpt.config, ckpt.weights("ema")
    x, t, y = parity_inputs(cfg)
    want = reference_forward(weights, cfg, x, t, y)  # float64
    assert np.abs(want).max() > 0  # the trained final layer is no longer zero
    # float32 against the float64 reference: the conformance suite's whole-model bound, from
    # this draw's sensitivity to one float32 ulp (64 ulps floor, 30x condition factor; for the
    # two-block micro model that is ~1e-5 relative).
    bound = forward_tol("forward", sensitivity(
        lambda p, xx: reference_forward(p, cfg, xx, t, y), weights, x))
    checked = []
    for name in BACKENDS:
        if not is_installed(name):
            continue
        got = load_backend(name).numerics.forward(cfg, weights, x, t, y, "float32", "cpu")
        assert got.shape == want.shape and got.dtype == np.float32, name
        assert rel_err(got, want) <= bound, (name, rel_err(got, want), bound)
        checked.append(name)
    assert "jax" in checked


def _sharded_steps(ckpt_dir):
    return sorted(p.name for p in ckpt_dir.glob("ckpt-*.sharded") if (p / "dar.json").is_file())


def test_sigkilled_sharded_run_resumes_bit_identical(tmp_path, tmp_path_factory):
    steps = 12
    base = TrainConfig(**TRAIN, steps=steps, ckpt_every=3, keep_checkpoints=10, shard="params",
                       adam_eps=1e-4)  # the fixture's step settings: a compilation cache hit
    env = jax_env(tmp_path_factory, XLA_FLAGS=TWO)
    _run(RUN_SCRIPT, base.replace(out=str(tmp_path / "full")), env)

    killed = base.replace(out=str(tmp_path / "killed"))
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, json.dumps(killed.to_dict())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (ckpt_dir.is_dir() and _sharded_steps(ckpt_dir)):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    left = _sharded_steps(ckpt_dir)
    assert left and left[-1] < f"ckpt-{steps:07d}.sharded"  # killed mid-run
    # a save killed before its rename: shards without a manifest, at a later step
    leftover = ckpt_dir / f".ckpt-{steps - 1:07d}.sharded.tmp"
    shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(ckpt_dir / left[-1], leftover)
    (leftover / "dar.json").unlink()

    _run(RUN_SCRIPT, killed.replace(resume="auto"), env)
    assert not leftover.exists()  # removed when the resumed run claimed the folder
    a = load_checkpoint(consolidate(tmp_path / "full"))
    b = load_checkpoint(consolidate(tmp_path / "killed"))
    assert a.meta["step"] == b.meta["step"] == steps
    assert_bit_identical(a, b, tmp_path / "full", tmp_path / "killed")


# In-process: the placement rule, the key escaping, refused checkpoints ----------------------
@pytest.mark.parametrize("shape, n, spec", [
    ((96, 32), 2, P("fsdp", None)),       # the largest divisible axis
    ((32, 96), 2, P(None, "fsdp")),
    ((6, 4), 4, P(None, "fsdp")),         # 6 does not divide by 4: the next largest
    ((4, 4), 2, P("fsdp", None)),         # ties: the first
    ((2, 3, 4, 4), 2, P(None, None, "fsdp", None)),
    ((3,), 2, P()),                       # no divisible axis: replicated
    ((), 2, P()),                         # scalars (optimizer counts)
    ((96, 32), 1, P()),                   # one device per group
])
def test_fsdp_spec(shape, n, spec):
    assert shd.fsdp_spec(shape, n) == spec


def test_checkpoint_keys_escape_reversibly():
    tc = TrainConfig(model="micro")
    cfg = tc.model_config()
    keys = list(flat_keys(cfg, trained_names(cfg, tc)))
    names = [shd.encode_key(k) for k in keys]
    assert all(n.replace("_", "").isalnum() for n in names)  # no '/' or '.' for Orbax
    assert len(set(names)) == len(keys)
    assert [shd.decode_key(n) for n in names] == keys


def _write(tmp_path, tc, poison=None):
    """A 1-device sharded checkpoint of the fresh state (``poison``: a NaN in that array)."""
    cfg, mesh, optimizer = tc.model_config(), make_mesh(), make_optimizer(tc)
    state, buffers = initial_state(cfg, tc, optimizer, None)
    if poison:
        state.params[poison] = state.params[poison].at[0].set(np.nan)
    state = place(state, state_shardings(state, mesh, tc.shard))
    path = tmp_path / "ckpt-0000001.sharded"
    shd.save(path / "state", to_flat(state, buffers, np.asarray(1, np.int64)))
    return ShardedCheckpoint(path, cfg, "orbax", {"step": 1}, trained_names(cfg, tc)), mesh


def test_restore_refuses_non_finite_and_foreign_checkpoints(tmp_path):
    tc = TrainConfig(model="micro", shard="params")
    cfg, optimizer = tc.model_config(), make_optimizer(tc)
    ckpt, mesh = _write(tmp_path / "ok", tc)
    state, buffers = restore_sharded(ckpt, cfg, tc, optimizer, mesh)
    assert np.array_equal(np.asarray(state.params[QKV]), init_params(cfg, tc.seed)[QKV])
    assert set(buffers) == {"pos_embed"}

    bad, mesh = _write(tmp_path / "bad", tc, poison=QKV)
    with pytest.raises(CheckpointError, match=r"bad.*non-finite"):
        restore_sharded(bad, cfg, tc, optimizer, mesh)
    dcp = ShardedCheckpoint(tmp_path / "x.sharded", cfg, "torch-dcp", {"step": 1},
                            ckpt.trained)
    with pytest.raises(CheckpointError, match=r"dar consolidate .*x\.sharded"):
        restore_sharded(dcp, cfg, tc, optimizer, mesh)
    frozen = tc.replace(freeze_routing=True)
    with pytest.raises(CheckpointError, match="freeze_routing"):
        restore_sharded(ckpt, cfg, frozen, make_optimizer(frozen), mesh)
    shapes = flat_keys(cfg, ckpt.trained)
    with pytest.raises(CheckpointError, match=r"shape .* expected \(1, 2\)"):
        shd.read_full(ckpt.state_dir, {**shapes, f"params/{QKV}": (1, 2)})


# Four devices as 2 replicas x 2 shards (hybrid sharding), against one device.
HYBRID_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from dar_core.train.run import TrainConfig
    from dar_core.backends.jax import train
    from dar_core.backends.jax.trainer import make_mesh
    tc = TrainConfig(**json.loads(sys.argv[1]))
    train(tc.replace(out=tc.out + "/one"), devices=jax.devices()[:1])
    train(tc.replace(out=tc.out + "/hybrid", shard="params", fsdp_size=2))
    print(json.dumps({"mesh": dict(make_mesh(fsdp_size=2).shape)}))
""")


def test_hybrid_sharding_over_a_2x2_mesh_matches_one_device(tmp_path, tmp_path_factory):
    tc = TrainConfig(**TRAIN, steps=2, ckpt_every=2, adam_eps=1e-4, out=str(tmp_path))
    env = jax_env(tmp_path_factory, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    info = _run(HYBRID_SCRIPT, tc, env, timeout=400)
    assert info["mesh"] == {"data": 2, "fsdp": 2}
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "ckpt-0000002.safetensors")
    two = load_checkpoint(consolidate(tmp_path / "hybrid"))
    for k in one.params:  # the bound of test_sharded_modes_match_one_device
        assert np.abs(two.params[k] - one.params[k]).max() <= 1e-3 * tc.lr, k
    np.testing.assert_allclose(_metric(tmp_path / "hybrid"), _metric(tmp_path / "one"),
                               rtol=1e-5)
