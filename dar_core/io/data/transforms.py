"""Reading one image file for ``dar prepare``: decode, convert to RGB, ADM/DiT center crop.

The crop is the one ADM (guided-diffusion) introduced and DiT/SiT train ImageNet with, so
latents prepared here match the published pipelines:

1. while the short side is at least twice the target, halve the image with a BOX filter
   (cheap, alias-free downscaling of large photographs);
2. resize with BICUBIC so that the short side equals the target (rounding the long side);
3. cut the central ``size x size`` square (offsets rounded down).

Every mode that is not RGB (grayscale ``L``, ``LA``, palette ``P``, ``RGBA``, ``CMYK``,
16-bit, ...) goes through Pillow's ``convert("RGB")`` like those pipelines do (an alpha
channel is dropped, not composited) and is reported by its original mode, so the caller can
count conversions instead of doing them silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")


def center_crop_arr(image, size: int) -> np.ndarray:
    """ADM/DiT center crop of a PIL image to ``uint8 [size, size, 3]`` (see module doc)."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


@dataclass(frozen=True)
class Loaded:
    """One decoded file: ``pixels`` (``uint8 [3, size, size]``) or why it was skipped."""

    pixels: np.ndarray | None
    converted_from: str | None = None  # the original mode of a non-RGB image
    skipped: str | None = None  # "unreadable" or "too_small"
    reason: str = ""


def load_image(path: str | os.PathLike[str], size: int, min_size: int) -> Loaded:
    """Decode ``path``, convert it to RGB and center-crop it to ``size``.

    Never raises for a bad image: an unreadable file (truncated, not an image, a
    decompression bomb) and one whose short side is below ``min_size`` come back as
    ``skipped`` with the reason, for the caller to count and name.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            w, h = im.size
            if min(w, h) < min_size:
                return Loaded(None, skipped="too_small",
                              reason=f"{w}x{h} px, short side below --min-size {min_size}")
            rgb = im if mode == "RGB" else im.convert("RGB")
            arr = center_crop_arr(rgb, size)
    except Exception as e:  # Pillow raises many types for bad files; all mean "unreadable"
        return Loaded(None, skipped="unreadable", reason=f"{type(e).__name__}: {e}")
    return Loaded(np.ascontiguousarray(arr.transpose(2, 0, 1)),
                  converted_from=None if mode == "RGB" else mode)
