"""Sampling a checkpoint with any backend: the same noise and labels everywhere."""

from __future__ import annotations

import numpy as np

from dar_core.backend import load_backend
from dar_core.checkpoint import load_checkpoint
from dar_core.errors import ConfigError
from dar_core.samplers import sample


def sample_checkpoint(
    checkpoint: str,
    *,
    backend: str = "auto",
    sampler: str = "heun",
    steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    labels: list[int] | None = None,
    per_class: int = 8,
    weights: str = "ema",
    seed: int = 0,
    precision: str = "fp32",
    device: str = "auto",
    png: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, C, H, W]`` (NumPy) and their labels. Noise and SDE noise come from NumPy
    seeded by ``seed``; labels default to every class ``per_class`` times."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    if labels is None:
        y = np.repeat(np.arange(cfg.num_classes), per_class)
        nrow = per_class
    else:
        y = np.asarray(labels, dtype=np.int64)
        bad = [v for v in labels if not 0 <= v <= cfg.num_classes]
        if bad:
            raise ConfigError(f"label {bad[0]} is out of range 0..{cfg.num_classes} "
                              f"({cfg.num_classes} = unconditional)")
        nrow = min(len(y), 8)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(y), cfg.in_channels, cfg.input_size, cfg.input_size),
                                dtype=np.float32)
    vm = load_backend(backend).velocity_model(cfg, ckpt.weights(weights), precision=precision,
                                              device=device)
    out = sample(vm.velocity, vm.asarray(noise), vm.asarray(y.astype(np.int64)), sampler=sampler,
                 steps=steps, cfg_scale=cfg_scale, null_class=cfg.null_class,
                 guidance_interval=guidance_interval, rng=rng, asarray=vm.asarray)
    images = vm.to_numpy(out).astype(np.float32)
    if png:
        from dar_core.images import save_image_grid

        save_image_grid(images, png, nrow=nrow)
    return images, y
