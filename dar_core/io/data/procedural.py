"""A procedural class-conditional RGB image dataset, pure NumPy.

Why it looks the way it does:

* Tiny diffusion transformers have to learn it on a laptop CPU in minutes, so a batch is
  drawn with array operations over the whole batch (a loop over shape and texture *values*,
  never over images) and 256 images of 32x32 take a few milliseconds.
* Each class is the product of a **coarse** factor (the shape: large-scale geometry that
  is decided at high noise levels) and a **fine** factor (the texture filling the shape:
  one- or two-pixel detail that is only resolved at low noise levels). A denoiser that
  ignores either end of the noise schedule gets the class visibly wrong, which is what a
  routing study needs.
* Everything else is nuisance: position, size, orientation of the pair, hue, brightness,
  light-on-dark vs dark-on-light polarity, background tint and gradient, texture phase and
  a little pixel noise. A class is therefore a distribution, not one image, while its
  identity stays unambiguous (a small evaluator classifier separates the classes easily).
* Streams are addressed, not consumed: ``train_batch(step, batch_size)`` seeds a fresh
  generator from ``(seed, 0, step)``, so the batch for step k never depends on what came
  before and a resumed run sees exactly the same data. The held-out split lives in a
  disjoint seed domain ``(seed, 1, block)``.

Images are ``float32 [B, 3, H, W]`` in ``[-1, 1]``; labels are ``int64 [B]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from os import PathLike

import numpy as np

from dar_core.errors import ConfigError, InputError

SHAPES: tuple[str, ...] = ("disc", "square", "ring", "triangle", "cross", "pair")
TEXTURES: tuple[str, ...] = ("smooth", "checker", "stripes", "dots")
IMAGE_SIZES: tuple[int, ...] = (16, 32)
MAX_CLASSES = len(SHAPES) * len(TEXTURES)

# Held-out images are generated in blocks of this size, so heldout(n) is a prefix of
# heldout(m) for n < m and each block is drawn once.
_HELDOUT_BLOCK = 256
# Per-pixel Gaussian noise, in [-1, 1] units.
_NOISE_STD = 0.03


def _class_table() -> list[tuple[int, int]]:
    """(shape, texture) index pairs in class order.

    Class ``c`` has shape ``c % S`` and texture ``(c + (c // S)) % T``: a diagonal walk
    through the product grid, so the first ``S`` classes already cover every shape and
    (with ``S >= T``) every texture, and the full table is every pair exactly once
    (``gcd(S + 1, T) == 1``).
    """
    n_s, n_t = len(SHAPES), len(TEXTURES)
    table = [(c % n_s, (c + c // n_s) % n_t) for c in range(n_s * n_t)]
    assert len(set(table)) == n_s * n_t
    return table


_CLASS_TABLE = _class_table()


class Labelled:
    """What every dataset reports besides its images: its class count and its seed."""

    _num_classes: int
    _seed: int

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def seed(self) -> int:
        return self._seed


class ProceduralDataset(Labelled):
    """Procedural shapes x textures; see the module docstring.

    Args:
        image_size: 16 or 32.
        num_classes: 2..MAX_CLASSES (24). Class ``c`` is ``class_names[c]``.
        seed: non-negative int selecting the whole data stream.
    """

    factor_names: tuple[str, ...] = ("shape", "texture")

    def __init__(self, image_size: int = 16, num_classes: int = 10, seed: int = 0) -> None:
        if not _is_int(image_size) or image_size not in IMAGE_SIZES:
            raise ConfigError(
                f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}"
            )
        if not _is_int(num_classes) or not 2 <= num_classes <= MAX_CLASSES:
            raise ConfigError(
                f"num_classes must be an int in [2, {MAX_CLASSES}] "
                f"({len(SHAPES)} shapes x {len(TEXTURES)} textures), got {num_classes!r}"
            )
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        self._image_size = int(image_size)
        self._num_classes = int(num_classes)
        self._seed = int(seed)
        self._factors = np.asarray(_CLASS_TABLE[: self._num_classes], dtype=np.int64)
        self._heldout_blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._grid = _PixelGrid(self._image_size)

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def channels(self) -> int:
        return 3

    @property
    def factor_values(self) -> dict[str, list[str]]:
        return {"shape": list(SHAPES), "texture": list(TEXTURES)}

    @property
    def class_names(self) -> list[str]:
        return [f"{SHAPES[s]}/{TEXTURES[t]}" for s, t in self._factors]

    def class_factors(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """``int64 [B, 2]``: the (shape, texture) value index of each label."""
        return self._factors[self._check_labels(labels)].copy()

    # ------------------------------------------------------------------ drawing
    def sample(self, rng: np.random.Generator, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Draw one image per label with ``rng``: ``float32 [B, 3, H, W]`` in [-1, 1]."""
        if not isinstance(rng, np.random.Generator):
            raise InputError(
                f"rng must be a numpy.random.Generator, got {type(rng).__name__}"
            )
        labels = self._check_labels(labels)
        return _render(rng, self._factors[labels], self._grid)

    def train_batch(self, step: int, batch_size: int, rank: int = 0,
                    world: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The training batch for ``step``: a pure function of (seed, step, batch_size);
        ``rank``'s rows ``rank*B/world .. (rank+1)*B/world`` of it when ``world > 1`` (the
        whole batch is drawn: its images share one generator)."""
        _check_step(step, batch_size)
        rows = rank_rows(batch_size, rank, world)
        rng = np.random.default_rng([self._seed, 0, int(step)])
        y = rng.integers(0, self._num_classes, size=int(batch_size), dtype=np.int64)
        x = self.sample(rng, y)
        if world == 1:
            return x, y
        return np.ascontiguousarray(x[rows]), y[rows]

    def heldout(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` held-out images with balanced labels ``i % num_classes``.

        Drawn from the seed domain ``(seed, 1, block)``, disjoint from training. The split
        is fixed: ``heldout(n)`` is a prefix of ``heldout(m)`` for ``n <= m``. Blocks are
        cached, and copies are returned.
        """
        if not _is_int(n) or n < 0:
            raise InputError(f"heldout size n must be a non-negative int, got {n!r}")
        n_blocks = -(-int(n) // _HELDOUT_BLOCK)
        xs, ys = [], []
        for b in range(n_blocks):
            if b not in self._heldout_blocks:
                rng = np.random.default_rng([self._seed, 1, b])
                start = b * _HELDOUT_BLOCK
                y = np.arange(start, start + _HELDOUT_BLOCK, dtype=np.int64) % self._num_classes
                self._heldout_blocks[b] = (self.sample(rng, y), y)
            xs.append(self._heldout_blocks[b][0])
            ys.append(self._heldout_blocks[b][1])
        if not xs:
            size = self._image_size
            return np.zeros((0, 3, size, size), np.float32), np.zeros((0,), np.int64)
        return np.concatenate(xs)[:n], np.concatenate(ys)[:n]

    # ------------------------------------------------------------------ helpers
    def _check_labels(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(labels)
        if arr.ndim != 1:
            raise InputError(f"labels must be a 1-D array, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"labels must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        bad = arr[(arr < 0) | (arr >= self._num_classes)]
        if bad.size:
            raise InputError(
                f"label {int(bad[0])} is out of range [0, {self._num_classes})"
            )
        return arr

    def __repr__(self) -> str:
        return (
            f"ProceduralDataset(image_size={self._image_size}, "
            f"num_classes={self._num_classes}, seed={self._seed})"
        )


# ---------------------------------------------------------------------- rendering
class _PixelGrid:
    """Pixel-centre coordinates in [-1, 1] and integer texture cells for one image size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.px = 2.0 / size  # width of one pixel in normalised units
        c = ((np.arange(size, dtype=np.float32) + 0.5) * self.px - 1.0).astype(np.float32)
        self.x = c[None, None, :]  # [1, 1, W]
        self.y = c[None, :, None]  # [1, H, 1]
        # Texture cells are one pixel at 16 px and two at 32 px, so a 32 px image is a
        # sharper rendering of the same scene rather than a different texture scale.
        cell = max(1, size // 16)
        idx = np.arange(size, dtype=np.int64) // cell
        self.ix = idx[None, None, :]
        self.iy = idx[None, :, None]


def _rgb(lum: np.ndarray, hue: np.ndarray, sat: np.ndarray) -> np.ndarray:
    """[n] luminance/hue/saturation -> [n, 3] colours in [0, 1] (a hue wheel around grey)."""
    phase = hue[:, None] + np.array([0.0, 2.0, 4.0], np.float32) * (math.pi / 3.0)
    return np.clip(lum[:, None] + sat[:, None] * np.cos(phase), 0.0, 1.0).astype(np.float32)


def _shape_sdf(shape: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray,
               ang: np.ndarray) -> np.ndarray:
    """Signed distance (normalised units, < 0 inside) of one shape; params are [n, 1, 1]."""
    name = SHAPES[shape]
    if name == "disc":
        # Filled circle.
        return np.sqrt(dx * dx + dy * dy) - r
    if name == "square":
        # Axis-aligned square, side chosen so its area is close to the disc's.
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.86 * r
    if name == "ring":
        # Thick annulus: a band of width 0.5 r around radius 0.8 r, hole of radius 0.55 r.
        return np.abs(np.sqrt(dx * dx + dy * dy) - 0.8 * r) - 0.25 * r
    if name == "triangle":
        # Upward equilateral triangle as the intersection of three half-planes (outward
        # normals down, up-left, up-right; image y grows downwards), centroid at the centre.
        inr = 0.6 * r
        d = np.maximum(dy, 0.866 * np.abs(dx) - 0.5 * dy)
        return d - inr
    if name == "cross":
        # Plus sign: union of a horizontal and a vertical bar.
        arm, half = 1.0 * r, 0.36 * r
        h = np.maximum(np.abs(dx) - arm, np.abs(dy) - half)
        v = np.maximum(np.abs(dy) - arm, np.abs(dx) - half)
        return np.minimum(h, v)
    if name == "pair":
        # Two separated blobs along a random axis (the axis angle is nuisance).
        off, rad = 0.66 * r, 0.5 * r
        ox, oy = off * np.cos(ang), off * np.sin(ang)
        d1 = np.sqrt((dx - ox) ** 2 + (dy - oy) ** 2)
        d2 = np.sqrt((dx + ox) ** 2 + (dy + oy) ** 2)
        return np.minimum(d1, d2) - rad
    raise AssertionError(name)


def _texture(texture: int, grid: _PixelGrid, phx: np.ndarray, phy: np.ndarray,
             dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Weight of the *primary* fill colour, [n, H, W] in [0, 1]; the rest is secondary."""
    name = TEXTURES[texture]
    if name == "smooth":
        # Flat primary fill with a faint radial shading: no high frequencies at all.
        return 1.0 - 0.15 * np.minimum(np.sqrt(dx * dx + dy * dy), 1.0)
    ix, iy = grid.ix + phx, grid.iy + phy
    if name == "checker":
        # One-cell checkerboard (the highest frequency in both directions).
        return ((ix + iy) % 2).astype(np.float32)
    if name == "stripes":
        # One-cell horizontal stripes: high frequency vertically, none horizontally.
        return (iy % 2 + 0 * ix).astype(np.float32)
    if name == "dots":
        # Sparse primary dots on a secondary fill, one per 3x3 cells.
        return ((ix % 3 == 0) & (iy % 3 == 0)).astype(np.float32)
    raise AssertionError(name)


def _render(rng: np.random.Generator, factors: np.ndarray, grid: _PixelGrid) -> np.ndarray:
    """Render images for ``factors`` [B, 2] (shape, texture). Draw order is fixed."""
    b = factors.shape[0]
    size = grid.size
    f32 = np.float32

    # --- nuisance parameters, all drawn for the whole batch in a fixed order
    u = rng.random((b, 16), dtype=f32)
    cx = (u[:, 0] - 0.5) * 0.3  # centre jitter: +-0.15 of the half-width
    cy = (u[:, 1] - 0.5) * 0.3
    r = 0.55 + 0.17 * u[:, 2]  # size jitter
    ang = u[:, 3] * f32(math.pi)  # pair axis
    light_on_dark = u[:, 4] < 0.5  # polarity
    fg_lum = np.where(light_on_dark, 0.72 + 0.25 * u[:, 5], 0.04 + 0.22 * u[:, 5])
    sec_lum = np.where(light_on_dark, 0.40 + 0.08 * u[:, 6], 0.52 + 0.08 * u[:, 6])
    bg_lum = np.where(light_on_dark, 0.02 + 0.18 * u[:, 7], 0.80 + 0.17 * u[:, 7])
    fg_hue = u[:, 8] * f32(2 * math.pi)
    bg_hue = u[:, 9] * f32(2 * math.pi)
    fg_sat = 0.08 + 0.16 * u[:, 10]
    bg_sat = 0.03 + 0.08 * u[:, 11]
    grad_ang = u[:, 12] * f32(2 * math.pi)
    grad_amp = 0.08 * u[:, 13]
    period = 6
    ph = rng.integers(0, period, size=(b, 2))
    noise = rng.standard_normal((b, 3, size, size), dtype=f32)

    primary = _rgb(fg_lum, fg_hue, fg_sat)  # [B, 3]
    secondary = _rgb(sec_lum, fg_hue, 0.7 * fg_sat)
    background = _rgb(bg_lum, bg_hue, bg_sat)

    # --- per-pixel shape coverage (antialiased) and primary-colour weight
    alpha = np.empty((b, size, size), f32)
    weight = np.empty((b, size, size), f32)
    col = lambda v, idx: v[idx][:, None, None]  # [n] -> [n, 1, 1]
    for s in range(len(SHAPES)):
        idx = np.flatnonzero(factors[:, 0] == s)
        if idx.size:
            dx, dy = grid.x - col(cx, idx), grid.y - col(cy, idx)
            sdf = _shape_sdf(s, dx, dy, col(r, idx), col(ang, idx))
            alpha[idx] = np.clip(0.5 - sdf / grid.px, 0.0, 1.0)
    for t in range(len(TEXTURES)):
        idx = np.flatnonzero(factors[:, 1] == t)
        if idx.size:
            dx, dy = grid.x - col(cx, idx), grid.y - col(cy, idx)
            weight[idx] = _texture(t, grid, ph[idx, 0][:, None, None],
                                   ph[idx, 1][:, None, None], dx, dy)

    # --- composite: tinted background with a faint linear gradient, then the shape
    ramp = np.cos(grad_ang)[:, None, None] * grid.x + np.sin(grad_ang)[:, None, None] * grid.y
    bg = background[:, :, None, None] + (grad_amp[:, None, None] * ramp)[:, None]
    w = weight[:, None]
    fill = secondary[:, :, None, None] + w * (primary - secondary)[:, :, None, None]
    a = alpha[:, None]
    img = bg + a * (fill - bg)
    img = img * 2.0 - 1.0 + _NOISE_STD * noise
    return np.clip(img, -1.0, 1.0).astype(f32, copy=False)


# ---------------------------------------------------------------------- utilities
def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_step(step: object, batch_size: object) -> None:
    if not _is_int(step) or step < 0:
        raise InputError(f"step must be a non-negative int, got {step!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")


def rank_rows(batch_size: int, rank: object, world: object) -> slice:
    """The rows ``rank * b .. (rank + 1) * b`` (``b = batch_size / world``) of a global batch
    that data-parallel rank ``rank`` of ``world`` trains on."""
    if not _is_int(world) or world < 1 or not _is_int(rank) or not 0 <= rank < world:
        raise InputError(f"rank must be an int in [0, world) and world an int >= 1, got "
                         f"rank={rank!r} world={world!r}")
    if batch_size % world:
        raise InputError(f"batch_size={batch_size} is not divisible by the world size {world}")
    b = int(batch_size) // int(world)
    return slice(int(rank) * b, (int(rank) + 1) * b)


def stream_indices(step: int, batch_size: int, rank: int, world: int, num_train: int,
                   order: Callable[[int, np.ndarray], np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(example indices, stream positions)`` of ``rank``'s rows of the training batch at
    ``step``: positions ``step*batch_size + rank_rows``, wrapping across epochs of
    ``num_train`` examples; ``order(epoch, offsets)`` maps offsets within an epoch to examples
    (the folder and shard datasets' per-epoch shuffles)."""
    _check_step(step, batch_size)
    rows = rank_rows(batch_size, rank, world)
    pos = int(step) * int(batch_size) + np.arange(rows.start, rows.stop, dtype=np.int64)
    epochs, offsets = np.divmod(pos, num_train)
    idx = np.empty(pos.size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        idx[sel] = order(int(e), offsets[sel])
    return idx, pos


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> ``uint8 [B, H, W, 3]``."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
    return x.astype(np.uint8).transpose(0, 2, 3, 1)


def save_class_grid(dataset: ProceduralDataset, path: str | PathLike[str],
                    per_class: int = 8, scale: int = 4) -> None:
    """Write a PNG grid: one row per class, ``per_class`` samples each, nearest x``scale``."""
    from PIL import Image  # optional dependency, only needed for pictures

    if not _is_int(per_class) or per_class < 1:
        raise InputError(f"per_class must be a positive int, got {per_class!r}")
    rng = np.random.default_rng([dataset.seed, 2])
    labels = np.repeat(np.arange(dataset.num_classes), per_class)
    tiles = to_uint8(dataset.sample(rng, labels))
    s, gap = dataset.image_size, 1
    rows, cols = dataset.num_classes, per_class
    canvas = np.full((rows * (s + gap) + gap, cols * (s + gap) + gap, 3), 128, np.uint8)
    for k, (i, j) in enumerate(itertools.product(range(rows), range(cols))):
        y0, x0 = gap + i * (s + gap), gap + j * (s + gap)
        canvas[y0:y0 + s, x0:x0 + s] = tiles[k]
    img = Image.fromarray(canvas).resize(
        (canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST
    )
    img.save(path)
