"""The JAX training loop: one jitted step over a 2-D device mesh ``("data", "fsdp")``.

The batch is sharded along B over both axes. ``shard="none"`` (``fsdp`` of size 1): pure data
parallel, parameters / EMA / optimizer state replicated. ``shard="params"`` (FSDP / ZeRO-3):
parameters, EMA and optimizer state split over ``"fsdp"`` by ``sharded.fsdp_spec``;
``shard="opt"`` (ZeRO-1/2): parameters replicated, EMA and optimizer state split. The jitted
step declares these shardings and XLA inserts the collectives (gradient all-reduce or
reduce-scatter, parameter all-gathers); sharded runs checkpoint with Orbax, each process
writing its own shards (``dar_core.io.sharded``).

Multi-host (TPU pods): ``jax.distributed.initialize()`` runs when ``DAR_JAX_DISTRIBUTED=1``
or ``JAX_COORDINATOR_ADDRESS`` is set; every process feeds its slice of the global batch
(``rank = jax.process_index()``) and the global array is assembled with
``jax.make_array_from_process_local_data``. Every random draw comes from the core's
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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dar_core.errors import CheckpointError, ConfigError
from dar_core.io.checkpoint import Checkpoint, check_optimizer_state
from dar_core.io.sharded import ShardedCheckpoint, mesh_shape, to_checkpoint
from dar_core.spec.config import ModelConfig
from dar_core.spec.interpolant import interpolate, velocity_target
from dar_core.spec.schema import NON_TRAINABLE, init_params, param_shapes
from dar_core.train.run import Run, TrainConfig, frozen_names, trained_names
from dar_core.train.schedule import warmup_length

from . import sharded as shd
from .device import compute_dtype, resolve_device
from .model import DARTransformer, cast, forward
from .routing import resolve_impl
from .velocity import velocity_model

# Times each traced function was traced (a Python side effect runs only while tracing).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()
AXES = ("data", "fsdp")


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


def make_mesh(devices: Any = None, fsdp_size: int = 1) -> Mesh:
    """A 2-D mesh ``("data", "fsdp")`` over ``devices`` (default: every device of the default
    backend, across all processes; a string like ``"cpu"`` selects a platform), of shape
    ``mesh_shape(len(devices), fsdp_size)`` (default 1: pure data parallel; 0: one FSDP group
    of every device). Devices are ordered by process, so process ``p`` holds rows
    ``p*b .. (p+1)*b`` of the global batch (``batch_sharding``): the slice
    ``run.stream.batch(step, rank=p, world)`` it feeds."""
    if devices is None or devices == "auto":
        devices = jax.devices()
    elif isinstance(devices, str):
        devices = jax.devices(resolve_device(devices).platform)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(ordered).reshape(mesh_shape(len(ordered), fsdp_size)), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch: B split over every device of ``mesh``, in process order."""
    return NamedSharding(mesh, PartitionSpec(AXES))


def state_shardings(state: Any, mesh: Mesh, shard: str) -> TrainState:
    """The placement of each array of ``state`` (a ``TrainState`` of arrays or shape
    structs): ``sharded.fsdp_spec`` over ``"fsdp"`` for the parts ``shard`` splits
    (``"params"``: all; ``"opt"``: EMA and optimizer state), replicated otherwise."""
    n = mesh.shape["fsdp"]

    def rule(split: bool):
        return lambda a: NamedSharding(mesh, shd.fsdp_spec(a.shape, n) if split else
                                       PartitionSpec())

    return TrainState(jax.tree.map(rule(shard == "params"), state.params),
                      jax.tree.map(rule(shard != "none"), state.ema),
                      jax.tree.map(rule(shard != "none"), state.opt))


def place(tree: Any, shardings: Any) -> Any:
    """Host (or single-device) values -> global arrays with ``shardings`` (a matching tree, or
    one sharding for all): each process, holding the same values, keeps its own shards."""
    def put(a: Any, s: NamedSharding) -> jax.Array:
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda a: put(a, shardings), tree)
    return jax.tree.map(put, tree, shardings)


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
    routing_impl: str

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
            remat: bool = False, routing_impl: str = "auto") -> jax.Array:
    """Mean squared error between the predicted and the true velocity ``x - noise``."""
    full = cast({**params, **buffers}, dtype)  # compute copy (a no-op for float32)
    x, noise, t, y = batch["x"], batch["noise"], batch["t"], batch["y"]
    x_t = interpolate(x, noise, t)  # [B, C, H, W]
    pred = forward(full, cfg, x_t, t, y, routing_impl, remat)  # [B, C, H, W] float32
    return jnp.mean(jnp.square(pred - velocity_target(x, noise)))


def make_train_step(cfg: ModelConfig, tc: TrainConfig, mesh: Mesh):
    """The jitted step ``(state, buffers, batch) -> (state, loss, pre-clip grad norm)``: the
    state placed by ``state_shardings(state, mesh, tc.shard)``, buffers replicated, the batch
    sharded along B; the state is donated. Built once per (model config, step settings,
    mesh, shard mode) in a process, so repeated ``train`` calls with the same settings reuse
    the compiled step."""
    return compiled_step(cfg, StepSettings.of(tc), mesh, tc.shard)


@functools.lru_cache(maxsize=16)
def compiled_step(cfg: ModelConfig, settings: StepSettings, mesh: Mesh, shard: str = "none"):
    optimizer = make_optimizer(settings)
    dtype = compute_dtype(settings.precision)

    value_and_grad = jax.value_and_grad(loss_fn)
    K = settings.grad_accum

    def loss_and_grads(params: dict, buffers: dict, batch: dict):
        if K == 1:
            return value_and_grad(params, buffers, batch, cfg, dtype, settings.grad_checkpoint,
                                  settings.routing_impl)
        # micro-batch j = rows j::K (TrainStream): [B] -> [B/K, K] -> [K, B/K], B/K sharded
        micro = jax.tree.map(
            lambda v: jnp.swapaxes(v.reshape((v.shape[0] // K, K) + v.shape[1:]), 0, 1), batch)

        def add(acc, b):
            loss, grads = value_and_grad(params, buffers, b, cfg, dtype,
                                         settings.grad_checkpoint, settings.routing_impl)
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
    jitted: dict[Any, Any] = {}  # one jit per state structure (the trained names)

    def jit_for(state: TrainState) -> Any:
        placed = state_shardings(state, mesh, shard)
        return jax.jit(train_step,
                       in_shardings=(placed, replicated, batch_sharding(mesh), replicated),
                       out_shardings=(placed, replicated, replicated), donate_argnums=(0,))

    def step(state: TrainState, buffers: dict, batch: dict, ema_decay: float | None = None):
        """``ema_decay`` overrides the configured decay for this step (EMA warm-up)."""
        decay = settings.ema_decay if ema_decay is None else ema_decay
        key = jax.tree.structure(state)
        if key not in jitted:
            jitted[key] = jit_for(state)
        return jitted[key](state, buffers, batch, jnp.float32(decay))

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
    """Full float32 host copies. An array split over processes is all-gathered, so with such
    arrays every process must call it."""
    def full(a: jax.Array) -> np.ndarray:
        if a.is_fully_addressable or a.is_fully_replicated:
            return np.asarray(jax.device_get(a), dtype=np.float32)
        return np.asarray(multihost_utils.process_allgather(a, tiled=True), dtype=np.float32)

    return {k: full(v) for k, v in tree.items()}


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
    buffers = {n: jnp.asarray(source[n], jnp.float32) for n in buffer_names(cfg, tc)}
    ema_src = source if ckpt is None or ckpt.ema is None else ckpt.ema
    if ckpt is None and init is not None:
        ema_src = init["ema"]
    ema = {n: jnp.asarray(ema_src[n], jnp.float32) for n in names}
    opt = optimizer.init(params)
    if ckpt is not None:
        opt = opt_from_checkpoint(opt, ckpt.opt, names)
    return TrainState(params, ema, opt), buffers


def buffer_names(cfg: ModelConfig, tc: TrainConfig) -> list[str]:
    """The fixed arrays: ``pos_embed``, and the routers of a ``freeze_routing`` run."""
    return sorted(NON_TRAINABLE) + frozen_names(cfg, tc)


def start_state(run: Run, optimizer: optax.GradientTransformation,
                ckpt: Checkpoint | ShardedCheckpoint | None, mesh: Mesh
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The run's first state and buffers on ``mesh``: a sharded checkpoint read shard by
    shard, else the fresh or single-file state placed with the run's shardings (another
    engine's sharded checkpoint is read whole first, as torch and MLX read Orbax's)."""
    if isinstance(ckpt, ShardedCheckpoint) and ckpt.engine != shd.ENGINE:
        ckpt = to_checkpoint(ckpt)
    if isinstance(ckpt, ShardedCheckpoint):
        return restore_sharded(ckpt, run.cfg, run.tc, optimizer, mesh)
    init = run.initial_weights() if ckpt is None else None
    state, buffers = initial_state(run.cfg, run.tc, optimizer, ckpt, init)
    return (place(state, state_shardings(state, mesh, run.tc.shard)),
            place(buffers, NamedSharding(mesh, PartitionSpec())))


# Sharded state <-> Orbax checkpoint ----------------------------------------------------------
def to_flat(state: TrainState, buffers: dict, steps_done: Any) -> dict[str, Any]:
    """The state under the keys of ``dar_core.io.sharded.flat_keys`` (a buffer is its own
    EMA); ``steps_done`` is ``opt/step``."""
    mu, nu = optax.tree_utils.tree_get(state.opt, "mu"), optax.tree_utils.tree_get(state.opt, "nu")
    flat = {f"params/{k}": v for k, v in {**state.params, **buffers}.items()}
    flat.update({f"ema/{k}": v for k, v in {**state.ema, **buffers}.items()})
    flat.update({f"opt/m/{k}": v for k, v in mu.items()})
    flat.update({f"opt/v/{k}": v for k, v in nu.items()})
    flat["opt/step"] = steps_done
    return flat


def abstract_state(cfg: ModelConfig, tc: TrainConfig, optimizer: optax.GradientTransformation
                   ) -> tuple[TrainState, dict[str, jax.ShapeDtypeStruct]]:
    """The shapes and dtypes of ``initial_state``'s result, without computing any array."""
    shapes = param_shapes(cfg)

    def struct(n: str) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(shapes[n]), jnp.float32)

    params = {n: struct(n) for n in trained_names(cfg, tc)}
    buffers = {n: struct(n) for n in buffer_names(cfg, tc)}
    return TrainState(params, dict(params), jax.eval_shape(optimizer.init, params)), buffers


@functools.lru_cache(maxsize=8)
def _all_finite(mesh: Mesh):
    def all_finite(tree: Any) -> jax.Array:
        ok = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
              if jnp.issubdtype(a.dtype, jnp.floating)]
        return jnp.all(jnp.stack(ok))

    return jax.jit(all_finite, out_shardings=NamedSharding(mesh, PartitionSpec()))


def any_non_finite(tree: Any, mesh: Mesh) -> bool:
    """Whether any floating array of ``tree`` holds NaN or inf: one reduction over the whole
    mesh, so every process gets the same answer (every process must call it)."""
    return not bool(_all_finite(mesh)(tree))


def save_sharded(run: Run, steps_done: int, state: TrainState, buffers: dict,
                 mesh: Mesh) -> None:
    """Every process: its shards of the state after ``steps_done`` optimizer steps, into
    ``ckpt-<step>.sharded`` through ``Run.save_sharded`` (which raises on non-finite state)."""
    flat = to_flat(state, buffers, np.asarray(steps_done, np.int64))

    def barrier() -> None:
        multihost_utils.sync_global_devices(f"dar checkpoint {steps_done}")

    run.save_sharded(steps_done, shd.ENGINE,
                     lambda folder: shd.save(folder, flat, background=run.tc.async_save), barrier,
                     any_non_finite((state, buffers), mesh))


def restore_sharded(ckpt: ShardedCheckpoint, cfg: ModelConfig, tc: TrainConfig,
                    optimizer: optax.GradientTransformation, mesh: Mesh
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The state of a sharded checkpoint, each process reading its own shards straight into
    the run's placement; ``CheckpointError`` for another engine's checkpoint, another set of
    trained arrays, or a non-finite state."""
    where = str(ckpt.path)
    if ckpt.engine != shd.ENGINE:
        raise CheckpointError(f"checkpoint {where!r} was written by the {ckpt.engine!r} engine, "
                              f"which JAX does not read: run `dar consolidate {where}` first and "
                              "resume from the .safetensors file it writes")
    differ = sorted(set(ckpt.trained) ^ set(trained_names(cfg, tc)))
    if differ:
        raise CheckpointError(f"checkpoint {where!r} trained other arrays than this run "
                              f"({differ[:3]} differ): freeze_routing must match its run's")
    state, buffers = abstract_state(cfg, tc, optimizer)
    placed = state_shardings(state, mesh, tc.shard)
    replicated = NamedSharding(mesh, PartitionSpec())

    def target(a: jax.ShapeDtypeStruct, s: NamedSharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    flat = shd.restore(ckpt.state_dir, to_flat(
        jax.tree.map(target, state, placed), {k: target(v, replicated) for k, v in
                                              buffers.items()}, None))
    opt = optax.tree_utils.tree_set(
        state.opt, mu={n: flat[f"opt/m/{n}"] for n in state.params},
        nu={n: flat[f"opt/v/{n}"] for n in state.params},
        count=np.asarray(int(flat["opt/step"]), np.int32))  # Adam's and the schedule's
    opt = jax.tree.map(lambda a, s: a if isinstance(a, jax.Array) else place(a, s), opt,
                       placed.opt)
    state = TrainState({n: flat[f"params/{n}"] for n in state.params},
                       {n: flat[f"ema/{n}"] for n in state.ema}, opt)
    buffers = {n: flat[f"params/{n}"] for n in buffers}
    if any_non_finite((state, buffers), mesh):
        raise CheckpointError(f"checkpoint {where!r} holds non-finite tensors")
    return state, buffers


# The loop ------------------------------------------------------------------------------------
def train(tc: TrainConfig, *, devices: Any = None) -> Path:
    """Train (or resume) a run; returns the run folder. ``devices`` overrides ``tc.device``."""
    initialize_distributed()
    rank, world = jax.process_index(), jax.process_count()
    run = Run(tc, backend="jax", rank=rank, world=world)
    cfg = run.cfg
    mesh = make_mesh(devices if devices is not None else tc.device,
                     tc.fsdp_size if tc.shard != "none" else 1)
    if tc.batch_size % mesh.size:
        raise ConfigError(f"batch_size={tc.batch_size} is not divisible by the {mesh.size} "
                          f"devices of the data mesh")
    batches = batch_sharding(mesh)
    optimizer, schedule = make_optimizer(tc), make_schedule(tc)
    state, buffers = start_state(run, optimizer, run.resume_checkpoint(), mesh)
    model = DARTransformer(cfg)
    step_fn = make_train_step(cfg, tc, mesh)
    if run.is_main and cfg.routing.is_dar:
        impl = resolve_impl(tc.routing_impl, compute_dtype(tc.precision))
        print(f"routing: {impl} (routing_impl={tc.routing_impl!r}, {jax.default_backend()})")

    def ema_weights() -> dict[str, np.ndarray]:  # every process (a split EMA is gathered)
        return model.export_weights({**to_host(state.ema), **to_host(buffers)})

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
        batch = shard_batch(run.stream.batch(step, rank, world), batches, tc.batch_size)
        state, loss, grad_norm = step_fn(state, buffers, batch, tc.ema_decay_at(step))
        flush()
        pending = (step, loss, grad_norm)
        if run.should_checkpoint(step) or run.should_sample(step):
            flush()
        if run.should_checkpoint(step):
            n = run.done(step)
            if tc.shard != "none":
                save_sharded(run, n, state, buffers, mesh)
            elif run.is_main:
                run.save(n, params=model.export_weights({**state.params, **buffers}),
                         ema=ema_weights(), opt=opt_to_checkpoint(state.opt, n))
        if run.should_sample(step):
            ema = ema_weights()
            if run.is_main:
                vm = velocity_model(cfg, ema, precision=tc.precision,
                                    device=jax.local_devices()[0])
                run.sample_grid(step, vm.velocity, vm.asarray, vm.to_numpy)
    flush()
    run.finish()
    return run.dir
