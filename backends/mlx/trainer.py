"""The MLX training loop: one compiled step, AdamW with bias correction, EMA, data parallel.

Launch on one machine with ``dar train --backend mlx`` or, data parallel, with MLX's launcher
(``mlx.launch -n 2 --backend ring python -m dar_core.cli train --backend mlx ...``): every rank
takes its slice of the global batch from ``run.stream.batch(step, rank, world)`` and the
gradients are averaged with ``nn.average_gradients`` before clipping, so all ranks apply the
same update. All randomness comes from the stream; the step uses no MLX RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_reduce

from dar_core.errors import ConfigError
from dar_core.io.checkpoint import check_optimizer_state
from dar_core.io.sharded import ShardedCheckpoint, to_checkpoint
from dar_core.spec.interpolant import interpolate, velocity_target
from dar_core.train.run import Run, TrainConfig, frozen_names, trained_names
from dar_core.train.schedule import warmup_length

from .device import compute_dtype, resolve_device
from .model import DARTransformer
from .velocity import model_velocity


def loss_fn(model: DARTransformer, x: mx.array, t: mx.array, y: mx.array,
            noise: mx.array) -> mx.array:
    """Mean squared error between the predicted and the true velocity ``x - noise``."""
    x_t = interpolate(x, noise, t)  # [B, C, H, W]
    err = model.forward(x_t, t, y) - velocity_target(x, noise)  # [B, C, H, W] float32
    return mx.mean(mx.square(err))


def make_schedule(tc: TrainConfig) -> Callable[[mx.array], mx.array] | float:
    """The run's schedule (``dar_core.train.schedule``) from ``mlx.optimizers``' own: a
    linear warm-up joined to a cosine decay (a constant lr is a plain float). MLX evaluates it
    at the optimizer's step count, which a resumed run restores."""
    W = warmup_length(tc.warmup_steps)
    after: Any = tc.lr
    if tc.lr_schedule == "cosine":
        after = optim.cosine_decay(tc.lr, tc.steps - W, tc.min_lr)
    if not W:
        return after
    warmup = optim.linear_schedule(tc.lr / W, tc.lr, W - 1)
    if not callable(after):
        return warmup  # it holds lr after its W - 1 steps
    return optim.join_schedules([warmup, after], [W])


def make_optimizer(tc: TrainConfig) -> optim.AdamW:
    """AdamW with bias correction (MLX's default is without) and the run's lr schedule."""
    return optim.AdamW(learning_rate=make_schedule(tc), betas=[tc.beta1, tc.beta2],
                       eps=tc.adam_eps, weight_decay=tc.weight_decay, bias_correction=True)


def global_norm(grads: Any) -> mx.array:
    return mx.sqrt(tree_reduce(lambda acc, g: acc + mx.sum(mx.square(g)), grads, 0.0))


class TrainStep:
    """One optimizer step over the state ``[model, optimizer, ema, random]``.

    ``__call__(x, t, y, noise) -> (loss, grad_norm)`` (global-batch mean loss, pre-clip norm)
    updates the state in place. With ``compile`` the step is traced once by ``mx.compile``
    with the state as its inputs and outputs; ``traces`` counts how often the Python body ran
    (once per input shape when compiled, every call when not).
    """

    def __init__(self, model: DARTransformer, optimizer: optim.Optimizer,
                 ema: dict[str, mx.array], *, grad_clip: float, ema_decay: float,
                 group: Any = None, compile: bool = True, grad_accum: int = 1):
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.world = group.size() if group is not None else 1
        self.group = group
        self.grad_clip, self.decay = float(grad_clip), float(ema_decay)
        self.traces = 0
        self.state = [model.state, optimizer.state, ema, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, loss_fn)

        K = grad_accum

        def step(x: mx.array, t: mx.array, y: mx.array, noise: mx.array, d: mx.array):
            self.traces += 1
            if K == 1:
                loss, grads = loss_and_grad(model, x, t, y, noise)
            else:  # micro-batch j = rows j::K (TrainStream); the mean of their gradients
                loss, grads = 0.0, None
                for j in range(K):
                    part, g = loss_and_grad(model, x[j::K], t[j::K], y[j::K], noise[j::K])
                    loss = loss + part
                    grads = g if grads is None else tree_map(mx.add, grads, g)
                loss, grads = loss / K, tree_map(lambda g: g / K, grads)
            if self.world > 1:
                grads = nn.average_gradients(grads, group=self.group)
                loss = mx.distributed.all_sum(loss, group=self.group) / self.world
            if self.grad_clip > 0:
                grads, norm = optim.clip_grad_norm(grads, self.grad_clip)
            else:
                norm = global_norm(grads)
            optimizer.update(model, grads)
            for name, p in tree_flatten(model.trainable_parameters()):
                ema[name] = d * ema[name] + (1.0 - d) * p
            return loss, norm

        self._step = partial(mx.compile, inputs=self.state, outputs=self.state)(step) \
            if compile else step

    def __call__(self, x: mx.array, t: mx.array, y: mx.array, noise: mx.array,
                 ema_decay: float | None = None) -> tuple[mx.array, mx.array]:
        """Schedule one step; returns at once (``loss.item()`` waits for it). ``ema_decay``
        overrides the configured decay for this step (EMA warm-up)."""
        d = mx.array(self.decay if ema_decay is None else ema_decay, dtype=mx.float32)
        loss, norm = self._step(x, t, y, noise, d)
        # Materialize the whole new state every step, so the lazy graph never spans steps.
        mx.async_eval(loss, norm, self.state)
        return loss, norm


# Checkpoint state <-> MLX ------------------------------------------------------------------
def _lookup(tree: Any, name: str) -> Any:
    """``tree["blocks"][0]["attn"]...`` for the dotted ``name``."""
    for part in name.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def opt_to_numpy(optimizer: optim.Optimizer, names: list[str]) -> dict[str, np.ndarray]:
    """AdamW moments in the shared checkpoint layout ``m/<name>``, ``v/<name>``, ``step``."""
    out: dict[str, np.ndarray] = {}
    for n in names:
        s = _lookup(optimizer.state, n)
        out[f"m/{n}"], out[f"v/{n}"] = np.array(s["m"]), np.array(s["v"])
    out["step"] = np.array(int(optimizer.state["step"].item()), dtype=np.int64)
    return out


def opt_from_numpy(optimizer: optim.Optimizer, opt: dict[str, np.ndarray],
                   names: list[str]) -> None:
    """Restore moments and step into an initialized optimizer; name the first missing key."""
    check_optimizer_state(opt, names)
    for n in names:
        s = _lookup(optimizer.state, n)
        s["m"], s["v"] = mx.array(opt[f"m/{n}"]), mx.array(opt[f"v/{n}"])
    optimizer.state["step"] = mx.array(int(opt["step"]), dtype=mx.uint64)


def ema_to_numpy(ema: dict[str, mx.array], model: DARTransformer) -> dict[str, np.ndarray]:
    """EMA weights under every schema name (what is not trained, the fixed ``pos_embed`` and
    frozen routers, copied from the model)."""
    out = {k: np.array(v) for k, v in ema.items()}
    for k, v in model.export_weights().items():
        out.setdefault(k, v)
    return out


def freeze(model: DARTransformer, names: list[str]) -> None:
    """Exclude the parameters ``names`` (schema names) from ``trainable_parameters``."""
    for name in names:
        *path, leaf = name.split(".")
        mod: Any = model
        for part in path:
            mod = mod[int(part)] if isinstance(mod, list) else mod[part]
        mod.freeze(keys=[leaf], recurse=False)


# The loop --------------------------------------------------------------------------------
def train(tc: TrainConfig) -> Path:
    """Train (or resume, ``tc.resume``) a DARTransformer; returns the run folder."""
    resolve_device(tc.device)
    if tc.shard != "none":
        raise ConfigError(f"shard={tc.shard!r}: MLX's mx.distributed is data parallel only; "
                          "on Apple silicon fit a larger model with --grad-accum K and "
                          "--grad-checkpoint, or shard it with the torch or jax backend")
    DARTransformer.check_routing_impl(tc.routing_impl)  # before the run folder is claimed
    group = mx.distributed.init()  # a one-process group unless started by mlx.launch
    rank, world = group.rank(), group.size()
    run = Run(tc, backend="mlx", rank=rank, world=world)
    cfg, dtype = run.cfg, compute_dtype(tc.precision)
    names = trained_names(cfg, tc)
    ckpt = run.resume_checkpoint()
    if isinstance(ckpt, ShardedCheckpoint):  # a sharded torch/JAX run's: read it whole
        ckpt = to_checkpoint(ckpt)

    model = DARTransformer(cfg, seed=tc.seed, dtype=dtype, grad_checkpoint=tc.grad_checkpoint,
                           routing_impl=tc.routing_impl)
    freeze(model, frozen_names(cfg, tc))
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    init = run.initial_weights() if ckpt is None else None
    if ckpt is not None:
        model.load_weights(ckpt.params)
        opt_from_numpy(optimizer, ckpt.opt, names)
    elif init is not None:
        model.load_weights(init["params"])
    source = ckpt.ema if ckpt is not None and ckpt.ema is not None else model.export_weights()
    if init is not None:
        source = init["ema"]
    ema = {n: mx.array(np.asarray(source[n], dtype=np.float32)) for n in names}
    step_fn = TrainStep(model, optimizer, ema, grad_clip=tc.grad_clip, ema_decay=tc.ema_decay,
                        group=group, compile=tc.compile, grad_accum=tc.grad_accum)
    sampler_model = DARTransformer(cfg, dtype=dtype) if run.is_main else None
    sampler = model_velocity(sampler_model) if sampler_model is not None else None

    def device_batch(step: int) -> tuple[mx.array, ...]:
        b = run.stream.batch(step, rank, world)  # this rank's slice of the global batch
        return (mx.array(b["x"]), mx.array(b["t"]), mx.array(b["y"].astype(np.int32)),
                mx.array(b["noise"]))

    batch = device_batch(run.start_step) if run.start_step < tc.steps else None
    for step in run.steps():
        loss, norm = step_fn(*batch, ema_decay=tc.ema_decay_at(step))
        if step + 1 < tc.steps:
            batch = device_batch(step + 1)  # drawn on the host while the step runs
        # the lr of this update: MLX's schedule at the step count it was evaluated at
        run.log(step, loss.item(), norm.item(), lr=optimizer.learning_rate.item())
        if run.should_checkpoint(step) and run.is_main:
            run.save(run.done(step), params=model.export_weights(),
                     ema=ema_to_numpy(ema, model), opt=opt_to_numpy(optimizer, names))
        if run.should_sample(step) and sampler is not None:
            sampler_model.load_weights(ema_to_numpy(ema, model))
            run.sample_grid(step, sampler.velocity, sampler.asarray, sampler.to_numpy)
    run.finish()
    return run.dir
