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

from dar_core.errors import CheckpointError
from dar_core.io.checkpoint import check_optimizer_state
from dar_core.io.sharded import ShardedCheckpoint, to_checkpoint
from dar_core.spec.interpolant import interpolate, velocity_target
from dar_core.train.run import Run, TrainConfig, env_rank_world, frozen_names, micro_batch
from dar_core.train.schedule import warmup_length

from .device import autocast, resolve_device
from .model import DARTransformer
from .routing import check_fused, resolve_impl
from .sharded import ENGINE, any_non_finite, check_world, full, like, local, shard_model
from .sharded import load as load_sharded
from .sharded import save as save_sharded
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
        opt.state[p] = {  # placed like p: this rank's shard of a sharded (DTensor) weight
            "step": torch.tensor(step),
            "exp_avg": like(p, saved[f"m/{name}"]),
            "exp_avg_sq": like(p, saved[f"v/{name}"]),
        }


def flat_state(model: torch.nn.Module, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
               named: dict[str, torch.nn.Parameter], steps_done: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """The run's state under the keys of ``dar_core.io.sharded.flat_keys``, as the live
    (sharded) tensors themselves: DCP writes their shards, and loads into them in place."""
    state = {f"params/{n}": t for n, t in model.state_dict().items()}
    state.update({f"ema/{n}": t for n, t in ema.items()})
    for n, p in named.items():
        if p not in opt.state:  # before the first step (a resume loads into these)
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
        state[f"opt/m/{n}"] = opt.state[p]["exp_avg"]
        state[f"opt/v/{n}"] = opt.state[p]["exp_avg_sq"]
    state["opt/step"] = steps_done
    return state


def train(tc: TrainConfig) -> Path:
    rank, world = env_rank_world()
    check_world(tc.shard, world)
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
    if tc.routing_impl == "fused":
        check_fused(device)  # before the run folder is claimed
    run = Run(tc, backend="torch", rank=rank, world=world)
    ckpt = run.resume_checkpoint()
    sharded = tc.shard != "none"
    if isinstance(ckpt, ShardedCheckpoint) and not (sharded and ckpt.engine == ENGINE):
        ckpt = to_checkpoint(ckpt)  # read whole: an unsharded run, or another engine's

    init = run.initial_weights() if ckpt is None else None
    model = DARTransformer(run.cfg, seed=tc.seed, grad_checkpoint=tc.grad_checkpoint,
                           recompute_routing=tc.recompute_routing, routing_impl=tc.routing_impl)
    whole = ckpt if not isinstance(ckpt, ShardedCheckpoint) else None
    if whole is not None or init is not None:
        model.load_weights(whole.params if whole is not None else init["params"])
    model.to(device)
    if run.cfg.routing.is_dar:  # every rank: a kernel self-check runs here, before compiling
        impl = resolve_impl(tc.routing_impl, torch.empty(0, device=device))
        if run.is_main:
            print(f"routing: {impl} (routing_impl={tc.routing_impl!r}, {device})")
    # the EMA's start: a checkpoint's or a graft's; a fresh run's is its weights
    ema_src = whole.weights("ema") if whole is not None else init["ema"] if init else None
    for name in frozen_names(run.cfg, tc):
        model.get_parameter(name).requires_grad_(False)
    net: torch.nn.Module = _Velocity(model)
    if sharded:  # weights become DTensor shards; the EMA is sharded like them
        shard_model(net, model.blocks, tc.shard, tc.fsdp_size, world, device, tc.precision)
        ema_model = None
        ema = {n: t.detach().clone() if ema_src is None else like(t, ema_src[n])
               for n, t in model.state_dict().items()}
    else:
        ema_model = copy.deepcopy(model).requires_grad_(False).eval()
        if ema_src is not None:
            ema_model.load_weights(ema_src)
        ema = dict(ema_model.named_parameters())
    del whole, init, ema_src  # the whole arrays: only this rank's shards stay
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    ema_params = [local(ema[n]) for n in named]
    opt = make_optimizer(params, tc)
    if isinstance(ckpt, ShardedCheckpoint):  # every rank reads only its shards
        state = flat_state(model, ema, opt, named, torch.zeros((), dtype=torch.int64))
        load_sharded(state, ckpt.state_dir)
        if any_non_finite(list(state.values())):
            raise CheckpointError(f"checkpoint {str(ckpt.path)!r} holds non-finite tensors")
        for p in params:
            opt.state[p]["step"] = torch.tensor(float(state["opt/step"]))
    elif ckpt is not None:
        opt_state_from_numpy(opt, named, ckpt.opt)
    del ckpt
    sched = make_scheduler(opt, tc, run.start_step)

    if world > 1 and not sharded:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    ckpt_group = dist.new_group(backend="gloo") if sharded and tc.async_save else None

    K = tc.grad_accum
    for step in run.steps():
        batch = {k: torch.from_numpy(v).to(device, non_blocking=True)
                 for k, v in run.stream.batch(step, rank, world).items()}
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for j in range(K):  # micro-batches: the mean of their gradients is the batch's
            with _grad_sync(net, j == K - 1 or world == 1):  # reduce with the last one only
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
            ema_update(ema_params, [local(p) for p in params], decay)
        if world > 1:
            loss = loss.detach().clone()  # SUM / world: Gloo has no AVG before torch 2.6
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= world
        run.log(step, loss.item(), float(full(grad_norm)), lr=lr)

        n = run.done(step)
        if run.should_checkpoint(step) and sharded:
            state = flat_state(model, ema, opt, named, torch.tensor(n, dtype=torch.int64))
            run.save_sharded(n, ENGINE, lambda folder, s=state: save_sharded(s, folder, ckpt_group),
                             dist.barrier, any_non_finite(list(state.values())))
        elif run.should_checkpoint(step):
            run.save(n, params=model.export_weights(), ema=ema_model.export_weights(),
                     opt=opt_state_to_numpy(opt, named, n))
        if run.should_sample(step):
            sampler = ema_model or _gathered(run, ema, device)  # every rank gathers the EMA
            if sampler is not None:
                vm = model_velocity(sampler, device, tc.precision)
                run.sample_grid(step, vm.velocity, vm.asarray, vm.to_numpy)
    run.finish()
    return run.dir


def _grad_sync(net: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Whether this backward reduces gradients across ranks (off for all but the last
    micro-batch of a step): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``."""
    if hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else net.no_sync()


def _gathered(run: Run, ema: dict[str, torch.Tensor], device: torch.device
              ) -> DARTransformer | None:
    """The whole EMA model on rank 0 (for sample grids), None elsewhere; every rank takes
    part in gathering the shards."""
    weights = {n: full(t) for n, t in ema.items()}
    if not run.is_main:
        return None
    return DARTransformer(run.cfg).load_weights(weights).to(device).eval()
