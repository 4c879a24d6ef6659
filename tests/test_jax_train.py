"""JAX training: the jitted step (AdamW, clipping, EMA, frozen pos_embed, bf16, one trace),
the optimizer-state checkpoint layout, the NaN stop, and the ``dar`` CLI through the contract."""

import json
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from dar_core import cli  # noqa: E402
from dar_core.backends.jax.trainer import (  # noqa: E402
    TRACE_COUNTS,
    TrainState,
    compiled_step,
    initial_state,
    loss_fn,
    make_mesh,
    make_optimizer,
    make_train_step,
    opt_from_checkpoint,
    opt_to_checkpoint,
    replicate,
    shard_batch,
)
from dar_core.conformance.tolerances import tol  # noqa: E402
from dar_core.errors import CheckpointError  # noqa: E402
from dar_core.io.checkpoint import load_checkpoint  # noqa: E402
from dar_core.spec.schema import random_params, trainable_names  # noqa: E402
from dar_core.testing import rel_err, ulp_tol  # noqa: E402
from dar_core.train.run import TrainConfig, TrainStream, make_train_dataset  # noqa: E402

# Reference computations compile quickly (LLVM optimization level 0): they run once.
QUICK = {"xla_backend_optimization_level": 0}
# One set of step settings for every test here, so the compiled step is shared.
TC = TrainConfig(model="micro", batch_size=8, lr=3e-3, weight_decay=0.1, grad_clip=0.05,
                 ema_decay=0.9, progress=False)


def _setup(tc):
    cfg = tc.model_config()
    mesh = make_mesh()
    optimizer = make_optimizer(tc)
    state, buffers = initial_state(cfg, tc, optimizer, None)
    dense = random_params(cfg, seed=7, dtype=np.float32)  # every gradient non-zero
    params = {k: jnp.asarray(dense[k]) for k in state.params}
    state = TrainState(params, {k: jnp.array(v) for k, v in params.items()},
                       optimizer.init(params))
    state, buffers = replicate((state, buffers), mesh)  # as train() places them
    stream = TrainStream(make_train_dataset(tc), tc, cfg.null_class)
    batches = [shard_batch(stream.batch(s), NamedSharding(mesh, PartitionSpec("data")),
                           tc.batch_size) for s in range(6)]
    step = make_train_step(cfg, tc, mesh)
    return cfg, state, buffers, batches, step


def test_step_is_adamw_with_clipping_and_ema_and_traces_once():
    cfg, state, buffers, batches, _ = _setup(TC)
    p0 = {k: np.asarray(v) for k, v in state.params.items()}
    pos0 = np.asarray(buffers["pos_embed"])
    grad_fn = jax.jit(jax.grad(loss_fn), static_argnums=(3, 4), compiler_options=QUICK)
    grads = grad_fn(state.params, buffers, batches[0], cfg, jnp.float32)
    assert set(grads) == set(trainable_names(cfg)) and "pos_embed" not in grads
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}

    compiled_step.cache_clear()  # build the step afresh: its first call must trace it
    step = make_train_step(cfg, TC, make_mesh())
    before = TRACE_COUNTS["train_step"]
    state, loss, grad_norm = step(state, buffers, batches[0])
    # AdamW in NumPy: global-norm clip, first moments, bias correction, decoupled decay.
    norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
    assert norm > TC.grad_clip  # clipping is active in this test
    assert abs(float(grad_norm) - norm) <= 1e-5 * norm  # the logged norm is pre-clip
    for k, gk in g.items():
        gk = gk * TC.grad_clip / norm
        m, v = (1 - TC.beta1) * gk, (1 - TC.beta2) * gk**2
        update = (m / (1 - TC.beta1)) / (np.sqrt(v / (1 - TC.beta2)) + TC.adam_eps)
        expected = p0[k] - TC.lr * (update + TC.weight_decay * p0[k])
        # The first update g/(|g| + eps) is ill-conditioned where |g| ~ eps: its derivative is
        # eps/(|g| + eps)^2, up to 1/(4 eps). The step's float32 gradient and this test's
        # (another compilation) agree to the suite's float32 gradient bound, grad_atol of the
        # largest entry, so each entry may move by lr times that times the derivative, on top
        # of a few float32 roundings of the update itself.
        dg = tol("grad_atol") * np.abs(gk).max()
        allowed = (TC.lr * dg * TC.adam_eps / (np.abs(gk) + TC.adam_eps) ** 2
                   + ulp_tol(16, np.float32) * np.abs(expected).max())
        err = np.abs(np.asarray(state.params[k], np.float64) - expected)
        assert np.all(err <= allowed), (k, float((err / allowed).max()))
        ema = TC.ema_decay * p0[k] + (1 - TC.ema_decay) * np.asarray(state.params[k])
        assert rel_err(state.ema[k], ema) < 1e-6, k
    assert math.isfinite(float(loss))

    for b in batches[1:]:  # five more steps, new data each: no retrace
        state, loss, _ = step(state, buffers, b)
    assert TRACE_COUNTS["train_step"] - before == 1
    assert np.array_equal(np.asarray(buffers["pos_embed"]), pos0)
    counts = optax.tree_utils.tree_get_all_with_path(state.opt, "count")  # Adam's, schedule's
    assert counts and {int(c) for _, c in counts} == {len(batches)}


def test_bf16_step_keeps_float32_master_weights_and_state():
    cfg, state, buffers, batches, step16 = _setup(TC.replace(precision="bf16"))
    copy = replicate(jax.tree.map(jnp.array, state), make_mesh())  # the steps donate state
    _, loss32, _ = make_train_step(cfg, TC, make_mesh())(copy, buffers, batches[0])
    new, loss, _ = step16(state, buffers, batches[0])
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((new.params, new.ema)))
    mu = optax.tree_utils.tree_get(new.opt, "mu")
    assert all(v.dtype == jnp.float32 for v in mu.values())
    loss, loss32 = float(loss), float(loss32)
    assert loss != loss32  # computed in bf16...
    assert abs(loss - loss32) < 2e-2 * loss32  # ...and close to fp32


def test_optimizer_state_maps_to_the_checkpoint_layout_and_back():
    cfg, state, buffers, batches, step = _setup(TC)
    for b in batches[:2]:
        state, _, _ = step(state, buffers, b)
    saved = opt_to_checkpoint(state.opt, 2)
    names = trainable_names(cfg)
    assert set(saved) == {f"m/{n}" for n in names} | {f"v/{n}" for n in names} | {"step"}
    assert saved["step"].dtype == np.int64 and int(saved["step"]) == 2
    assert all(saved[f"m/{n}"].dtype == np.float32 for n in names)
    fresh = make_optimizer(TC).init(state.params)
    restored = opt_from_checkpoint(fresh, saved, names)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.opt), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    del saved[f"v/{names[3]}"]
    with pytest.raises(CheckpointError, match=f"'opt/v/{names[3]}'"):
        opt_from_checkpoint(fresh, saved, names)


def test_cli_train_and_sample_through_the_contract(tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--backend", "jax", "--model", "micro", "--steps", "3",
                   "--batch-size", "8", "--lr", str(TC.lr), "--weight-decay",
                   str(TC.weight_decay), "--grad-clip", str(TC.grad_clip), "--ema-decay",
                   str(TC.ema_decay), "--ckpt-every", "3", "--sample-every", "3",
                   "--per-class", "1", "--sample-steps", "2", "--no-progress",
                   "--out", str(out)])
    assert rc == 0
    ckpt = out / "checkpoints" / "ckpt-0000003.safetensors"
    loaded = load_checkpoint(ckpt)
    assert loaded.meta["backend"] == "jax" and int(loaded.opt["step"]) == 3
    assert (out / "samples" / "step-0000003.png").is_file()
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").open()][-1] == 3
    npz = tmp_path / "s.npz"
    rc = cli.main(["sample", "--backend", "jax", "--checkpoint", str(ckpt), "--steps", "2",
                   "--labels", "0,3,10", "--out", str(tmp_path / "s.png"),
                   "--save-npz", str(npz)])
    assert rc == 0 and (tmp_path / "s.png").is_file()
    images = np.load(npz)["x"]
    assert images.shape == (3, 3, 16, 16) and np.isfinite(images).all()
