"""MLX cases for the benchmarks: a full AdamW training step (the backend's compiled
``TrainStep``), a sampling step (the compiled forward), and one routing aggregation (forward +
backward, compiled) in the optimized and the naive form. Every case evaluates its result
before returning."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dar_core.backends.mlx.model import DARTransformer
from dar_core.backends.mlx.routing import route as route_list
from dar_core.backends.mlx.trainer import TrainStep, make_optimizer
from dar_core.spec.config import ModelConfig
from dar_core.spec.routing import route
from dar_core.spec.schema import trainable_names
from dar_core.train.run import TrainConfig

NAME = "mlx"


def _batch(cfg: ModelConfig, b: int, seed: int = 0) -> tuple[mx.array, ...]:
    rng = np.random.default_rng(seed)
    shape = (b, cfg.in_channels, cfg.input_size, cfg.input_size)
    x, noise = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    t = rng.random(b, dtype=np.float32)
    y = rng.integers(0, cfg.num_classes, b).astype(np.int32)
    return mx.array(x), mx.array(t), mx.array(y), mx.array(noise)


def train_step(cfg: ModelConfig, batch_size: int):
    tc = TrainConfig(lr=1e-4)
    model = DARTransformer(cfg, seed=tc.seed)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    params = model.export_weights()
    ema = {n: mx.array(params[n]) for n in trainable_names(cfg)}
    step_fn = TrainStep(model, optimizer, ema, grad_clip=tc.grad_clip, ema_decay=tc.ema_decay,
                        compile=True)
    x, t, y, noise = _batch(cfg, batch_size)

    def step() -> None:
        loss, norm = step_fn(x, t, y, noise)
        mx.eval(loss, norm, step_fn.state)

    return step


def peak_memory_mb(cfg: ModelConfig, batch_size: int) -> float:
    """Peak memory of one training step above the memory held before it (weights, optimizer
    state, EMA): MLX's allocator statistics, after a first step has compiled it."""
    step = train_step(cfg, batch_size)
    step()
    mx.reset_peak_memory()
    held = mx.get_active_memory()
    step()
    return (mx.get_peak_memory() - held) / 2**20


def gpu_available() -> bool:
    """MLX runs on the GPU only on Apple silicon; elsewhere on its reference CPU kernels."""
    return mx.metal.is_available()


def sample_step(cfg: ModelConfig, batch_size: int):
    model = DARTransformer(cfg)
    forward = mx.compile(model.forward, inputs=model.state)
    x, t, y, _ = _batch(cfg, batch_size)

    def step() -> None:
        mx.eval(forward(x, t, y))

    return step


def routing_case(n: int, b: int, t: int, d: int, impl: str):
    """One aggregator over ``n`` sources with a per-sample query, forward + backward."""
    rng = np.random.default_rng(0)
    vs = [mx.array(rng.standard_normal((b, t, d), dtype=np.float32)) for _ in range(n)]
    q = mx.array(rng.standard_normal((b, 1, d), dtype=np.float32))
    w = mx.ones((d,), dtype=mx.float32)
    gout = mx.array(rng.standard_normal((b, t, d), dtype=np.float32))

    def optimized(vs, q, w, gout):
        h, _ = route_list(vs, q, w)
        return mx.sum(h * gout), h

    def naive(vs, q, w, gout):
        h, _ = route(mx.stack(vs), q, w)
        return mx.sum(h * gout), h

    fn = mx.compile(mx.value_and_grad(optimized if impl == "optimized" else naive,
                                      argnums=(0, 1, 2)))

    def run():
        (_, h), grads = fn(vs, q, w, gout)
        mx.eval(h, grads)
        return h

    return run


def to_numpy(h) -> np.ndarray:
    return np.array(h)
