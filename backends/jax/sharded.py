"""Sharded state for the JAX trainer: the FSDP placement rule and Orbax checkpoints.

A checkpoint's ``state/`` folder (``dar_core.io.sharded``) is one Orbax PyTree checkpoint of
a flat dict whose keys are the portable format's (``params/<name>``, ``ema/<name>``,
``opt/m/<name>``, ``opt/v/<name>``, ``opt/step``). Orbax joins tree paths with ``.`` and
names files after them, so every key is escaped to ``[A-Za-z0-9_]`` (``encode_key``) and
unescaped on reading. Each process writes and reads only the shards of its own devices
(Orbax does this for sharded ``jax.Array`` leaves; NumPy leaves are written by process 0).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec

from dar_core.errors import CheckpointError, ConfigError

ENGINE = "orbax"
_ESCAPED = re.compile(r"_([0-9a-f]{2})")


def fsdp_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """The placement of an array of ``shape`` over ``n`` FSDP devices: its largest axis
    divisible by ``n`` (the first on ties) split along ``"fsdp"``; replicated when no axis
    divides (scalars, small biases) or ``n == 1``."""
    axes = [i for i, d in enumerate(shape) if n > 1 and d % n == 0]
    if not axes:
        return PartitionSpec()
    best = max(axes, key=lambda i: (shape[i], -i))
    return PartitionSpec(*("fsdp" if i == best else None for i in range(len(shape))))


def encode_key(key: str) -> str:
    """A checkpoint key as an Orbax-safe name: every character but ``[A-Za-z0-9]`` as
    ``_<hex>`` (``params/blocks.0.attn.qkv.weight`` -> ``params_2fblocks_2e0_2e...``)."""
    return "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in key)


def decode_key(name: str) -> str:
    """The inverse of ``encode_key``."""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), name)


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ConfigError("sharded checkpoints (shard='params' or 'opt') need Orbax: "
                          "pip install orbax-checkpoint") from None
    return ocp


def save(folder: Path, flat: dict[str, Any], background: bool = False) -> Any:
    """Write this process's shards of ``flat`` (key -> ``jax.Array`` or NumPy value) as the
    Orbax checkpoint ``folder``; every process calls it. It returns once written, or with
    ``background`` once Orbax has copied the arrays to host memory, returning a ``wait()``
    that blocks until the files are written (Orbax's ``AsyncCheckpointer``)."""
    ocp = _orbax()
    tree = {encode_key(k): v for k, v in flat.items()}
    if not background:
        ocp.PyTreeCheckpointer().save(Path(folder), args=ocp.args.PyTreeSave(tree))
        return None
    checkpointer = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
    checkpointer.save(Path(folder), args=ocp.args.PyTreeSave(tree))

    def wait() -> None:
        checkpointer.wait_until_finished()
        checkpointer.close()

    return wait


def restore(folder: Path, targets: dict[str, Any]) -> dict[str, Any]:
    """Read the keys of ``targets`` from ``folder``: a ``jax.ShapeDtypeStruct`` with a sharding
    comes back as a global array placed so (each process reads its shards), anything else
    (``None``) as a full NumPy array. Every process calls it."""
    ocp = _orbax()
    args = {encode_key(k): ocp.RestoreArgs(restore_type=np.ndarray) if t is None else
            ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
            for k, t in targets.items()}
    saved = _saved_names(folder)
    missing = sorted(decode_key(n) for n in set(args) - saved)
    if missing:
        raise CheckpointError(f"sharded checkpoint state {str(folder)!r} lacks {missing[:3]}")
    try:
        out = ocp.PyTreeCheckpointer().restore(Path(folder), args=ocp.args.PyTreeRestore(
            item={encode_key(k): 0 if t is None else t for k, t in targets.items()},
            restore_args=args, partial_restore=set(args) != saved))
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"sharded checkpoint state {str(folder)!r} is unreadable: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
    return {decode_key(k): v for k, v in out.items()}


def _saved_names(folder: Path) -> set[str]:
    """The (escaped) top-level names the Orbax checkpoint ``folder`` holds."""
    ocp = _orbax()
    if not Path(folder).is_dir():
        raise CheckpointError(f"sharded checkpoint state {str(folder)!r} does not exist")
    try:
        meta = ocp.PyTreeCheckpointer().metadata(Path(folder))
    except (ValueError, KeyError, OSError, FileNotFoundError) as e:
        raise CheckpointError(f"sharded checkpoint state {str(folder)!r} is unreadable: "
                              f"{e}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return set(tree)


def read_full(state_dir: Path, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Every key of ``shapes`` the checkpoint holds, as a full NumPy array (one process, no
    mesh: whatever the world size that wrote it); ``CheckpointError`` on a shape that differs.
    The keys it lacks are left out (the core names them)."""
    present = {decode_key(n) for n in _saved_names(state_dir)}
    full = restore(state_dir, {k: None for k in shapes if k in present})
    for k, v in full.items():
        if tuple(np.shape(v)) != tuple(shapes[k]):
            raise CheckpointError(f"sharded checkpoint {str(state_dir)!r} holds {k!r} with shape "
                                  f"{tuple(np.shape(v))}, expected {tuple(shapes[k])}")
    return {k: np.asarray(v) for k, v in full.items()}

