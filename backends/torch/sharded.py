"""Sharded training for the torch trainer: FSDP2 (``fully_shard``) and sharded checkpoints
through ``torch.distributed.checkpoint`` (DCP), each rank writing and reading only its shards.

``--shard params``: every DiT block and the root are FSDP2 units that free their gathered
weights after the forward (ZeRO-3); ``--shard opt``: the gathered weights are kept from the
forward to the backward (one all-gather per step, ZeRO-2's memory for the weights). In both
the weights at rest, their gradients, AdamW's moments and the EMA are sharded along dim 0
over the shard group; ``--fsdp-size`` smaller than the world replicates across groups
(hybrid sharding, a 2-D device mesh). The DAR history is per-rank activations, so the routers
are sharded like any other weight. bf16 composes as FSDP2's mixed-precision policy (bf16
all-gathers and compute, float32 gradient reduction) under the trainer's autocast.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dar_core.errors import ConfigError
from dar_core.io.sharded import mesh_shape

try:  # FSDP2 and public DTensors: torch >= 2.6; below it the trainer is data parallel only
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - depends on the installed torch
    fully_shard = DTensor = None

ENGINE = "torch-dcp"


def check_world(mode: str, world: int) -> None:
    """Sharding needs several processes: a ``ConfigError`` before the run folder is touched."""
    if mode != "none" and fully_shard is None:
        raise ConfigError(f"shard={mode!r} needs FSDP2 (torch >= 2.6), this is torch "
                          f"{torch.__version__}")
    if mode != "none" and world < 2:
        raise ConfigError(f"shard={mode!r} needs several processes (torchrun "
                          "--nproc-per-node N dar train ...); with one, use shard='none'")


def shard_model(root: torch.nn.Module, blocks: torch.nn.ModuleList, mode: str, fsdp_size: int,
                world: int, device: torch.device, precision: str) -> None:
    """Make each block and then ``root`` an FSDP2 unit over the run's device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    data, fsdp = mesh_shape(world, fsdp_size)
    mesh = init_device_mesh(device.type, (data, fsdp), mesh_dim_names=("replicate", "shard")) \
        if data > 1 else init_device_mesh(device.type, (fsdp,), mesh_dim_names=("shard",))
    # t and the labels stay as they are: the timestep embedding takes float32 t
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                              cast_forward_inputs=False) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=mode == "params")
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=mode == "params")


def like(ref: torch.Tensor, full: np.ndarray) -> torch.Tensor:
    """``full`` placed like ``ref``: this rank's shard of it for a DTensor (sliced locally:
    every rank holds the same full array), else the whole array on ``ref``'s device."""
    t = torch.from_numpy(np.ascontiguousarray(full)).to(ref.dtype)
    if _is_dtensor(ref):
        return distribute_tensor(t.to(ref.device_mesh.device_type), ref.device_mesh,
                                 ref.placements, src_data_rank=None)
    return t.to(ref.device)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (its storage, for in-place updates)."""
    return t.to_local() if _is_dtensor(t) else t


def full(t: torch.Tensor) -> np.ndarray:
    """The whole of ``t`` as float32 NumPy (a collective for a DTensor: every rank calls)."""
    t = t.full_tensor() if _is_dtensor(t) else t
    return t.detach().float().cpu().numpy()


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def save(state: dict[str, torch.Tensor], folder: Path, group: Any = None) -> Any:
    """Every rank writes its shards of ``state`` (the flat keys of ``dar_core.io.sharded``).
    With ``group`` (a gloo process group of its own, so the writer thread's collectives never
    interleave with training's), ``dcp.async_save``: the state is copied to host memory
    before it returns, and the returned ``wait()`` blocks until the files are written."""
    if group is None:
        dcp.save(state, checkpoint_id=str(folder))
        return None
    future = dcp.async_save(state, checkpoint_id=str(folder), process_group=group)
    return lambda: future.result()


def load(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Every rank reads its shards of ``folder`` into ``state``, in place (DCP reshards, so
    the world size that wrote it does not matter)."""
    dcp.load(state, checkpoint_id=str(folder))


def any_non_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether any rank's part of any float tensor holds NaN or inf (same answer on every
    rank)."""
    bad = any(t.is_floating_point() and not bool(torch.isfinite(local(t)).all())
              for t in tensors)
    flag = torch.tensor(float(bad), device=local(tensors[0]).device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def read_full(state_dir: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Every key of a DCP checkpoint as a full array, read in this one process."""
    state = {k: torch.zeros(s, dtype=torch.int64 if k == "opt/step" else torch.float32)
             for k, s in shapes.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(state_dir), no_dist=True)
    return {k: v.numpy() for k, v in state.items()}
