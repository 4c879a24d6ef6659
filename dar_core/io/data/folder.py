"""Loading user data from a folder of shards held in memory, with the same interface as the
procedural set.

A folder holds ``*.npz`` and/or ``*.safetensors`` shards, each with an image array ``x``
(``[N, C, H, W]``, ``uint8`` pixels or floating-point values such as pre-extracted VAE
latents) and integer labels ``y`` (``[N]``). Shards are read in file-name order and
concatenated in memory: the target is small and medium datasets for tiny models, and a
flat array makes the batch order trivial to reason about. Large datasets go through
``dar prepare`` and ``ShardDataset`` (streamed from disk); ``make_dataset`` picks that one
for a folder holding ``manifest.json``.

* ``uint8`` is mapped to ``float32`` in [-1, 1] (``x / 127.5 - 1``); floating-point data
  passes through unchanged apart from the cast to ``float32``.
* Every problem is an ``InputError`` naming the file and the offending value, because a
  silently mis-shaped dataset wastes a whole training run.
* Held-out split, only when asked (``holdout=H``; the default 0 trains on every example, as
  published results do): one fixed permutation (seed domain ``(seed, 1, 1)``) puts every
  example in a position; the last ``H`` positions are the held-out pool, never used for
  training. ``heldout(n)`` returns the first ``min(n, H)`` of that pool, so it is the same
  whatever ``n`` is asked for, and the training stream never depends on it.
* Training stream: epoch ``e`` visits the training pool in the order of
  ``default_rng([seed, e]).permutation``; batch ``step`` holds the stream positions
  ``step * batch_size .. step * batch_size + batch_size - 1``, wrapping across epochs. A
  batch is a pure function of (seed, step, batch_size), so resumed runs are bit-identical;
  ``train_batch(step, B, rank, world)`` is the rank's slice of it.
* ``flip=True`` mirrors the examples at the stream positions a keyed hash of
  ``(seed, position)`` picks (the same rule as ``ShardDataset``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dar_core.errors import InputError
from dar_core.io.data.procedural import (
    Labelled,
    ProceduralDataset,
    _is_int,
    stream_indices,
)
from dar_core.io.data.shards import MANIFEST, ShardDataset
from dar_core.io.data.shuffle import coin_flips, keys

SHARD_PATTERNS: tuple[str, ...] = ("*.npz", "*.safetensors")


def _load_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``x`` and ``y`` from one shard and check them; returns (float32 x, int64 y)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
    except Exception as e:  # unreadable file: say which one
        raise InputError(f"{path}: could not read shard ({type(e).__name__}: {e})") from e
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise InputError(
            f"{path}: missing key(s) {missing}; a shard needs 'x' and 'y', "
            f"found keys {sorted(arrays)}"
        )
    x, y = arrays["x"], arrays["y"]
    if x.ndim != 4:
        raise InputError(f"{path}: x must be [N, C, H, W] (ndim 4), got shape {x.shape}")
    if x.shape[2] != x.shape[3]:
        raise InputError(
            f"{path}: images must be square, got H={x.shape[2]} W={x.shape[3]} "
            f"(x shape {x.shape})"
        )
    if y.ndim != 1:
        raise InputError(f"{path}: y must be [N] (ndim 1), got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"{path}: x has N={x.shape[0]} examples but y has {y.shape[0]} labels"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise InputError(f"{path}: labels must be >= 0, found label {int(y.min())}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        if not np.all(np.isfinite(x)):
            raise InputError(f"{path}: x contains non-finite values (NaN or inf)")
    else:
        raise InputError(f"{path}: x must be uint8 or floating point, got dtype {x.dtype}")
    return x, y.astype(np.int64, copy=False)


class FolderDataset(Labelled):
    """User data from a folder of ``*.npz`` / ``*.safetensors`` shards (or one shard file).

    Args:
        path: the folder (or a single shard file).
        num_classes: if given, checked against the labels (every label must be below it);
            otherwise ``max label + 1``.
        seed: non-negative int selecting the held-out split, the epoch orders and flips.
        holdout: examples held out for evaluation (never trained on); 0: none.
        flip: mirror the training examples at half of the stream positions.
    """

    def __init__(self, path: str | os.PathLike[str], num_classes: int | None = None,
                 seed: int = 0, holdout: int = 0, flip: bool = False) -> None:
        root = Path(path)
        if not root.exists():
            raise InputError(f"dataset path {str(root)!r} does not exist")
        if not _is_int(seed) or seed < 0:
            raise InputError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(flip, bool):
            raise InputError(f"flip must be a bool, got {flip!r}")
        if root.is_dir():
            files = sorted(
                (p for pat in SHARD_PATTERNS for p in root.glob(pat) if p.is_file()),
                key=lambda p: p.name,
            )
            if not files:
                raise InputError(
                    f"no shards found in folder {str(root)!r}: expected files matching "
                    f"{' or '.join(SHARD_PATTERNS)}"
                )
        elif root.suffix in (".npz", ".safetensors"):
            files = [root]
        else:
            raise InputError(
                f"dataset path {str(root)!r} is neither a folder nor a shard file "
                f"({' or '.join(SHARD_PATTERNS)})"
            )

        xs, ys = [], []
        first: tuple[Path, tuple[int, ...]] | None = None
        for f in files:
            x, y = _load_shard(f)
            if first is None:
                first = (f, x.shape[1:])
            elif x.shape[1:] != first[1]:
                raise InputError(
                    f"{f}: image shape [C, H, W] = {list(x.shape[1:])} differs from "
                    f"{list(first[1])} in {first[0]}"
                )
            xs.append(x)
            ys.append(y)
        self._x = np.concatenate(xs)
        self._y = np.concatenate(ys)
        self._files = files
        n = self._x.shape[0]
        if not _is_int(holdout) or not 0 <= holdout < n:
            raise InputError(
                f"holdout must be an int in [0, {n}) for the {n} example(s) of "
                f"{str(root)!r} (at least one stays for training), got {holdout!r}"
            )

        max_label = int(self._y.max())
        if num_classes is None:
            self._num_classes = max_label + 1
        else:
            if not _is_int(num_classes) or num_classes < 1:
                raise InputError(f"num_classes must be a positive int, got {num_classes!r}")
            if max_label >= num_classes:
                raise InputError(
                    f"label {max_label} in {str(root)!r} is out of range for "
                    f"num_classes={num_classes}"
                )
            self._num_classes = int(num_classes)

        self._seed = int(seed)
        self._flip = flip
        self._flip_key = keys([self._seed, 2], 1)[0]
        if holdout:
            split = np.random.default_rng([self._seed, 1, 1]).permutation(n)
        else:
            split = np.arange(n)
        self._train_idx = split[: n - holdout]
        self._held_idx = split[n - holdout:]
        self._epoch_cache: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        return int(self._x.shape[2])

    @property
    def channels(self) -> int:
        return int(self._x.shape[1])

    @property
    def files(self) -> list[Path]:
        """The shard files, in the order they were concatenated."""
        return list(self._files)

    @property
    def num_train(self) -> int:
        return int(self._train_idx.size)

    @property
    def num_heldout(self) -> int:
        return int(self._held_idx.size)

    @property
    def flip(self) -> bool:
        return self._flip

    def __len__(self) -> int:
        return int(self._x.shape[0])

    # ------------------------------------------------------------------ streams
    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = self._epoch_cache.get(epoch)
        if order is None:
            perm = np.random.default_rng([self._seed, epoch]).permutation(self.num_train)
            order = self._train_idx[perm]
            if len(self._epoch_cache) >= 4:  # batches touch at most a few epochs in a row
                self._epoch_cache.pop(next(iter(self._epoch_cache)))
            self._epoch_cache[epoch] = order
        return order

    def train_batch(self, step: int, batch_size: int, rank: int = 0,
                    world: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The training batch for ``step``: stream positions ``step*batch_size + [0, B)``;
        ``rank``'s rows ``rank*B/world .. (rank+1)*B/world`` of it when ``world > 1``."""
        idx, pos = stream_indices(step, batch_size, rank, world, self.num_train,
                                  lambda e, off: self._epoch_order(e)[off])
        x = self._x[idx]
        if self._flip:
            f = coin_flips(self._flip_key, pos)
            x[f] = x[f][..., ::-1]
        return x, self._y[idx]

    def heldout(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``min(n, num_heldout)`` examples of the fixed held-out pool."""
        if not _is_int(n) or n < 0:
            raise InputError(f"heldout size n must be a non-negative int, got {n!r}")
        idx = self._held_idx[: int(n)]
        return self._x[idx], self._y[idx]

    def __repr__(self) -> str:
        return (
            f"FolderDataset({len(self._files)} shard(s), N={len(self)}, "
            f"shape={list(self._x.shape[1:])}, num_classes={self._num_classes}, "
            f"seed={self._seed})"
        )


def make_dataset(spec: str | os.PathLike[str], image_size: int | None = None,
                 num_classes: int | None = None, seed: int = 0, holdout: int = 0,
                 flip: bool = False) -> ProceduralDataset | FolderDataset | ShardDataset:
    """``"procedural"`` -> ``ProceduralDataset``; a folder holding ``manifest.json`` (or the
    manifest itself) -> ``ShardDataset`` (``dar prepare``'s output, streamed from disk);
    any other folder or shard file -> ``FolderDataset`` (held in memory).

    For the procedural set ``image_size`` and ``num_classes`` default to 16 and 10, and its
    held-out split is fixed (``holdout`` and ``flip`` must stay 0 / False). A folder
    defines its own image size and labels: if ``image_size`` is given it must match the
    shards (for latents: the latent size, e.g. 32 for 256-pixel images), and
    ``num_classes`` is checked against the labels (``InputError`` otherwise).
    """
    if isinstance(spec, str) and spec == "procedural":
        if holdout or flip:
            raise InputError(
                f"holdout={holdout!r} / flip={flip!r}: the procedural dataset has a fixed "
                "held-out split and no flips; these options apply to folder data"
            )
        return ProceduralDataset(
            image_size=16 if image_size is None else image_size,
            num_classes=10 if num_classes is None else num_classes,
            seed=seed,
        )
    if not os.path.exists(spec):
        raise InputError(
            f"dataset {str(spec)!r} is neither 'procedural' nor an existing path"
        )
    path = Path(spec)
    if path.name == MANIFEST or (path / MANIFEST).is_file():
        ds: FolderDataset | ShardDataset = ShardDataset(
            path, num_classes=num_classes, seed=seed, holdout=holdout, flip=flip)
    else:
        ds = FolderDataset(spec, num_classes=num_classes, seed=seed, holdout=holdout,
                           flip=flip)
    if image_size is not None and image_size != ds.image_size:
        raise InputError(
            f"image_size={image_size!r} was requested but the shards in {str(spec)!r} hold "
            f"{ds.image_size}x{ds.image_size} images"
            + (" (latents)" if getattr(ds, "kind", "") == "latents" else "")
        )
    return ds
