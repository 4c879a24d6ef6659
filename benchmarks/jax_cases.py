"""JAX cases for the benchmarks: a full AdamW training step (the backend's jitted step), a
sampling step (the jitted forward), and one routing aggregation (forward + backward, jitted)
in the optimized and the naive form. Every case blocks until its result is computed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dar_core.backends.jax.model import DARTransformer, forward_jit
from dar_core.backends.jax.routing import route as route_list
from dar_core.backends.jax.trainer import (
    initial_state,
    loss_fn,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
)
from dar_core.spec.config import ModelConfig
from dar_core.spec.routing import route
from dar_core.train.run import TrainConfig

NAME = "jax"


def _batch(cfg: ModelConfig, b: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (b, cfg.in_channels, cfg.input_size, cfg.input_size)
    return {"x": rng.standard_normal(shape, dtype=np.float32),
            "noise": rng.standard_normal(shape, dtype=np.float32),
            "t": rng.random(b, dtype=np.float32),
            "y": rng.integers(0, cfg.num_classes, b).astype(np.int32)}


def train_step(cfg: ModelConfig, batch_size: int):
    tc = TrainConfig(lr=1e-4)
    mesh = make_mesh()
    state, buffers = replicate(initial_state(cfg, tc, make_optimizer(tc), None), mesh)
    step_fn = make_train_step(cfg, tc, mesh)
    batch = shard_batch(_batch(cfg, batch_size), NamedSharding(mesh, PartitionSpec("data")),
                        batch_size)

    def step() -> None:
        nonlocal state  # the jitted step donates the state: keep the new one
        state, loss, grad_norm = step_fn(state, buffers, batch)
        jax.block_until_ready((state, loss, grad_norm))

    return step


def peak_memory_mb(cfg: ModelConfig, batch_size: int) -> float:
    """Temporary memory (activations, gradients) XLA assigns to the compiled forward +
    backward: the step's own peak, without compiler or runtime memory."""
    tc = TrainConfig(lr=1e-4)
    state, buffers = initial_state(cfg, tc, make_optimizer(tc), None)
    b = {k: jnp.asarray(v) for k, v in _batch(cfg, batch_size).items()}
    grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4))
    compiled = grad.lower(state.params, buffers, b, cfg, jnp.float32).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def sample_step(cfg: ModelConfig, batch_size: int):
    params = DARTransformer(cfg).init(0)
    b = {k: jnp.asarray(v) for k, v in _batch(cfg, batch_size).items()}

    def step() -> None:
        jax.block_until_ready(forward_jit(params, cfg, b["x"], b["t"], b["y"]))

    return step


def routing_case(n: int, b: int, t: int, d: int, impl: str):
    """One aggregator over ``n`` sources with a per-sample query, forward + backward."""
    rng = np.random.default_rng(0)
    vs = [jnp.asarray(rng.standard_normal((b, t, d), dtype=np.float32)) for _ in range(n)]
    q = jnp.asarray(rng.standard_normal((b, 1, d), dtype=np.float32))
    w = jnp.ones(d, jnp.float32)
    gout = jnp.asarray(rng.standard_normal((b, t, d), dtype=np.float32))

    def optimized(vs, q, w, gout):
        h, _ = route_list(vs, q, w)
        return jnp.sum(h * gout), h

    def naive(vs, q, w, gout):
        h, _ = route(jnp.stack(vs), q, w)
        return jnp.sum(h * gout), h

    fn = jax.jit(jax.value_and_grad(optimized if impl == "optimized" else naive,
                                    argnums=(0, 1, 2), has_aux=True))

    def run():
        (_, h), grads = fn(vs, q, w, gout)
        return jax.block_until_ready((h, grads))[0]

    return run


def to_numpy(h) -> np.ndarray:
    return np.asarray(jax.device_get(h))
