"""Streaming training data from the shards ``dar prepare`` writes (``manifest.json`` + shards).

Why it is built this way:

* **Resident memory independent of the dataset size.** Rows are read with ``pread`` straight
  into the batch array (no memory map: pages of a mapped file count as resident memory of
  the process while mapped, so a map of an 8 GB dataset grows the RSS by every page touched).
  The only per-example state kept in memory is the labels, in the smallest unsigned dtype
  that holds them (2 bytes an example for ImageNet: 2.5 MB). Open file descriptors are
  cached (least recently used first out, at most half the soft ``RLIMIT_NOFILE``).
* **The batch at (seed, step) is a pure function.** Stream position ``p = step * B + j``
  lies in epoch ``e = p // n_train`` at offset ``p % n_train``; the example there is
  ``split(perm_e(offset))`` where ``perm_e`` is a keyed bijection of ``[0, n_train)``
  (``shuffle.Permutation``, keys from ``default_rng([seed, 0, e])``) and ``split`` is the
  identity, or with ``holdout=H`` a fixed bijection of ``[0, N)`` (keys from
  ``default_rng([seed, 1, 1])``) whose last ``H`` positions are the held-out pool. Nothing
  is materialised per epoch, so memory and time per batch are ``O(B)`` at any ``N``.
* **Each data-parallel rank reads only its rows.** ``train_batch(step, B, rank, world)``
  returns rows ``rank * B/world .. (rank+1) * B/world`` of the global batch, reading only
  those; the parts of all ranks concatenate to ``train_batch(step, B)``.
* **Flip** (``flip=True``): stream position ``p`` is mirrored when a keyed hash of
  ``(seed, p)`` says so (keys from ``default_rng([seed, 2])``). Latent shards prepared with
  ``--flip`` hold the encoding of each mirrored image (``x_flip``), which is used then; for
  pixels (and latents without ``x_flip``) the array is mirrored along its width (exact for
  pixels, an approximation of encoding the mirrored image for latents: ``flip_mode``).
* No held-out split unless asked (``holdout=H``): published numbers train on every image.

``uint8`` pixels come back as ``float32`` in [-1, 1]; ``float16`` latents as ``float32``,
already multiplied by the VAE scale factor (``latent_scale``; ``vae`` names the VAE).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import InputError
from dar_core.io.checkpoint import atomic_write_bytes
from dar_core.io.data.procedural import Labelled, _is_int, stream_indices
from dar_core.io.data.shuffle import Permutation, coin_flips, keys
from dar_core.io.data.st_format import read_header, write_safetensors

MANIFEST = "manifest.json"
FORMAT = "dar-shards"
VERSION = 1
STORED_DTYPES = ("uint8", "float16", "float32")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check ``manifest.json`` (its folder or the file itself)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"shard dataset {str(path)!r} does not exist")
    if path.is_dir():
        path = path / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable shard manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"{path}: not a {FORMAT!r} manifest (format "
                         f"{m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("version") != VERSION:
        raise InputError(f"{path}: manifest version {m.get('version')!r} is not supported "
                         f"(this dar reads version {VERSION})")
    for key in ("count", "shape", "dtype", "classes", "shards"):
        if key not in m:
            raise InputError(f"{path}: manifest has no {key!r} field")
    shape = m["shape"]
    if (not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(s) and s > 0
                                                                  for s in shape)):
        raise InputError(f"{path}: shape must be [C, H, W] of positive ints, got {shape!r}")
    if shape[1] != shape[2]:
        raise InputError(f"{path}: images must be square, got shape {shape}")
    if m["dtype"] not in STORED_DTYPES:
        raise InputError(f"{path}: dtype must be one of {list(STORED_DTYPES)}, "
                         f"got {m['dtype']!r}")
    if not isinstance(m["classes"], list) or not m["classes"]:
        raise InputError(f"{path}: classes must be a non-empty list, got {m['classes']!r}")
    total = sum(int(s.get("count", -1)) for s in m["shards"])
    if total != m["count"]:
        raise InputError(f"{path}: the shards hold {total} examples but count is "
                         f"{m['count']!r}")
    m["_path"] = str(path)
    return m


def write_shards(out: str | os.PathLike[str], shards: Iterable[tuple[np.ndarray, np.ndarray]],
                 classes: list[str], **fields: Any) -> dict[str, Any]:
    """Write arrays as a shard folder ``ShardDataset`` reads: ``shards`` yields ``(x, y)``
    chunks (``x`` ``uint8``/``float16``/``float32 [n, C, H, W]``, ``y`` ints ``[n]``), one
    shard file each; ``fields`` go into the manifest (e.g. ``kind="latents"``,
    ``latent_scale=0.18215``, ``vae={...}``). The manifest is written last, atomically.
    For arrays already in memory or made by a program; ``dar prepare`` makes them from images.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, shape, dtype = [], None, None
    for k, (x, y) in enumerate(shards):
        x, y = np.asarray(x), np.asarray(y, dtype=np.int64)
        if x.ndim != 4 or y.shape != x.shape[:1]:
            raise InputError(f"shard {k}: x must be [n, C, H, W] and y [n], got x "
                             f"{list(x.shape)} and y {list(y.shape)}")
        if shape is None:
            shape, dtype = x.shape[1:], x.dtype
        elif x.shape[1:] != shape or x.dtype != dtype:
            raise InputError(f"shard {k}: x is {x.dtype} {list(x.shape[1:])}, the first shard "
                             f"was {dtype} {list(shape)}")
        name = f"shard-{k:05d}.safetensors"
        write_safetensors(out / name, {"x": x, "y": y}, {})
        entries.append({"file": name, "count": int(x.shape[0])})
    if shape is None:
        raise InputError("write_shards: no shards given")
    manifest = {"format": FORMAT, "version": VERSION, "kind": "pixels",
                "count": sum(e["count"] for e in entries), "shape": [int(s) for s in shape],
                "dtype": np.dtype(dtype).name, "num_classes": len(classes),
                "classes": list(classes), "label_map": {c: i for i, c in enumerate(classes)},
                "latent_scale": None, "latent_shift": None, "vae": None, "flip_stored": False,
                **fields, "shards": entries}
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


class _Shard:
    """One shard's file and the absolute byte offsets of its tensors."""

    def __init__(self, path: Path, count: int, shape: tuple[int, ...], dtype: np.dtype,
                 flip_stored: bool) -> None:
        h = read_header(path)
        for key in ("x", "y") + (("x_flip",) if flip_stored else ()):
            if key not in h.tensors:
                raise InputError(f"{path}: shard has no tensor {key!r} "
                                 f"(found {sorted(h.tensors)})")
        for key in ("x",) + (("x_flip",) if flip_stored else ()):
            t = h.tensors[key]
            if t.shape != (count, *shape) or t.dtype != dtype:
                raise InputError(f"{path}: {key} is {t.dtype} {list(t.shape)}, the manifest "
                                 f"says {dtype} {[count, *shape]}")
        y = h.tensors["y"]
        if y.shape != (count,) or y.dtype.kind not in "iu":
            raise InputError(f"{path}: y is {y.dtype} {list(y.shape)}, expected integer "
                             f"labels of shape [{count}]")
        self.path, self.count, self.header = path, count, h
        self.x_offset = h.tensors["x"].offset
        self.flip_offset = h.tensors["x_flip"].offset if flip_stored else -1

    def labels(self) -> np.ndarray:
        t = self.header.tensors["y"]
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            return np.frombuffer(f.read(t.nbytes), dtype=t.dtype).copy()


class ShardDataset(Labelled):
    """Training data from a ``dar prepare`` folder; see the module docstring.

    Args:
        path: the folder holding ``manifest.json`` (or the manifest file).
        num_classes: if given, every label must be below it; otherwise the manifest's
            number of classes.
        seed: non-negative int selecting the epoch orders, the held-out split and flips.
        holdout: examples held out for evaluation (never trained on); 0: none.
        flip: mirror half of the training examples, decided per stream position.
    """

    def __init__(self, path: str | os.PathLike[str], num_classes: int | None = None,
                 seed: int = 0, holdout: int = 0, flip: bool = False) -> None:
        if not _is_int(seed) or seed < 0:
            raise InputError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(flip, bool):
            raise InputError(f"flip must be a bool, got {flip!r}")
        m = read_manifest(path)
        self._manifest = m
        self.root = Path(m["_path"]).parent
        self._shape = tuple(int(s) for s in m["shape"])
        self._dtype = np.dtype(m["dtype"])
        self._row_bytes = int(np.prod(self._shape)) * self._dtype.itemsize
        flip_stored = bool(m.get("flip_stored", False))
        shards = []
        for s in m["shards"]:
            f = self.root / str(s.get("file", ""))
            if not f.is_file():
                raise InputError(f"{m['_path']}: shard {str(f)!r} is missing")
            if int(s["count"]) > 0:
                shards.append(_Shard(f, int(s["count"]), self._shape, self._dtype,
                                     flip_stored))
        self._shards = shards
        self._starts = np.cumsum([0] + [s.count for s in shards], dtype=np.int64)
        self._x_offsets = np.array([s.x_offset for s in shards], dtype=np.int64)
        self._flip_offsets = np.array([s.flip_offset for s in shards], dtype=np.int64)
        n = int(self._starts[-1])
        if n < 1:
            raise InputError(f"{m['_path']}: the dataset holds no examples")

        manifest_classes = len(m["classes"])
        if num_classes is None:
            num_classes = manifest_classes
        elif not _is_int(num_classes) or num_classes < 1:
            raise InputError(f"num_classes must be a positive int, got {num_classes!r}")
        label_dtype = np.min_scalar_type(max(int(num_classes), manifest_classes) - 1)
        self._y = np.empty(n, dtype=label_dtype)
        for s, start in zip(shards, self._starts):
            y = s.labels()
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                bad = int(y.max()) if y.max() >= num_classes else int(y.min())
                raise InputError(f"{s.path}: label {bad} is out of range for "
                                 f"num_classes={num_classes}")
            self._y[start:start + s.count] = y
        self._num_classes = int(num_classes)

        if not _is_int(holdout) or not 0 <= holdout < n:
            raise InputError(f"holdout must be an int in [0, {n}) for {n} examples "
                             f"(at least one stays for training), got {holdout!r}")
        self._seed, self._holdout, self._flip = int(seed), int(holdout), flip
        self._split = Permutation(n, keys([self._seed, 1, 1])) if holdout else None
        self._epochs: OrderedDict[int, Permutation] = OrderedDict()
        self._flip_key = keys([self._seed, 2], 1)[0]
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._max_fds = max(8, _fd_limit() // 2)

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        return self._shape[1]

    @property
    def channels(self) -> int:
        return self._shape[0]

    @property
    def files(self) -> list[Path]:
        return [s.path for s in self._shards]

    @property
    def num_train(self) -> int:
        return len(self) - self._holdout

    @property
    def num_heldout(self) -> int:
        return self._holdout

    @property
    def class_names(self) -> list[str]:
        return list(self._manifest["classes"])

    @property
    def kind(self) -> str:
        """``"pixels"`` or ``"latents"``."""
        return str(self._manifest.get("kind", "pixels"))

    @property
    def latent_scale(self) -> float | None:
        """The factor the stored latents were multiplied by (decode ``x / scale + shift``)."""
        v = self._manifest.get("latent_scale")
        return None if v is None else float(v)

    @property
    def latent_shift(self) -> float | None:
        v = self._manifest.get("latent_shift")
        return None if v is None else float(v)

    @property
    def vae(self) -> dict[str, Any] | None:
        """The VAE that encoded the latents: ``path``, ``config_sha256``, ... (or None)."""
        v = self._manifest.get("vae")
        return None if v is None else dict(v)

    @property
    def flip(self) -> bool:
        return self._flip

    @property
    def flip_mode(self) -> str | None:
        """How flipped examples are made: ``"stored"`` (``x_flip``), ``"mirror"`` or None."""
        if not self._flip:
            return None
        return "stored" if self._flip_offsets[0] >= 0 else "mirror"

    @property
    def manifest(self) -> dict[str, Any]:
        return {k: v for k, v in self._manifest.items() if not k.startswith("_")}

    def __len__(self) -> int:
        return int(self._starts[-1])

    # ------------------------------------------------------------------ streams
    def _epoch(self, e: int) -> Permutation:
        p = self._epochs.get(e)
        if p is None:
            p = Permutation(self.num_train, keys([self._seed, 0, e]))
            self._epochs[e] = p
            if len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return p

    def train_indices(self, step: int, batch_size: int, rank: int = 0,
                      world: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(example indices, stream positions) of ``rank``'s rows of the batch at ``step``."""
        idx, pos = stream_indices(step, batch_size, rank, world, self.num_train,
                                  lambda e, off: self._epoch(e)(off))
        if self._split is not None:
            idx = self._split(idx)
        return idx, pos

    def train_batch(self, step: int, batch_size: int, rank: int = 0,
                    world: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``rank``'s rows of the global training batch at ``step`` (all of it by default):
        ``float32 [batch_size / world, C, H, W]`` and ``int64`` labels."""
        idx, pos = self.train_indices(step, batch_size, rank, world)
        flips = coin_flips(self._flip_key, pos) if self._flip else None
        return self._read(idx, flips), self._y[idx].astype(np.int64)

    def heldout(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``min(n, num_heldout)`` examples of the fixed held-out pool (never
        flipped); empty unless the dataset was made with ``holdout > 0``."""
        if not _is_int(n) or n < 0:
            raise InputError(f"heldout size n must be a non-negative int, got {n!r}")
        k = min(int(n), self._holdout)
        idx = np.arange(self.num_train, self.num_train + k, dtype=np.int64)
        if self._split is not None and k:
            idx = self._split(idx)
        return self._read(idx, None), self._y[idx].astype(np.int64)

    def examples(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The examples at dataset indices ``index`` (manifest order), unflipped."""
        idx = np.asarray(index)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise InputError(f"index must be a 1-D integer array, got {idx.dtype} "
                             f"{list(idx.shape)}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise InputError(f"example index {bad} is out of range [0, {len(self)})")
        idx = idx.astype(np.int64)
        return self._read(idx, None), self._y[idx].astype(np.int64)

    # ------------------------------------------------------------------ reading
    def _fd(self, s: int) -> int:
        """An open descriptor of shard ``s`` (cached; ``_trim`` closes the oldest)."""
        fd = self._fds.get(s)
        if fd is None:
            fd = os.open(self._shards[s].path, os.O_RDONLY)
            self._fds[s] = fd
        else:
            self._fds.move_to_end(s)
        return fd

    def _trim(self) -> None:
        while len(self._fds) > self._max_fds:
            os.close(self._fds.popitem(last=False)[1])

    def _read(self, idx: np.ndarray, flips: np.ndarray | None) -> np.ndarray:
        out = np.empty((idx.size, *self._shape), dtype=self._dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        rb = self._row_bytes
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        stored = flips is not None and self._flip_offsets[0] >= 0
        base = np.where(flips, self._flip_offsets[shard], self._x_offsets[shard]) if stored \
            else self._x_offsets[shard]
        offsets = (base + (idx - self._starts[shard]) * rb).tolist()
        fds = {s: self._fd(s) for s in np.unique(shard).tolist()}
        for i, (s, off) in enumerate(zip(shard.tolist(), offsets)):
            got = _pread_into(fds[s], buf[i * rb:(i + 1) * rb], off)
            if got != rb:
                raise InputError(f"{self._shards[s].path}: short read at byte {off} ({got} of "
                                 f"{rb} bytes); the shard changed or was truncated after "
                                 "loading")
        self._trim()  # after the reads: a batch's descriptors stay open while it is read
        if flips is not None and not stored:
            out[flips] = out[flips][..., ::-1]
        if self._dtype == np.uint8:
            return out.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return out.astype(np.float32)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:  # file descriptors do not travel
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (f"ShardDataset({str(self.root)!r}, N={len(self)}, kind={self.kind}, "
                f"shape={list(self._shape)}, num_classes={self._num_classes}, "
                f"seed={self._seed}, holdout={self._holdout}, flip={self._flip})")


def _fd_limit() -> int:
    try:
        import resource
    except ImportError:  # not a POSIX system
        return 512
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if 0 < soft < 1 << 20 else 1024


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read ``len(view)`` bytes at ``offset`` into ``view``; the number of bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)
