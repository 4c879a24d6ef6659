"""Image grids written to PNG with Pillow (atomic writes)."""

from __future__ import annotations

import io
import os

import numpy as np

from dar_core.errors import InputError
from dar_core.io.checkpoint import atomic_write_bytes


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8 (1-channel images as gray; more
    than 3 channels, e.g. latents, show their first three)."""
    a = np.asarray(images, dtype=np.float32)
    if a.ndim != 4:
        raise InputError(f"images must be [N, C, H, W], got shape {list(a.shape)}")
    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise InputError(f"images hold {bad} non-finite values (NaN/inf) of {a.size}: the model "
                         "or sampler diverged; refusing to paint them as grey")
    a = np.clip((a + 1.0) * 127.5, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a[..., :3] if a.shape[-1] >= 3 else np.concatenate(
        [a, np.zeros(a.shape[:-1] + (3 - a.shape[-1],), np.uint8)], axis=-1)


def make_grid(images: np.ndarray, nrow: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile ``[N, C, H, W]`` images ``nrow`` per row into one ``[H', W', 3]`` uint8 image."""
    a = to_uint8(images)
    if scale > 1:
        a = a.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = a.shape
    ncol = -(-n // nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + c * (w + pad): pad + c * (w + pad) + w] = a[k]
    return grid


def save_image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 8,
                    scale: int | None = None) -> None:
    """Write a PNG grid; small images are upscaled (nearest) to about 64 px for viewing."""
    from PIL import Image

    h = np.asarray(images).shape[-1]
    scale = scale or max(1, 64 // max(h, 1))
    buf = io.BytesIO()
    Image.fromarray(make_grid(images, nrow, scale=scale)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
