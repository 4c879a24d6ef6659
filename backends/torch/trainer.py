"""The PyTorch training loop: SiT velocity loss, AdamW, EMA, clipping, bf16, DDP, resume.

Launch with ``dar train --backend torch ...`` for one process, or under ``torchrun`` for data
parallel (``nccl`` on CUDA, ``gloo`` on CPU). All randomness comes from the core's
``TrainStream`` (a function of seed and step), so a resumed run is bit-identical and a DDP run
sees the same global batch as a single process.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dar_core.io.checkpoint import check_optimizer_state
from dar_core.spec.interpolant import interpolate, velocity_target
from dar_core.train.run import Run, TrainConfig, env_rank_world, frozen_names, micro_batch
from dar_core.train.schedule import warmup_length

from .device import autocast, resolve_device
from .model import DARTransformer
from .velocity import model_velocity


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Velocity MSE at ``x_t = t x + (1 - t) noise``."""
    x, noise, t = batch["x"], batch["noise"], batch["t"]
    x_t = interpolate(x, noise, t)  # [B, C, H, W]
    pred = model(x_t, t, batch["y"])  # [B, C, H, W]
    return (pred.float() - velocity_target(x, noise)).square().mean()


def make_optimizer(params: list[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the run's hyper-parameters."""
    return torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps,
                             weight_decay=tc.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, tc: TrainConfig,
                   start_step: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's schedule (``dar_core.train.schedule``) from torch's own schedulers: LinearLR
    for the warm-up, CosineAnnealingLR after it (SequentialLR joins them). After ``k`` calls
    of ``step()`` the lr is that of step ``k``; a resumed run replays ``start_step`` calls so
    its lr is the uninterrupted run's, float for float."""
    from torch.optim import lr_scheduler as S

    W = warmup_length(tc.warmup_steps)
    warmup = S.LinearLR(opt, start_factor=1.0 / W, end_factor=1.0, total_iters=W - 1) \
        if W else None
    if tc.lr_schedule == "constant":
        sched = warmup or S.ConstantLR(opt, factor=1.0, total_iters=0)
    else:
        cosine = S.CosineAnnealingLR(opt, T_max=tc.steps - W, eta_min=tc.min_lr)
        sched = S.SequentialLR(opt, [warmup, cosine], milestones=[W]) if warmup else cosine
    with warnings.catch_warnings():  # replaying: no optimizer step comes between these
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
        for _ in range(start_step):
            sched.step()
    return sched


def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * param``, in place, for every pair."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1.0 - decay)


class _Velocity(torch.nn.Module):
    """Routes DDP's ``forward`` to the unchecked ``velocity`` path (inputs come from the
    core's stream, already valid)."""

    def __init__(self, model: DARTransformer):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model.velocity(x, t, y)


def opt_state_to_numpy(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter],
                       step: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"step": np.array(step, dtype=np.int64)}
    for name, p in named.items():
        st = opt.state.get(p)
        if st:
            out[f"m/{name}"] = st["exp_avg"].detach().cpu().numpy()
            out[f"v/{name}"] = st["exp_avg_sq"].detach().cpu().numpy()
    return out


def opt_state_from_numpy(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter],
                         saved: dict[str, np.ndarray]) -> None:
    check_optimizer_state(saved, list(named))
    step = float(saved["step"])
    for name, p in named.items():
        opt.state[p] = {
            "step": torch.tensor(step),
            "exp_avg": torch.from_numpy(saved[f"m/{name}"]).to(p.device, p.dtype),
            "exp_avg_sq": torch.from_numpy(saved[f"v/{name}"]).to(p.device, p.dtype),
        }


def train(tc: TrainConfig) -> Path:
    rank, world = env_rank_world()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(tc.device, local_rank=local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        return _train(tc, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(tc: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    run = Run(tc, backend="torch", rank=rank, world=world)
    ckpt = run.resume_checkpoint()

    init = run.initial_weights() if ckpt is None else None
    model = DARTransformer(run.cfg, seed=tc.seed, grad_checkpoint=tc.grad_checkpoint)
    if ckpt is not None or init is not None:
        model.load_weights(ckpt.params if ckpt is not None else init["params"])
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if ckpt is not None or init is not None:
        ema.load_weights(ckpt.weights("ema") if ckpt is not None else init["ema"])
    for name in frozen_names(run.cfg, tc):
        model.get_parameter(name).requires_grad_(False)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    ema_params = [dict(ema.named_parameters())[n] for n in named]
    opt = make_optimizer(params, tc)
    if ckpt is not None:
        opt_state_from_numpy(opt, named, ckpt.opt)
    sched = make_scheduler(opt, tc, run.start_step)

    net: torch.nn.Module = _Velocity(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")

    K = tc.grad_accum
    for step in run.steps():
        batch = {k: torch.from_numpy(v).to(device, non_blocking=True)
                 for k, v in run.stream.batch(step, rank, world).items()}
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for j in range(K):  # micro-batches: the mean of their gradients is the batch's
            sync = j == K - 1 or world == 1  # DDP all-reduces only with the last one
            with (contextlib.nullcontext() if sync else net.no_sync()):
                with autocast(device, tc.precision):
                    part = loss_fn(net, micro_batch(batch, j, K) if K > 1 else batch) / K
                part.backward()
            loss += part.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = opt.param_groups[0]["lr"]  # the lr of this update, from the scheduler
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = tc.ema_decay_at(step)
            ema_update(ema_params, params, decay)
        if world > 1:
            loss = loss.detach().clone()  # SUM / world: Gloo has no AVG before torch 2.6
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= world
        run.log(step, loss.item(), grad_norm.item(), lr=lr)

        n = run.done(step)
        if run.should_checkpoint(step):
            run.save(n, params=model.export_weights(), ema=ema.export_weights(),
                     opt=opt_state_to_numpy(opt, named, n))
        if run.should_sample(step):
            vm = model_velocity(ema, device, tc.precision)
            run.sample_grid(step, vm.velocity, vm.asarray, vm.to_numpy)
    run.finish()
    return run.dir
