"""PyTorch cases for the benchmarks: a full AdamW training step, a sampling step, and one
routing aggregation (forward + backward) in the optimized and the naive form."""

from __future__ import annotations

import copy

import numpy as np
import torch

from benchmarks.common import reset_peak, return_freed_memory, status_mb
from dar_core.backends.torch import DARTransformer
from dar_core.backends.torch.routing import History
from dar_core.backends.torch.trainer import ema_update, loss_fn, make_optimizer
from dar_core.spec.config import ModelConfig
from dar_core.spec.routing import route
from dar_core.train.run import TrainConfig

NAME = "torch"


def _batch(cfg: ModelConfig, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.rand(b, generator=g), torch.randint(0, cfg.num_classes, (b,), generator=g)


def train_step(cfg: ModelConfig, batch_size: int, routing_impl: str = "history",
               device: str = "cpu"):
    """The backend trainer's step: AdamW, gradient clipping and the EMA update, as the JAX
    and MLX cases do."""
    tc = TrainConfig(lr=1e-4)
    model = DARTransformer(cfg, routing_impl=routing_impl).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    ema_params = [dict(ema.named_parameters())[n] for n in named]
    opt = make_optimizer(params, tc)
    x, t, y = (a.to(device) for a in _batch(cfg, batch_size))
    batch = {"x": x, "t": t, "y": y, "noise": torch.randn_like(x)}

    def step() -> None:
        loss = loss_fn(model.velocity, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        with torch.no_grad():
            ema_update(ema_params, params, tc.ema_decay)

    return step


def peak_memory_mb(cfg: ModelConfig, batch_size: int) -> float:
    """Peak memory of one training step above the memory held before it (weights, gradients,
    optimizer state), after two warm-up steps. CUDA: the caching allocator's statistics. CPU
    (Linux): glibc is told to serve and return every block over 64 KiB by mmap, so freed
    activations leave the resident set; the kernel's peak-RSS mark is reset before the step
    and read after it. Run it in a fresh process (``mem_probe``): the malloc settings stay."""
    if torch.cuda.is_available():
        step = train_step(cfg, batch_size, device="cuda")
        step(), step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - held) / 2**20
    return_freed_memory()
    step = train_step(cfg, batch_size)
    step(), step()
    return_freed_memory()
    held = reset_peak()
    step()
    return status_mb("VmHWM") - held


def sample_step(cfg: ModelConfig, batch_size: int):
    model = DARTransformer(cfg).eval()
    x, t, y = _batch(cfg, batch_size)

    def step() -> None:
        with torch.inference_mode():
            model.velocity(x, t, y)

    return step


def routing_case(n: int, b: int, t: int, d: int, impl: str):
    """One aggregator over ``n`` sources with a per-sample query, forward + backward."""
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(b, t, d, generator=g, requires_grad=True) for _ in range(n)]
    q = torch.randn(b, 1, d, generator=g, requires_grad=True)
    w = torch.ones(d, requires_grad=True)
    gout = torch.randn(b, t, d, generator=g)

    def optimized():
        hist = History(vs[0], [(slice(0, n),)], 1e-6)
        for v in vs[1:]:
            hist.write(v)
        h = hist.read(0, q, w)
        h.backward(gout)
        return h

    def naive():
        h, _ = route(torch.stack(vs), q, w)
        h.backward(gout)
        return h

    return optimized if impl == "optimized" else naive


def to_numpy(h) -> np.ndarray:
    return h.detach().numpy()
