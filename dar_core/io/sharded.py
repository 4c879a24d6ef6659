"""Sharded checkpoints: a folder per step, each rank writing and reading only its own shards
through its framework's engine (``torch.distributed.checkpoint``, Orbax), and the same
atomicity as the single-file format.

Layout of ``checkpoints/ckpt-<step>.sharded/``::

    dar.json    format, engine, the ModelConfig, meta (step, train config, backend, world)
    state/      the engine's files: one flat tree of the keys of ``flat_keys``

A save goes to ``.ckpt-<step>.sharded.tmp/``; once every rank has finished its shards, rank 0
writes ``dar.json`` there and renames the folder into place. A folder without ``dar.json``
never has the final name, so a crash mid-save leaves the previous checkpoint the newest, and
the run folder's next claim removes the temp folder. The keys are the portable format's
(``params/<name>``, ``ema/<name>``, ``opt/m/<name>``, ``opt/v/<name>``, ``opt/step``), so
``consolidate`` writes the single safetensors file every backend loads.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import CheckpointError, ConfigError
from dar_core.spec.config import ModelConfig
from dar_core.spec.schema import param_shapes

FORMAT = "dar-sharded-checkpoint"
VERSION = 1
SUFFIX = ".sharded"
MANIFEST = "dar.json"
STATE = "state"
SHARD_MODES = ("none", "params", "opt")
# engine name -> the backend module that reads its files into full NumPy arrays
ENGINES = {"torch-dcp": "dar_core.backends.torch.sharded",
           "orbax": "dar_core.backends.jax.sharded"}


def check_shard(mode: Any, fsdp_size: Any) -> None:
    """``--shard`` and ``--fsdp-size``, or a ``ConfigError`` naming the bad value."""
    if mode not in SHARD_MODES:
        raise ConfigError(f"shard must be one of {list(SHARD_MODES)}, got {mode!r}")
    if isinstance(fsdp_size, bool) or not isinstance(fsdp_size, int) or fsdp_size < 0:
        raise ConfigError(f"fsdp_size must be an integer >= 0 (0: every device), "
                          f"got {fsdp_size!r}")


def mesh_shape(devices: int, fsdp_size: int) -> tuple[int, int]:
    """``(data, fsdp)``: the shards of each replica over ``fsdp`` devices (0: all of them),
    replicas over the rest (hybrid sharding)."""
    fsdp = fsdp_size or devices
    if fsdp > devices or devices % fsdp:
        raise ConfigError(f"fsdp_size={fsdp_size} does not divide the {devices} devices")
    return devices // fsdp, fsdp


def is_sharded(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and p.name.endswith(SUFFIX)


def temp_folder(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f".ckpt-{step:07d}{SUFFIX}.tmp"


def flat_keys(cfg: ModelConfig, trained: list[str]) -> dict[str, tuple[int, ...]]:
    """Every key of a sharded checkpoint and its full shape: the weights and their EMA for
    every schema name, AdamW's moments for the trained ones, the step count."""
    shapes = param_shapes(cfg)
    keys = {f"{s}/{n}": tuple(shapes[n]) for s in ("params", "ema") for n in shapes}
    keys.update({f"opt/{m}/{n}": tuple(shapes[n]) for n in trained for m in ("m", "v")})
    keys["opt/step"] = ()
    return keys


@dataclass
class ShardedCheckpoint:
    """A complete sharded checkpoint folder (its manifest read; the shards are the
    engine's to read)."""

    path: Path
    config: ModelConfig
    engine: str
    meta: dict[str, Any] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.path / STATE


def read_manifest(path: str | os.PathLike) -> ShardedCheckpoint:
    """The checkpoint at ``path`` (a ``.sharded`` folder), or a ``CheckpointError`` saying
    why it cannot be one."""
    path = Path(path)
    m = path / MANIFEST
    if not m.is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete sharded checkpoint (no {MANIFEST})")
    try:
        d = json.loads(m.read_text())
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{str(m)!r} is not a dar sharded checkpoint manifest "
                                  f"(format {d.get('format')!r})")
        if d["engine"] not in ENGINES:
            raise CheckpointError(f"{str(m)!r} names an unknown engine {d['engine']!r}, "
                                  f"expected one of {list(ENGINES)}")
        return ShardedCheckpoint(path, ModelConfig.from_dict(d["config"]), d["engine"],
                                 d.get("meta", {}), list(d["trained"]))
    except (KeyError, ValueError, TypeError) as e:  # ConfigError is a ValueError
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{str(m)!r} is unreadable: {e}") from None


def finalize(tmp: Path, final: Path, cfg: ModelConfig, engine: str, trained: list[str],
             meta: dict[str, Any]) -> Path:
    """Rank 0, once every rank's shards are in ``tmp``: the manifest, then the rename."""
    from dar_core.io.checkpoint import atomic_write_bytes

    atomic_write_bytes(tmp / MANIFEST, json.dumps(
        {"format": FORMAT, "version": VERSION, "engine": engine, "config": cfg.to_dict(),
         "trained": trained, "meta": meta}, indent=1, sort_keys=True).encode())
    if final.exists():  # the same step saved again (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def read_full(ckpt: ShardedCheckpoint) -> dict[str, np.ndarray]:
    """Every key of ``ckpt`` as a full NumPy array, in one process (the engine reassembles
    the shards whatever the world size that wrote them)."""
    engine = importlib.import_module(ENGINES[ckpt.engine])
    shapes = flat_keys(ckpt.config, ckpt.trained)
    full = engine.read_full(ckpt.state_dir, shapes)
    missing = sorted(set(shapes) - set(full))
    if missing:
        raise CheckpointError(f"{str(ckpt.path)!r} lacks {missing[:3]}")
    return full


def to_checkpoint(ckpt: ShardedCheckpoint) -> Any:
    """The whole of ``ckpt`` as a portable ``Checkpoint`` in one process (what an unsharded
    run resumes from, and what ``consolidate`` writes); non-finite tensors are an error."""
    from dar_core.io.checkpoint import Checkpoint, non_finite

    sections: dict[str, dict[str, np.ndarray]] = {"params": {}, "ema": {}, "opt": {}}
    for k, v in read_full(ckpt).items():
        section, _, name = k.partition("/")
        sections[section][name] = v
    bad = non_finite(sections)
    if bad:
        raise CheckpointError(f"{str(ckpt.path)!r} holds non-finite tensors: {bad[:3]}")
    sections["opt"]["step"] = np.asarray(sections["opt"]["step"], np.int64)
    return Checkpoint(ckpt.config, sections["params"], ema=sections["ema"],
                      opt=sections["opt"], meta=dict(ckpt.meta))


def consolidate(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the single-file portable checkpoint of the sharded checkpoint ``path`` (or of
    the newest one in a run folder) to ``out`` (default: ``<run>/consolidated/ckpt-<step>
    .safetensors``, outside ``checkpoints/`` so that pruning and resuming never see it)."""
    from dar_core.io.checkpoint import save_checkpoint, writable_parent

    ckpt = read_manifest(_newest(Path(path)))
    name = ckpt.path.with_suffix(".safetensors").name
    target = Path(out) if out else (ckpt.path.parent.parent / "consolidated" / name
                                    if ckpt.path.parent.name == "checkpoints"
                                    else ckpt.path.with_suffix(".safetensors"))
    writable_parent(target)
    c = to_checkpoint(ckpt)
    return save_checkpoint(target, c.config, c.params, ema=c.ema, opt=c.opt,
                           meta={**c.meta, "consolidated_from": str(ckpt.path)})


def _newest(path: Path) -> Path:
    if is_sharded(path):
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if folder.is_dir():
        found = sorted(p for p in folder.glob(f"ckpt-*{SUFFIX}") if (p / MANIFEST).is_file())
        if found:
            return found[-1]
    raise CheckpointError(f"no sharded checkpoint at {str(path)!r} (expected a "
                          f"ckpt-<step>{SUFFIX} folder, or a run folder holding one)")


def cmd_consolidate(args: Any) -> None:
    out = consolidate(args.checkpoint, args.out)
    print(f"wrote {out}")
