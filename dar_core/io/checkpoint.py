"""Checkpoints: one safetensors file holding tensors and a JSON header. Never pickle.

Tensor keys are sectioned: ``params/<canonical name>``, ``ema/<canonical name>``,
``opt/m/<name>``, ``opt/v/<name>``, ``opt/step`` (AdamW moments, shared by every backend so a
run can resume anywhere) and ``state/<name>`` for anything else. The safetensors metadata holds
``format``, ``version``, ``config`` (the ModelConfig as JSON) and ``meta`` (JSON: step, train
config, backend, ...). Writes are atomic: temp file in the same folder, fsync, rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dar_core.errors import CheckpointError, ConfigError
from dar_core.spec.config import ModelConfig
from dar_core.spec.schema import check_params

FORMAT = "dar-checkpoint"
VERSION = 1
SECTIONS = ("params", "ema", "opt", "state")


@dataclass
class Checkpoint:
    config: ModelConfig
    params: dict[str, np.ndarray]
    ema: dict[str, np.ndarray] | None = None
    opt: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def weights(self, which: str = "ema") -> dict[str, np.ndarray]:
        """``"ema"`` (falls back to the raw params when none was saved) or ``"params"``."""
        if which not in ("ema", "params"):
            raise CheckpointError(f"which must be 'ema' or 'params', got {which!r}")
        return self.ema if which == "ema" and self.ema is not None else self.params


def writable_folder(folder: str | os.PathLike, what: str, error: type = ConfigError) -> Path:
    """Create ``folder`` if needed and check that files can be written in it, before any long
    work starts; ``error`` naming ``what`` it is, the path and the reason otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise error(f"{what} {str(folder)!r} is a file, expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {what} {str(folder)!r}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{what} {str(folder)!r} is not writable")
    return folder


def writable_parent(path: str | os.PathLike) -> Path:
    """``writable_folder`` for the folder of an output file ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output {str(path)!r} is a folder, expected a file path")
    writable_folder(path.parent, f"the folder of output {str(path)!r},")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose content replaces ``path`` only when the block completes, so
    readers see the old file or the whole new one: a temp file in the same folder, fsynced,
    renamed over ``path``, the folder fsynced; removed if the block fails. The replaced
    file's mode is kept, else 0644 (mkstemp makes 0600 files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as f:
        f.write(data)


def _safetensors_numpy() -> Any:
    try:
        import safetensors.numpy as stn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("checkpoints need safetensors: pip install 'dar-core[tools]'") from e
    return stn


def _as_saveable(name: str, a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == object or a.dtype.kind not in "fiub":
        raise CheckpointError(f"tensor {name!r} has unsupported dtype {a.dtype}")
    return a if a.flags.c_contiguous else a.copy(order="C")  # keeps 0-d scalars 0-d


def save_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    params: dict[str, Any],
    *,
    ema: dict[str, Any] | None = None,
    opt: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint; ``params``/``ema`` must match ``config``'s schema."""
    check_params(config, params, where="params")
    if ema is not None:
        check_params(config, ema, where="ema")
    tensors: dict[str, np.ndarray] = {}
    for section, d in (("params", params), ("ema", ema), ("opt", opt), ("state", state)):
        for k, v in (d or {}).items():
            tensors[f"{section}/{k}"] = _as_saveable(k, v)
    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": config.to_json(),
        "meta": json.dumps(meta or {}, sort_keys=True),
        "crc32": json.dumps({k: checksum(v) for k, v in tensors.items()}, sort_keys=True),
    }
    data = _safetensors_numpy().save(tensors, metadata=header)
    atomic_write_bytes(path, data)
    return Path(path)


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The JSON header's metadata without reading tensors."""
    path = Path(path)
    if path.is_dir() and path.name.endswith(".sharded"):
        raise CheckpointError(f"{str(path)!r} is a sharded checkpoint: `dar consolidate "
                              f"{path}` writes the single file every backend loads")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise CheckpointError(f"{str(path)!r} is not a safetensors file (header size {n})")
        try:
            head = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{str(path)!r} has an unreadable safetensors header") from e
    md = head.get("__metadata__") or {}
    if md.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a dar checkpoint (format {md.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    return md


def load_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None) -> Checkpoint:
    """Read a checkpoint. With ``config``, check it matches and name the first mismatch."""
    md = read_header(path)
    try:
        stored = ModelConfig.from_json(md["config"])
        meta = json.loads(md.get("meta", "{}"))
        sums = json.loads(md["crc32"]) if "crc32" in md else None  # older files have none
    except (KeyError, ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{str(path)!r} has an unusable header: {e}") from None
    try:
        tensors = _safetensors_numpy().load_file(str(path))
    except Exception as e:  # the reader's own error for a truncated or garbled body
        raise CheckpointError(f"{str(path)!r} cannot be read (truncated or corrupt?): "
                              f"{e}") from None
    if sums is not None:
        if sorted(sums) != sorted(tensors):
            raise CheckpointError(f"{str(path)!r}: its tensors do not match its checksum list")
        bad = [k for k, v in tensors.items() if checksum(v) != sums[k]]
        if bad:
            raise CheckpointError(f"{str(path)!r}: checksum mismatch in {bad[:3]} (the file "
                                  "changed after it was written: a bit flip or a bad copy)")
    sections: dict[str, dict[str, np.ndarray]] = {s: {} for s in SECTIONS}
    for k, v in tensors.items():
        section, _, name = k.partition("/")
        if section not in sections:
            raise CheckpointError(f"{str(path)!r}: unknown tensor section in key {k!r}")
        sections[section][name] = v
    target = config if config is not None else stored
    check_params(target, sections["params"], where=f"{path}: params")
    ema = sections["ema"] or None
    if ema is not None:
        check_params(target, ema, where=f"{path}: ema")
    return Checkpoint(
        config=stored,
        params=sections["params"],
        ema=ema,
        opt=sections["opt"],
        state=sections["state"],
        meta=meta,
    )


def checksum(a: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order), stored per tensor in the header at save."""
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


def optimizer_state_keys(names: list[str]) -> list[str]:
    """The ``opt/`` section every backend writes for AdamW: ``step`` (steps done), then the
    first and second moments ``m/<name>``, ``v/<name>`` of every trainable parameter."""
    return ["step"] + [f"{k}/{n}" for n in names for k in ("m", "v")]


def check_optimizer_state(opt: dict[str, Any] | None, names: list[str]) -> None:
    """Raise ``CheckpointError`` naming the first missing optimizer-state key (resume needs
    every one; loading weights alone does not)."""
    for key in optimizer_state_keys(names):
        if opt is None or key not in opt:
            raise CheckpointError(f"checkpoint has no optimizer state 'opt/{key}'; it cannot "
                                  "resume training (start a fresh run or load weights only)")


def non_finite(groups: dict[str, dict[str, Any]]) -> list[str]:
    """``"group/name"`` of every floating array holding NaN or inf."""
    bad = []
    for group, arrays in groups.items():
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                bad.append(f"{group}/{name}")
    return bad
