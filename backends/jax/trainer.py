"""The JAX training loop: one jitted step, data parallel over a 1-D device mesh ``"data"``.

The batch is sharded along B, parameters / EMA / optimizer state are replicated, and XLA
inserts the gradient all-reduce. Multi-host (TPU pods): ``jax.distributed.initialize()`` runs
when ``DAR_JAX_DISTRIBUTED=1`` or ``JAX_COORDINATOR_ADDRESS`` is set; every process feeds its
slice of the global batch (``rank = jax.process_index()``) and the global array is assembled
with ``jax.make_array_from_process_local_data``. Every random draw comes from the core's
``TrainStream``, so resumed runs are bit-identical and all backends see the same batches.
"""

from __future__ import annotations

import collections
import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dar_core.errors import ConfigError
from dar_core.io.checkpoint import Checkpoint, check_optimizer_state
from dar_core.spec.config import ModelConfig
from dar_core.spec.interpolant import interpolate, velocity_target
from dar_core.spec.schema import NON_TRAINABLE, init_params
from dar_core.train.run import Run, TrainConfig, frozen_names, trained_names
from dar_core.train.schedule import warmup_length

from .device import compute_dtype, resolve_device
from .model import DARTransformer, cast, forward
from .velocity import velocity_model

# Times each traced function was traced (a Python side effect runs only while tracing).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class TrainState(NamedTuple):
    params: dict[str, jax.Array]  # trainable float32 master weights (no pos_embed)
    ema: dict[str, jax.Array]
    opt: optax.OptState


def initialize_distributed() -> bool:
    """Join a multi-host job when the environment asks for one (idempotent).

    Triggered by ``DAR_JAX_DISTRIBUTED=1`` or ``JAX_COORDINATOR_ADDRESS``. On TPU pods and
    SLURM/Open MPI/Kubernetes clusters JAX finds the coordinator and process ids itself;
    elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
    ``DAR_JAX_NUM_PROCESSES`` and ``DAR_JAX_PROCESS_ID``. CPU processes exchange gradients
    over gloo.
    """
    env = os.environ
    wanted = env.get("DAR_JAX_DISTRIBUTED") == "1" or "JAX_COORDINATOR_ADDRESS" in env
    if wanted and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        count, index = env.get("DAR_JAX_NUM_PROCESSES"), env.get("DAR_JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=int(count) if count else None,
                                   process_id=int(index) if index else None)
    return jax.distributed.is_initialized()


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh ``"data"`` over ``devices`` (default: every device of the default backend,
    across all processes; a string like ``"cpu"`` selects a platform). Devices are ordered by
    process, so process ``p`` holds rows ``p*b .. (p+1)*b`` of the global batch: the slice
    ``run.stream.batch(step, rank=p, world)`` it feeds."""
    if devices is None or devices == "auto":
        devices = jax.devices()
    elif isinstance(devices, str):
        devices = jax.devices(resolve_device(devices).platform)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(ordered), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree on every device of ``mesh`` (the step's own output placement, so the
    first call traces the same types as every later one)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


class StepSettings(NamedTuple):
    """The TrainConfig fields the compiled step depends on (its cache key)."""

    lr: float
    beta1: float
    beta2: float
    adam_eps: float
    weight_decay: float
    grad_clip: float
    ema_decay: float
    precision: str
    grad_checkpoint: bool
    lr_schedule: str
    warmup_steps: int
    min_lr: float
    schedule_steps: int  # the run length, where the schedule depends on it (cosine), else 0
    grad_accum: int

    @classmethod
    def of(cls, tc: TrainConfig) -> StepSettings:
        length = tc.steps if tc.lr_schedule == "cosine" else 0
        return cls(*(length if f == "schedule_steps" else getattr(tc, f) for f in cls._fields))


def make_schedule(tc: TrainConfig | StepSettings) -> optax.Schedule:
    """The run's schedule (``dar_core.train.schedule``) from optax's own: a linear warm-up
    joined to a constant or a cosine decay. optax evaluates it at the update count, which a
    resumed run restores with the optimizer state."""
    W = warmup_length(tc.warmup_steps)
    if tc.lr_schedule == "cosine":
        steps = tc.schedule_steps if isinstance(tc, StepSettings) else tc.steps
        after = optax.cosine_decay_schedule(tc.lr, decay_steps=steps - W,
                                            alpha=tc.min_lr / tc.lr if tc.lr else 0.0)
    else:
        after = optax.constant_schedule(tc.lr)
    if not W:
        return after
    warmup = optax.linear_schedule(tc.lr / W, tc.lr, transition_steps=W - 1)
    return optax.join_schedules([warmup, after], boundaries=[W])


def make_optimizer(tc: TrainConfig | StepSettings) -> optax.GradientTransformation:
    """AdamW with bias correction and the run's lr schedule, after global-norm clipping (if
    on)."""
    adamw = optax.adamw(make_schedule(tc), b1=tc.beta1, b2=tc.beta2, eps=tc.adam_eps,
                        weight_decay=tc.weight_decay)
    if tc.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
    return adamw


def loss_fn(params: dict, buffers: dict, batch: dict, cfg: ModelConfig, dtype: Any,
            remat: bool = False) -> jax.Array:
    """Mean squared error between the predicted and the true velocity ``x - noise``."""
    full = cast({**params, **buffers}, dtype)  # compute copy (a no-op for float32)
    x, noise, t, y = batch["x"], batch["noise"], batch["t"], batch["y"]
    x_t = interpolate(x, noise, t)  # [B, C, H, W]
    pred = forward(full, cfg, x_t, t, y, remat=remat)  # [B, C, H, W] float32
    return jnp.mean(jnp.square(pred - velocity_target(x, noise)))


def make_train_step(cfg: ModelConfig, tc: TrainConfig, mesh: Mesh):
    """The jitted step ``(state, buffers, batch) -> (state, loss, pre-clip grad norm)``: state
    and buffers replicated over ``mesh``, the batch sharded along B; the state is donated.
    Built once per (model config, step settings, mesh) in a process, so repeated ``train``
    calls with the same settings reuse the compiled step."""
    return compiled_step(cfg, StepSettings.of(tc), mesh)


@functools.lru_cache(maxsize=16)
def compiled_step(cfg: ModelConfig, settings: StepSettings, mesh: Mesh):
    optimizer = make_optimizer(settings)
    dtype = compute_dtype(settings.precision)

    value_and_grad = jax.value_and_grad(loss_fn)
    K = settings.grad_accum

    def loss_and_grads(params: dict, buffers: dict, batch: dict):
        if K == 1:
            return value_and_grad(params, buffers, batch, cfg, dtype, settings.grad_checkpoint)
        # micro-batch j = rows j::K (TrainStream): [B] -> [B/K, K] -> [K, B/K], B/K sharded
        micro = jax.tree.map(
            lambda v: jnp.swapaxes(v.reshape((v.shape[0] // K, K) + v.shape[1:]), 0, 1), batch)

        def add(acc, b):
            loss, grads = value_and_grad(params, buffers, b, cfg, dtype,
                                         settings.grad_checkpoint)
            return (acc[0] + loss, jax.tree.map(jnp.add, acc[1], grads)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(add, zero, micro)
        return loss / K, jax.tree.map(lambda g: g / K, grads)

    def train_step(state: TrainState, buffers: dict, batch: dict, decay: jax.Array):
        TRACE_COUNTS["train_step"] += 1
        loss, grads = loss_and_grads(state.params, buffers, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt = optimizer.update(grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, params)
        return TrainState(params, ema, opt), loss, grad_norm

    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    jitted = jax.jit(train_step, in_shardings=(replicated, replicated, sharded, replicated),
                     out_shardings=replicated, donate_argnums=(0,))

    def step(state: TrainState, buffers: dict, batch: dict, ema_decay: float | None = None):
        """``ema_decay`` overrides the configured decay for this step (EMA warm-up)."""
        decay = settings.ema_decay if ema_decay is None else ema_decay
        return jitted(state, buffers, batch, jnp.float32(decay))

    return step


def shard_batch(local: dict[str, np.ndarray], sharding: NamedSharding,
                global_batch: int) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded along B (labels as int32)."""
    out = {}
    for k, v in local.items():
        v = v.astype(np.int32) if k == "y" else v
        out[k] = jax.make_array_from_process_local_data(sharding, v,
                                                        (global_batch,) + v.shape[1:])
    return out


# State <-> checkpoint ------------------------------------------------------------------------
def to_host(tree: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in tree.items()}


def opt_to_checkpoint(opt: optax.OptState, steps_done: int) -> dict[str, np.ndarray]:
    """optax's ScaleByAdamState ``mu``/``nu``/``count`` -> ``m/<name>``, ``v/<name>``, ``step``."""
    mu, nu = optax.tree_utils.tree_get(opt, "mu"), optax.tree_utils.tree_get(opt, "nu")
    out = {f"m/{k}": v for k, v in to_host(mu).items()}
    out.update({f"v/{k}": v for k, v in to_host(nu).items()})
    out["step"] = np.array(steps_done, dtype=np.int64)
    return out


def opt_from_checkpoint(opt: optax.OptState, saved: dict[str, np.ndarray],
                        names: list[str]) -> optax.OptState:
    """The inverse of ``opt_to_checkpoint`` into a freshly initialized optax state."""
    check_optimizer_state(saved, names)
    mu = {n: jnp.asarray(saved[f"m/{n}"], jnp.float32) for n in names}
    nu = {n: jnp.asarray(saved[f"v/{n}"], jnp.float32) for n in names}
    count = jnp.asarray(int(saved["step"]), jnp.int32)
    opt = optax.tree_utils.tree_set(opt, mu=mu, nu=nu, count=count)  # Adam's and the schedule's
    return jax.tree.map(jnp.copy, opt)  # one buffer per leaf: the step donates each


def initial_state(cfg: ModelConfig, tc: TrainConfig, optimizer: optax.GradientTransformation,
                  ckpt: Checkpoint | None, init: dict | None = None
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """Fresh (core init) or resumed state, and the fixed buffers (``pos_embed``, and the
    routers of a ``freeze_routing`` run)."""
    names = trained_names(cfg, tc)
    if ckpt is not None:
        source = ckpt.params
    else:  # a fresh run: the core init, or the grafted weights of ``init_from``
        source = init_params(cfg, tc.seed) if init is None else init["params"]
    params = {n: jnp.asarray(source[n], jnp.float32) for n in names}
    buffers = {n: jnp.asarray(source[n], jnp.float32)
               for n in sorted(NON_TRAINABLE) + frozen_names(cfg, tc)}
    ema_src = source if ckpt is None or ckpt.ema is None else ckpt.ema
    if ckpt is None and init is not None:
        ema_src = init["ema"]
    ema = {n: jnp.asarray(ema_src[n], jnp.float32) for n in names}
    opt = optimizer.init(params)
    if ckpt is not None:
        opt = opt_from_checkpoint(opt, ckpt.opt, names)
    return TrainState(params, ema, opt), buffers


# The loop ------------------------------------------------------------------------------------
def train(tc: TrainConfig, *, devices: Any = None) -> Path:
    """Train (or resume) a run; returns the run folder. ``devices`` overrides ``tc.device``."""
    initialize_distributed()
    rank, world = jax.process_index(), jax.process_count()
    run = Run(tc, backend="jax", rank=rank, world=world)
    cfg = run.cfg
    mesh = make_mesh(devices if devices is not None else tc.device)
    if tc.batch_size % mesh.size:
        raise ConfigError(f"batch_size={tc.batch_size} is not divisible by the {mesh.size} "
                          f"devices of the data mesh")
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    optimizer, schedule = make_optimizer(tc), make_schedule(tc)
    ckpt = run.resume_checkpoint()
    init = run.initial_weights() if ckpt is None else None
    state, buffers = replicate(initial_state(cfg, tc, optimizer, ckpt, init), mesh)
    model = DARTransformer(cfg)
    step_fn = make_train_step(cfg, tc, mesh)

    def ema_weights() -> dict[str, np.ndarray]:
        return model.export_weights({**state.ema, **buffers})

    # The loss of step s is fetched after step s+1 is dispatched, so the host never waits on
    # the device mid-stream; it is fetched at once before a checkpoint or sample of step s.
    pending: tuple[int, jax.Array, jax.Array] | None = None

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            s, loss, grad_norm = pending
            pending = None
            # raises on NaN/inf, naming step s; the lr is optax's at update count s
            run.log(s, float(loss), float(grad_norm), lr=float(schedule(s)))

    for step in run.steps():
        batch = shard_batch(run.stream.batch(step, rank, world), sharded, tc.batch_size)
        state, loss, grad_norm = step_fn(state, buffers, batch, tc.ema_decay_at(step))
        flush()
        pending = (step, loss, grad_norm)
        if run.should_checkpoint(step) or run.should_sample(step):
            flush()
        if run.should_checkpoint(step) and run.is_main:
            n = run.done(step)
            run.save(n, params=model.export_weights({**state.params, **buffers}), ema=ema_weights(),
                     opt=opt_to_checkpoint(state.opt, n))
        if run.should_sample(step) and run.is_main:
            vm = velocity_model(cfg, ema_weights(), precision=tc.precision,
                                device=jax.local_devices()[0])
            run.sample_grid(step, vm.velocity, vm.asarray, vm.to_numpy)
    flush()
    run.finish()
    return run.dir
