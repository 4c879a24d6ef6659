"""Real photographs for the data tests: tiles of matplotlib's sample image
``grace_hopper.jpg`` (matplotlib is a dependency of the tools extra) laid out as an
ImageFolder, and a tiny randomly initialised diffusers ``AutoencoderKL`` saved with
``save_pretrained`` (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo() -> np.ndarray:
    import matplotlib.cbook as cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        im = Image.open(f)
        im.load()
    return np.asarray(im.convert("RGB"))  # 600 x 512


def make_image_tree(root: Path, tiles: int = 30, odd_files: bool = True) -> Path:
    """3 classes of ``tiles`` JPEG/PNG/WebP tiles (portrait and landscape, 36..102 px); with
    ``odd_files`` also a grayscale, a CMYK and an RGBA image, a broken and a too-small file,
    and 3 files that are not images."""
    pic = photo()
    classes = ["cat", "dog", "eel"]
    for c in classes:
        (root / c).mkdir()
    (root / "dog" / "nested").mkdir()
    for k in range(tiles):
        i, j = divmod(k, 6)
        h, w = 40 + 9 * (k % 7), 36 + 11 * (k % 5)
        tile = Image.fromarray(pic[i * 110:i * 110 + h, j * 80:j * 80 + w])
        folder = root / classes[k % 3] / ("nested" if k % 3 == 1 and k % 2 else "")
        tile.save(folder / f"t{k:02d}.{('jpg', 'png', 'webp')[k % 3]}")
    if not odd_files:
        return root
    crop = Image.fromarray(pic[100:160, 200:270])
    crop.convert("L").save(root / "cat" / "gray.png")
    crop.convert("CMYK").save(root / "dog" / "cmyk.jpg")
    crop.convert("RGBA").save(root / "eel" / "rgba.png")
    (root / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG")
    Image.fromarray(pic[:5, :7]).save(root / "dog" / "tiny.png")
    (root / "eel" / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("not a class")
    (root / ".cache").mkdir()
    return root


def save_tiny_vae(path: Path, sample_size: int) -> Path:
    """A 2-level AutoencoderKL (downsampling 2, 4 latent channels), seeded, saved in ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=sample_size)
    vae.save_pretrained(path)
    return path
