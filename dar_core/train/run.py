"""What every backend's training loop shares: the config, the batch stream, the run folder.

A backend's loop stays linear and short (nanoGPT style)::

    run = Run(tc, backend="torch", rank=rank, world=world)
    ckpt = run.resume_checkpoint()             # None for a fresh run
    ...build model, optimizer, EMA (from ckpt if given)...
    for step in run.steps():                   # progress bar on rank 0
        batch = run.stream.batch(step, rank, world)
        loss, grad_norm = train_step(batch)
        run.log(step, loss, grad_norm)         # JSONL; stops on NaN/inf naming the step
        if run.should_checkpoint(step): run.save(step, params=..., ema=..., opt=...)
        if run.should_sample(step): run.sample_grid(step, velocity, asarray, to_numpy)
    run.finish()

Every random draw of a training step (images, labels, times, noise, label dropout) is a pure
function of ``(seed, step)``, drawn in NumPy for the whole global batch and sliced per rank.
So the data position is the step, a resumed run is bit-identical to an uninterrupted one, a
data-parallel run sees the same global batch as a single process, and all backends train on
identical batches.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.backend import check_precision
from dar_core.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    RunFolderError,
    TrainingInterrupted,
)
from dar_core.io.checkpoint import (
    Checkpoint,
    atomic_write_bytes,
    load_checkpoint,
    non_finite,
    save_checkpoint,
    writable_folder,
)
from dar_core.io.data.procedural import rank_rows
from dar_core.io.sharded import (
    ShardedCheckpoint,
    check_shard,
    finalize,
    is_sharded,
    read_manifest,
    temp_folder,
)
from dar_core.sampling.samplers import SAMPLERS, sample
from dar_core.spec.config import ROUTING_IMPLS, ModelConfig, RoutingConfig, model_config
from dar_core.spec.interpolant import TIME_SAMPLINGS, sample_time
from dar_core.spec.schema import param_shapes, router_prefixes, trainable_names
from dar_core.train.schedule import check_schedule, lr_at
from dar_core.train.writers import FOLDER as TB_FOLDER
from dar_core.train.writers import WANDB_ID


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; the same defaults in every backend and in ``dar train``."""

    # model
    model: str = "tiny"
    routing: str = "dar"
    query: str = "static_t"
    chunk_size: int = 4
    final_aggregator: bool = True
    time_gain: bool = False  # static_t: a learned gain on e(t) in each router (for grafts)
    init_from: str = ""  # a dar checkpoint of the same architecture, routing added or changed
    # data
    data: str = "procedural"  # or a folder of shards (dar prepare's output, or npz/safetensors)
    image_size: int = 16
    num_classes: int = 10
    holdout: int = 0  # examples of folder data kept out of training (none by default)
    flip: bool = False  # horizontal flips of folder data (prepared latents: their x_flip)
    # optimization (SiT: AdamW, lr 1e-4, no weight decay, EMA 0.9999)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine" (dar_core.train.schedule)
    warmup_steps: int = 0  # linear warm-up from lr / W to lr over the first W steps
    min_lr: float = 0.0  # where the cosine schedule ends
    grad_accum: int = 1  # micro-batches per step: the same global batch in K pieces
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # cap the decay at (1 + step) / (10 + step); off: SiT's fixed decay
    class_dropout: float = 0.1
    time_sampling: str = "uniform"
    seed: int = 0
    # run
    out: str = "runs/dar"
    resume: str = ""
    log_every: int = 10
    ckpt_every: int = 500
    sample_every: int = 500
    keep_checkpoints: int = 3
    sample_sampler: str = "heun"
    sample_steps: int = 32
    sample_cfg: float = 1.0
    per_class: int = 8
    # compute
    precision: str = "fp32"
    compile: bool = False
    grad_checkpoint: bool = False
    # torch: rebuild each routed input in the backward instead of keeping it (less memory,
    # ~8-10% CPU step time at SiT-S/2); JAX's and MLX's compilers choose what they keep
    recompute_routing: bool = True
    routing_impl: str = "auto"  # ROUTING_IMPLS: "auto" takes the fused kernel on CUDA / TPU
    shard: str = "none"  # "params" (FSDP / ZeRO-3) or "opt" (optimizer state, gradients, EMA)
    fsdp_size: int = 0  # devices each shard group spans (0: all; fewer: hybrid sharding)
    async_save: bool = True  # sharded checkpoints written in the background (the engine's)
    freeze_routing: bool = False  # routers stay at their init (zero query: uniform routing)
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True  # event files in <out>/tensorboard
    wandb: str = ""  # a Weights & Biases project to log to (empty: off)
    overwrite: bool = False  # a fresh run may replace the run already in ``out``

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "log_every", "ckpt_every", "sample_every",
                  "keep_checkpoints", "sample_steps", "per_class", "image_size", "num_classes",
                  "grad_accum"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        for f, lo, hi in (("lr", 0.0, 1.0), ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0),
                          ("ema_decay", 0.0, 1.0)):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and lo <= v < hi):
                raise ConfigError(f"{f} must be a number in [{lo}, {hi}), got {v!r}")
        for f in ("weight_decay", "grad_clip", "class_dropout"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{f} must be a finite number >= 0, got {v!r}")
        for f in ("adam_eps",):  # 0 divides by sqrt(v) = 0 for a parameter with no gradient
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ConfigError(f"{f} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.sample_cfg, (int, float)) and math.isfinite(self.sample_cfg)
                and self.sample_cfg >= 0):
            raise ConfigError(f"sample_cfg must be a finite number >= 0, got {self.sample_cfg!r}")
        if self.class_dropout >= 1:
            raise ConfigError(f"class_dropout must be < 1, got {self.class_dropout!r}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(
                f"time_sampling must be one of {list(TIME_SAMPLINGS)}, got {self.time_sampling!r}"
            )
        check_precision(self.precision)
        if self.sample_sampler not in SAMPLERS:
            raise ConfigError(f"sample_sampler must be one of {list(SAMPLERS)}, "
                              f"got {self.sample_sampler!r}")
        check_shard(self.shard, self.fsdp_size)
        if self.routing_impl not in ROUTING_IMPLS:
            raise ConfigError(f"routing_impl must be one of {list(ROUTING_IMPLS)}, "
                              f"got {self.routing_impl!r}")
        check_schedule(self.lr, self.lr_schedule, self.warmup_steps, self.min_lr, self.steps)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by "
                              f"grad_accum={self.grad_accum}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) \
                or self.holdout < 0:
            raise ConfigError(f"holdout must be an integer >= 0, got {self.holdout!r}")
        for f in ("ema_warmup", "overwrite", "tensorboard", "flip", "freeze_routing",
                  "async_save", "recompute_routing"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"{f} must be a bool, got {getattr(self, f)!r}")
        self.model_config()  # validates model and routing fields

    def lr_at(self, step: int) -> float:
        """Learning rate of the update made by step ``step`` (0-based): the schedule of
        ``dar_core.train.schedule``, which every backend's framework scheduler follows."""
        return lr_at(step, lr=self.lr, schedule=self.lr_schedule,
                     warmup_steps=self.warmup_steps, min_lr=self.min_lr, steps=self.steps)

    def ema_decay_at(self, step: int) -> float:
        """EMA decay of the update made by step ``step`` (0-based).

        ``ema_warmup`` caps it at ``(1 + step) / (10 + step)``, so the average forgets the
        initial weights within a tenth of the run so far: a short run's EMA is then usable
        at any step, where a fixed 0.9999 would still hold 82% of the initial weights after
        2000 steps. It is on by default; without it (``--no-ema-warmup``, SiT's setting) the
        decay is ``ema_decay`` at every step.
        """
        if not self.ema_warmup:
            return float(self.ema_decay)
        return float(min(self.ema_decay, (1.0 + step) / (10.0 + step)))

    def model_config(self) -> ModelConfig:
        routing = RoutingConfig(mode=self.routing, query=self.query, chunk_size=self.chunk_size,
                                final_aggregator=self.final_aggregator, time_gain=self.time_gain)
        channels = 3 if self.data == "procedural" else None
        overrides: dict[str, Any] = dict(input_size=self.image_size, num_classes=self.num_classes)
        if channels is not None:
            overrides["in_channels"] = channels
        return model_config(self.model, routing=routing, **overrides)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train config field(s) {unknown}")
        return cls(**d)


def make_train_dataset(tc: TrainConfig) -> Any:
    from dar_core.io.data import make_dataset

    return make_dataset(tc.data, image_size=tc.image_size, num_classes=tc.num_classes,
                        seed=tc.seed, holdout=tc.holdout, flip=tc.flip)


class TrainStream:
    """Global training batches as a pure function of ``(seed, step)``, sliced per rank.

    With gradient accumulation (``grad_accum = K``) a rank's rows are split into ``K``
    micro-batches, micro-batch ``j`` holding rows ``j, j + K, j + 2K, ...`` (``micro_batch``):
    the step's gradient is the mean of the micro-batch gradients, the gradient of the whole
    batch, whatever ``K``."""

    def __init__(self, dataset: Any, tc: TrainConfig, null_class: int):
        self.dataset = dataset
        self.tc = tc
        self.null_class = null_class

    def batch(self, step: int, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
        """``x`` [b,C,H,W] float32, ``y`` [b] int64 (null class where dropped), ``t`` [b] float32,
        ``noise`` like ``x``; ``b = batch_size / world`` rows ``rank*b ... (rank+1)*b``."""
        B = self.tc.batch_size
        if B % world:
            raise ConfigError(f"batch_size={B} is not divisible by the world size {world}")
        if (B // world) % self.tc.grad_accum:
            raise ConfigError(f"the per-process batch {B // world} (batch_size={B} over {world} "
                              f"processes) is not divisible by grad_accum={self.tc.grad_accum}")
        x, y = self.dataset.train_batch(step, B, rank, world)  # only this rank's rows
        # t, noise and label drops are drawn for the whole global batch, then sliced, so a
        # rank's rows do not depend on the world size
        rng = np.random.default_rng([self.tc.seed, 2, step])
        t = sample_time(rng, B, self.tc.time_sampling)
        noise = rng.standard_normal((B, *x.shape[1:]), dtype=np.float32)
        drop = rng.random(B) < self.tc.class_dropout
        sl = rank_rows(B, rank, world)
        y = np.where(drop[sl], self.null_class, y).astype(np.int64)
        return {"x": np.ascontiguousarray(x, dtype=np.float32), "y": y, "t": t[sl],
                "noise": noise[sl]}


def frozen_names(cfg: ModelConfig, tc: TrainConfig) -> list[str]:
    """Parameters a run keeps at their initial values besides the fixed buffers: with
    ``freeze_routing`` every router parameter (a zero query routes uniformly: the control arm
    of "is it the learned routing?")."""
    if not tc.freeze_routing:
        return []
    prefixes = tuple(p + "." for p in router_prefixes(cfg))
    return [n for n in param_shapes(cfg) if n.startswith(prefixes)]


def trained_names(cfg: ModelConfig, tc: TrainConfig) -> list[str]:
    """The parameters the optimizer updates (and the EMA averages), in schema order."""
    frozen = set(frozen_names(cfg, tc))
    return [n for n in trainable_names(cfg) if n not in frozen]


def micro_batch(batch: dict[str, Any], j: int, k: int) -> dict[str, Any]:
    """Micro-batch ``j`` of ``k`` of a rank's batch: rows ``j::k`` of every array (NumPy,
    torch and MLX arrays alike)."""
    return {name: v[j::k] for name, v in batch.items()}


def grid_inputs(cfg: ModelConfig, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed noise and labels (class-major) for the sample grids of a run."""
    y = np.repeat(np.arange(cfg.num_classes, dtype=np.int64), per_class)
    rng = np.random.default_rng([seed, 3])
    noise = rng.standard_normal((len(y), cfg.in_channels, cfg.input_size, cfg.input_size),
                                dtype=np.float32)
    return noise, y


_CKPT = re.compile(r"^ckpt-(\d{7})\.(safetensors|sharded)$")


class Run:
    """A run folder: ``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``samples/``."""

    def __init__(self, tc: TrainConfig, backend: str, rank: int = 0, world: int = 1):
        self.tc, self.backend, self.rank, self.world = tc, backend, rank, world
        self.cfg = tc.model_config()
        self.dir = Path(tc.out)
        self.ckpt_dir = self.dir / "checkpoints"
        self.sample_dir = self.dir / "samples"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.dataset = make_train_dataset(tc)
        if self.dataset.channels != self.cfg.in_channels:
            self.cfg = self.cfg.replace(in_channels=self.dataset.channels)
        self.stream = TrainStream(self.dataset, tc, self.cfg.null_class)
        self.start_step = 0
        self._t_last: float | None = None
        self._last_step = -1
        self._bar: Any = None
        self._lock: RunLock | None = None
        self._signal: str | None = None  # the name of a stop signal received
        self._stop_step: int | None = None  # the step whose end saves and stops
        self._writers: list[Any] = []  # TensorBoard, W&B: opened once the start is known
        self._decoder: Any = None  # the data's VAE, loaded at the first latent sample grid
        self._pending: tuple | None = None  # a sharded save still being written (async)
        if self.is_main:
            self._claim()

    def _claim(self) -> None:
        """Take the run folder: refuse a folder that is a file or not writable, that a live
        trainer holds, or that holds another run when this one is fresh (neither ``resume``
        nor ``overwrite``); then remove this folder's orphaned checkpoint temp files."""
        writable_folder(self.dir, "run folder", RunFolderError)
        self._lock = RunLock(self.dir)
        previous = self.checkpoints()
        held = previous or (self.dir / "config.json").exists() or self.metrics_path.exists()
        if held and not self.tc.resume:
            if not self.tc.overwrite:
                self._lock.release()
                last = f", checkpoints up to step {_step(previous[-1])}" if previous else ""
                raise RunFolderError(
                    f"run folder {str(self.dir)!r} already holds a run{last}: pass "
                    "--resume auto to continue it, --overwrite to replace it, or another --out")
            for old in previous:
                _remove(old)
            for name in ("metrics.jsonl", "config.json", "training.png"):
                (self.dir / name).unlink(missing_ok=True)
            if (self.dir / TB_FOLDER).is_dir():
                shutil.rmtree(self.dir / TB_FOLDER)
            (self.dir / WANDB_ID).unlink(missing_ok=True)  # a new run, a new W&B run
            if self.sample_dir.is_dir():
                for png in self.sample_dir.glob("step-*.png"):
                    png.unlink()
        if self.ckpt_dir.is_dir():  # writes this folder's trainer never finished (we hold the lock)
            for tmp in self.ckpt_dir.glob(".ckpt-*.safetensors.*.tmp"):
                tmp.unlink()
            for tmp in self.ckpt_dir.glob(".ckpt-*.sharded.tmp"):
                _remove(tmp)

    def _write_config(self) -> None:
        """``config.json``, written once every check of the run has passed."""
        atomic_write_bytes(self.dir / "config.json", json.dumps(
            {"train": self.tc.to_dict(), "model": self.cfg.to_dict(), "backend": self.backend},
            indent=2).encode())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # Checkpoints ------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """This folder's checkpoints, oldest step first."""
        if not self.ckpt_dir.is_dir():
            return []
        return sorted((p for p in self.ckpt_dir.iterdir() if _CKPT.match(p.name)), key=_step)

    def resume_checkpoint(self) -> Checkpoint | None:
        """The checkpoint named by ``tc.resume`` (``"auto"``: the newest in the run folder that
        reads, verifies and is finite, saying which newer ones it skipped and why), checked
        against this run's model; then ``config.json`` is written (rank 0)."""
        ckpt = self._find_resume()
        if ckpt is not None:
            self.start_step = int(ckpt.meta["step"])
            if self.is_main:
                self._truncate_metrics(self.start_step)
                if self.start_step >= self.tc.steps:
                    print(f"note: the resumed checkpoint is at step {self.start_step} and "
                          f"steps={self.tc.steps}: nothing is left to train (pass --steps "
                          f"above {self.start_step} to continue the run)", file=sys.stderr)
        if self.is_main:  # the writers first: a W&B that cannot start leaves no record
            from dar_core.train.writers import TensorBoardWriter, WandbWriter

            if self.tc.wandb:
                self._writers.append(WandbWriter(self.dir, self.tc.wandb, self.tc.to_dict(),
                                                 self.start_step))
            if self.tc.tensorboard:
                self._writers.append(TensorBoardWriter(self.dir, self.start_step))
            self._write_config()
        return ckpt

    def initial_weights(self) -> dict[str, dict[str, np.ndarray]] | None:
        """``{"params", "ema"}`` of a fresh run started from ``init_from``: that checkpoint's
        weights grafted onto this run's routing (``dar_core.pretrained.graft``; a residual
        model grafted densely keeps its function), or None without ``init_from``. A resumed
        run ignores it: its own checkpoint comes first."""
        if not self.tc.init_from:
            return None
        from dar_core.pretrained.graft import graft_params

        src = load_checkpoint(self.tc.init_from)
        notes: list[str] = []
        params = graft_params(src.params, src.config, self.cfg, notes)
        ema = graft_params(src.ema, src.config, self.cfg) if src.ema is not None else params
        if self.is_main:
            print(f"init from {self.tc.init_from} (step {src.meta.get('step')}): "
                  + "; ".join(notes), file=sys.stderr)
        return {"params": params, "ema": ema}

    def _find_resume(self) -> Checkpoint | None:
        if not self.tc.resume:
            return None
        if self.tc.resume != "auto":
            return self._matching(self._readable(Path(self.tc.resume)), Path(self.tc.resume))
        found = self.checkpoints()
        skipped = []
        for path in reversed(found):
            try:
                ckpt = self._readable(path)
            except CheckpointError as e:  # unreadable or non-finite: fall back to an older one
                skipped.append(path.name)
                if self.is_main:
                    print(f"warning: skipping checkpoint {path.name}: {e}", file=sys.stderr)
                continue
            return self._matching(ckpt, path)  # another model's checkpoint is an error
        if found:
            raise CheckpointError(f"no checkpoint in {str(self.ckpt_dir)!r} can be resumed "
                                  f"(skipped {skipped}); pass --overwrite to start afresh")
        return None

    def _readable(self, path: Path) -> Checkpoint | ShardedCheckpoint:
        """The checkpoint at ``path`` if it reads, is complete and finite (a sharded one: if
        its manifest reads; its backend checks the shards it loads)."""
        if is_sharded(path):
            sc = read_manifest(path)
            if "step" not in sc.meta:
                raise CheckpointError(f"checkpoint {str(path)!r} has no 'step' in its manifest")
            return sc
        ckpt = load_checkpoint(path)  # a truncated or garbled file is a CheckpointError
        if "step" not in ckpt.meta:
            raise CheckpointError(f"checkpoint {str(path)!r} has no 'step' in its metadata")
        bad = non_finite({"params": ckpt.params, "ema": ckpt.ema or {}, "opt": ckpt.opt or {}})
        if bad:
            raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite tensors: "
                                  f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")
        return ckpt

    def _matching(self, ckpt: Checkpoint, path: Path) -> Checkpoint:
        if ckpt.config != self.cfg:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written for a different model config:\n"
                f"  checkpoint: {ckpt.config}\n  this run:   {self.cfg}"
            )
        return ckpt

    def save(self, step: int, params: dict, ema: dict | None = None, opt: dict | None = None,
             state: dict | None = None) -> Path | None:
        """Write ``ckpt-<step>.safetensors`` (``step`` = optimizer steps done) on rank 0 and
        prune old ones. Arrays must already be NumPy (float32)."""
        if not self.is_main:
            return None
        bad = non_finite({"params": params, "ema": ema or {}, "opt": opt or {}})
        if bad:
            last = self._halt()
            raise NonFiniteLossError(
                f"the state after step {step} holds non-finite tensors ({bad[:3]}"
                f"{' ...' if len(bad) > 3 else ''}); not saved. "
                + (f"The last good checkpoint is {str(last)!r}: resume from it with a "
                   "lower lr" if last else "No checkpoint was saved before it"))
        path = self.ckpt_dir / f"ckpt-{step:07d}.safetensors"
        meta = {"step": step, "train": self.tc.to_dict(), "backend": self.backend,
                "world": self.world}
        save_checkpoint(path, self.cfg, params, ema=ema, opt=opt, state=state, meta=meta)
        self._prune(step)
        return path

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep_checkpoints`` checkpoints up to ``step``; redraw the plot."""
        older = [p for p in self.checkpoints() if _step(p) <= step]
        for old in older[: -self.tc.keep_checkpoints]:
            _remove(old)
        self.plot()

    def save_sharded(self, step: int, engine: str, write: Callable[[Path], Any],
                     barrier: Callable[[], None], any_bad: bool) -> None:
        """Every rank: write this rank's shards of ``ckpt-<step>.sharded`` with
        ``write(state_folder)`` (``dar_core.io.sharded``); rank 0 then writes the manifest,
        renames the folder into place and prunes old checkpoints. ``any_bad``: whether any
        rank holds a non-finite tensor (the same on every rank), which saves nothing.

        ``write`` may return a ``wait()`` that blocks until its shards are written (an
        engine's asynchronous save, which has copied the state before returning): training
        goes on, and the folder is completed at the next save, at the end of the run, or when
        it stops. A run killed meanwhile loses only that save (its temp folder is removed at
        the next claim)."""
        self.complete_save()
        if any_bad:
            last = self._halt()
            raise NonFiniteLossError(
                f"the state after step {step} holds non-finite tensors; not saved. "
                + (f"The last good checkpoint is {str(last)!r}: resume from it with a "
                   "lower lr" if last else "No checkpoint was saved before it"))
        tmp = temp_folder(self.ckpt_dir, step)
        if self.is_main:
            _remove(tmp)
            tmp.mkdir(parents=True)
        barrier()
        self._pending = (write(tmp / "state"), barrier, tmp, step, engine)
        if self._pending[0] is None:
            self.complete_save()

    def complete_save(self) -> Path | None:
        """Every rank: finish the sharded save in flight, if any (wait for this rank's shards;
        rank 0 writes the manifest, renames, prunes); the checkpoint on rank 0."""
        if self._pending is None:
            return None
        wait, barrier, tmp, step, engine = self._pending
        self._pending = None
        if wait is not None:
            wait()
        barrier()
        final = None
        if self.is_main:
            final = finalize(tmp, self.ckpt_dir / f"ckpt-{step:07d}.sharded", self.cfg,
                             engine, trained_names(self.cfg, self.tc),
                             {"step": step, "train": self.tc.to_dict(),
                              "backend": self.backend, "world": self.world})
            self._prune(step)
        barrier()
        return final

    # Loop helpers ------------------------------------------------------------------------
    def steps(self) -> Iterator[int]:
        """Step indices ``start .. steps-1``; a progress bar on rank 0.

        In a single-process run SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) stop the
        run cleanly: the step in progress finishes, ``should_checkpoint`` says yes for it, and
        once its checkpoint is written ``TrainingInterrupted`` says how to resume. (With
        several processes the launcher's own handling applies: ranks could see the signal
        at different steps and disagree on when to save.)"""
        rng = range(self.start_step, self.tc.steps)
        if self.is_main and self.tc.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(rng, total=self.tc.steps, initial=self.start_step,
                             desc=f"train {self.backend}", dynamic_ncols=True, file=sys.stderr)
            rng = self._bar
        with self._stop_signals():
            for step in rng:
                yield step
                if self._stop_step == step:
                    last = self._halt()
                    raise TrainingInterrupted(
                        f"stopped by {self._signal} after step {self.done(step)}: checkpoint "
                        f"{str(last) if last else '(none)'!r} written; continue with "
                        f"--resume auto --out {self.tc.out}")

    def _halt(self) -> Path | None:
        """Close the progress bar of a run that stops early (completing a save in flight); its
        newest checkpoint, if any."""
        self.complete_save()
        if self._bar is not None:
            self._bar.close()
        self._close_writers()
        kept = self.checkpoints()
        return kept[-1] if kept else None

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT only note their name while training (single process, main
        thread); the previous handlers come back afterwards. A signal noted after the last
        step's stop decision (during its samples or plots, say) stops no step: it is passed
        on to the restored handler, not dropped, so whoever sent it still sees it."""
        if self.world != 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            self._signal = signal.Signals(signum).name

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
            if self._signal is not None and self._stop_step is None:
                signal.raise_signal(signal.Signals[self._signal])

    def _stopping(self, step: int) -> bool:
        """Whether ``step`` ends the run on a stop signal (decided once, at the first question
        about the step after the signal, so every question about that step agrees)."""
        if self._signal is not None and self._stop_step is None:
            self._stop_step = step
        return self._stop_step == step

    def done(self, step: int) -> int:
        """Optimizer steps completed after running ``step``."""
        return step + 1

    def should_checkpoint(self, step: int) -> bool:
        n = self.done(step)
        return n % self.tc.ckpt_every == 0 or n == self.tc.steps or self._stopping(step)

    def should_sample(self, step: int) -> bool:
        n = self.done(step)
        return n % self.tc.sample_every == 0 or n == self.tc.steps

    def log(self, step: int, loss: float, grad_norm: float, **extra: float) -> None:
        """Record one step; raise NonFiniteLossError naming the step on NaN/inf loss."""
        if not math.isfinite(loss):  # every rank sees the same (reduced) loss: all stop here
            self.complete_save()
            if self._bar is not None:
                self._bar.close()
            raise NonFiniteLossError(
                f"loss is {loss} at step {step}; stopping. The last good checkpoint in "
                f"{str(self.ckpt_dir)!r} is kept: resume from it with a lower lr"
            )
        now = time.perf_counter()
        if self._t_last is None:
            self._t_last, self._last_step = now, step
        n = self.done(step)
        if not self.is_main or (n % self.tc.log_every and n != self.tc.steps):
            return
        steps_done = step - self._last_step
        elapsed = now - self._t_last
        img_s = steps_done * self.tc.batch_size / elapsed if steps_done else float("nan")
        self._t_last, self._last_step = now, step
        rec = {"step": n, "loss": float(loss), "grad_norm": float(grad_norm),
               "img_per_s": img_s, "time": time.time(), **{k: float(v) for k, v in extra.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for w in self._writers:
            w.scalars(n, {k: v for k, v in rec.items()
                          if k not in ("step", "time") and math.isfinite(v)})
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.0f}")

    def sample_grid(
        self,
        step: int,
        velocity: Callable[[Any, float, Any], Any],
        asarray: Callable[[np.ndarray], Any],
        to_numpy: Callable[[Any], np.ndarray],
    ) -> Path | None:
        """Sample the fixed grid inputs with the EMA model and write a PNG (rank 0)."""
        if not self.is_main:
            return None
        from dar_core.io.images import save_image_grid

        noise, y = grid_inputs(self.cfg, self.tc.per_class, self.tc.seed)
        out = sample(velocity, asarray(noise), asarray(y), sampler=self.tc.sample_sampler,
                     steps=self.tc.sample_steps, cfg_scale=self.tc.sample_cfg,
                     null_class=self.cfg.null_class, rng=np.random.default_rng([self.tc.seed, 4]),
                     asarray=asarray)
        path = self.sample_dir / f"step-{self.done(step):07d}.png"
        save_image_grid(self._decoded(to_numpy(out)), path, nrow=self.tc.per_class)
        return path

    def _decoded(self, images: np.ndarray) -> np.ndarray:
        """Samples of a latent dataset decoded by the VAE its manifest names (so the grids
        show images); without torch/diffusers here, the latents with a warning."""
        if getattr(self.dataset, "kind", "pixels") != "latents":
            return images
        if self._decoder is None:
            from dar_core.io.data.vae import decoder_for_data

            try:
                self._decoder = decoder_for_data(self.tc.data)
            except ConfigError as e:  # diffusers or torch missing on this machine
                print(f"warning: sample grids show raw latents: {e}", file=sys.stderr)
                self._decoder = False
        return self._decoder(images) if self._decoder else images

    def plot(self) -> None:
        if self.is_main and self.metrics_path.exists():
            from dar_core.io.plots import plot_training

            plot_training(self.metrics_path, self.dir / "training.png")

    def finish(self) -> None:
        self.complete_save()
        if self._bar is not None:
            self._bar.close()
        self._close_writers()
        self.plot()
        if self._lock is not None:
            self._lock.release()

    def _close_writers(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []

    def _truncate_metrics(self, step: int) -> None:
        """Drop records past ``step`` left by a run that died after its last checkpoint, and
        any line that does not parse (a torn write: power loss, a full disk), with a warning."""
        if not self.metrics_path.exists():
            return
        keep = []
        for n, ln in enumerate(self.metrics_path.read_text(errors="replace").splitlines(), 1):
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
                rec_step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                print(f"warning: dropping unreadable line {n} of {self.metrics_path}",
                      file=sys.stderr)
                continue
            if rec_step <= step:
                keep.append(ln)
        atomic_write_bytes(self.metrics_path, "".join(k + "\n" for k in keep).encode())


def _step(path: Path) -> int:
    return int(_CKPT.match(path.name).group(1))


def _remove(path: Path) -> None:
    """A checkpoint file or sharded checkpoint folder, gone (nothing if absent)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on a run folder: ``.lock`` created with ``O_EXCL`` holding the
    holder's host and pid, removed on release or at exit. A lock whose process is gone (same
    host) is stale and taken over; a live holder makes a second trainer refuse, naming it."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.held = False
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.path.read_text(errors="replace").strip()
                if self._alive(holder):
                    raise RunFolderError(
                        f"run folder {str(folder)!r} is in use by another trainer "
                        f"(host and pid: {holder}); wait for it or choose another --out"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            atexit.register(self.release)
            return
        raise RunFolderError(f"could not take the lock {str(self.path)!r}")

    @staticmethod
    def _alive(holder: str) -> bool:
        host, _, pid = holder.partition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return bool(holder)  # another host's (or unreadable) lock: assume it is live
        if not process_running(int(pid)):
            return False
        return int(pid) != os.getpid()  # our own: an earlier run of this process, done

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this host; one killed but not yet reaped by its parent
    (a zombie) does not, and holds nothing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether process ``pid`` has exited and waits to be reaped (Linux ``/proc``; False
    where it cannot be told)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")  # the state follows "(comm) "


def env_rank_world() -> tuple[int, int]:
    """Rank and world size from the usual launcher variables (torchrun, mlx.launch)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "MLX_RANK" in os.environ and "MLX_HOSTFILE" in os.environ:  # mlx.launch (ring)
        with open(os.environ["MLX_HOSTFILE"]) as f:
            return int(os.environ["MLX_RANK"]), len(json.load(f))  # one entry per rank
    return 0, 1
