"""PyTorch cases for the benchmarks: a full AdamW training step, a sampling step, and one
routing aggregation (forward + backward) in the optimized and the naive form.

Every case takes the device it runs on (``"cpu"`` unless given); on CUDA its closure ends with
``torch.cuda.synchronize()``, so a timer around the call measures the finished work.
"""

from __future__ import annotations

import copy
import gc
import importlib.metadata
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import machine, reset_peak, return_freed_memory, status_mb
from dar_core.backends.torch import DARTransformer
from dar_core.backends.torch.device import autocast, resolve_device
from dar_core.backends.torch.routing import FusedHistory, History
from dar_core.backends.torch.trainer import ema_update, loss_fn, make_optimizer
from dar_core.spec.config import ModelConfig
from dar_core.spec.routing import route
from dar_core.train.run import TrainConfig

NAME = "torch"
RECOMPILE_LIMIT = 64  # one process compiles the same velocity code once per variant


def _batch(cfg: ModelConfig, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.rand(b, generator=g), torch.randint(0, cfg.num_classes, (b,), generator=g)


def check_device(device: str) -> torch.device:
    """The torch device named ``device`` (``ConfigError`` saying why where it is not here)."""
    return resolve_device(device)


def describe(device: str) -> dict:
    """What a run on ``device`` measured with: the device's name (the GPU's, or the CPU
    model) and the torch, CUDA and triton versions."""
    dev = torch.device(device)
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else machine().get("cpu_model", "cpu"))
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"device": name, "cuda_device": dev.type == "cuda", "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton}


def release(device: str) -> None:
    """Free what the cases just dropped (and, on CUDA, the allocator's cached blocks), so the
    next case starts from the same memory."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _synced(fn: Callable[[], object], dev: torch.device) -> Callable[[], object]:
    """``fn``, followed on CUDA by a device synchronisation (kernels launch asynchronously)."""
    if dev.type != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize(dev)
        return out

    return synced


def _cuda_settings(dev: torch.device) -> None:
    """The trainer's CUDA settings: its device current, TF32 matrix products allowed."""
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, as the trainer compiles its model, with dynamo's recompile
    limit raised: every variant a process measures recompiles the same ``velocity`` code,
    and past the default limit (8) a frame runs eagerly."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return torch.compile(fn)


def train_step(cfg: ModelConfig, batch_size: int, routing_impl: str = "history",
               device: str = "cpu", precision: str = "fp32", compile: bool = False):
    """The backend trainer's step: AdamW, gradient clipping and the EMA update, as the JAX
    and MLX cases do; the loss under ``precision``'s autocast and, with ``compile``, the
    velocity forward through ``torch.compile``, as the trainer runs them."""
    dev = torch.device(device)
    _cuda_settings(dev)
    tc = TrainConfig(lr=1e-4)
    model = DARTransformer(cfg, routing_impl=routing_impl).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    ema_params = [dict(ema.named_parameters())[n] for n in named]
    opt = make_optimizer(params, tc)
    x, t, y = (a.to(dev) for a in _batch(cfg, batch_size))
    batch = {"x": x, "t": t, "y": y, "noise": torch.randn_like(x)}
    forward = _compiled(model.velocity) if compile else model.velocity

    def step() -> None:
        with autocast(dev, precision):
            loss = loss_fn(forward, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        with torch.no_grad():
            ema_update(ema_params, params, tc.ema_decay)

    return _synced(step, dev)


def peak_memory_mb(cfg: ModelConfig, batch_size: int, device: str = "cpu",
                   precision: str = "fp32", compile: bool = False,
                   routing_impl: str = "history") -> float:
    """Peak memory of one training step (``train_step`` with these options) above the memory
    held before it (weights, gradients, optimizer state), after two warm-up steps. CUDA: the
    caching allocator's statistics. CPU (Linux): glibc is told to serve and return every
    block over 64 KiB by mmap, so freed activations leave the resident set; the kernel's
    peak-RSS mark is reset before the step and read after it. Run it in a fresh process
    (``mem_probe``): the malloc settings stay."""
    options = dict(routing_impl=routing_impl, device=device, precision=precision,
                   compile=compile)
    if torch.device(device).type == "cuda":
        step = train_step(cfg, batch_size, **options)
        step(), step()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - held) / 2**20
    return_freed_memory()
    step = train_step(cfg, batch_size, **options)
    step(), step()
    return_freed_memory()
    held = reset_peak()
    step()
    return status_mb("VmHWM") - held


def sample_step(cfg: ModelConfig, batch_size: int, routing_impl: str = "history",
                device: str = "cpu", precision: str = "fp32"):
    """One velocity evaluation as the sampler runs it: inference mode, ``precision``'s
    autocast, no compilation."""
    dev = torch.device(device)
    _cuda_settings(dev)
    model = DARTransformer(cfg, routing_impl=routing_impl).to(dev).eval()
    x, t, y = (a.to(dev) for a in _batch(cfg, batch_size))

    def step() -> None:
        with torch.inference_mode(), autocast(dev, precision):
            model.velocity(x, t, y)

    return _synced(step, dev)


ROUTING_CASES = ("optimized", "history", "fused", "naive", "reference")


def routing_case(n: int, b: int, t: int, d: int, impl: str, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """One aggregator over ``n`` sources ``[b, t, d]`` of ``dtype`` with a per-sample query,
    forward + backward. ``impl``: ``"history"`` (or ``"optimized"``: the model's default,
    ``History.read``), ``"fused"`` (``FusedHistory.read``: the Triton kernel over the
    history's sources and cached inverse RMS), ``"naive"`` (``dar_core.spec.routing.route``
    on the stacked sources) or ``"reference"`` (the naive route in float32 of the same
    values). ``History`` holds its sources in at least float32, ``FusedHistory`` in their own
    dtype, as in the model."""
    if impl not in ROUTING_CASES:
        raise ValueError(f"impl must be one of {ROUTING_CASES}, got {impl!r}")
    dev = torch.device(device)
    _cuda_settings(dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    vs = [randn(b, t, d).to(dtype).requires_grad_() for _ in range(n)]
    q = randn(b, 1, d).requires_grad_()
    w = torch.ones(d, device=dev, requires_grad=True)
    gout = randn(b, t, d)
    history_cls = FusedHistory if impl == "fused" else History

    def history():
        hist = history_cls(vs[0], [(slice(0, n),)], 1e-6)
        for v in vs[1:]:
            hist.write(v)
        h = hist.read(0, q, w)
        h.backward(gout)
        return h

    def naive():
        stacked = torch.stack(vs)
        h, _ = route(stacked.float() if impl == "reference" else stacked, q, w)
        h.backward(gout)
        return h

    return _synced(naive if impl in ("naive", "reference") else history, dev)


def to_numpy(h) -> np.ndarray:
    return h.detach().float().cpu().numpy()
