"""PyTorch cases for the benchmarks: a full AdamW training step, a sampling step, and one
routing aggregation (forward + backward) in the optimized and the naive form."""

from __future__ import annotations

import numpy as np
import torch

from dar_core.backends.torch import DARTransformer
from dar_core.backends.torch.routing import History
from dar_core.config import ModelConfig
from dar_core.routing import route

NAME = "torch"


def _batch(cfg: ModelConfig, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.rand(b, generator=g), torch.randint(0, cfg.num_classes, (b,), generator=g)


def train_step(cfg: ModelConfig, batch_size: int, routing_impl: str = "history"):
    model = DARTransformer(cfg, routing_impl=routing_impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, y = _batch(cfg, batch_size)
    noise = torch.randn_like(x)

    def step() -> None:
        xt = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
        loss = (model.velocity(xt, t, y) - (x - noise)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


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
        hist = History(vs[0], n - 1, [(slice(0, n),)], 1e-6)
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
