"""Sampling a checkpoint with any backend: the same noise and labels everywhere."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from dar_core.backend import load_backend
from dar_core.errors import ConfigError, InputError
from dar_core.io.checkpoint import load_checkpoint, writable_parent
from dar_core.sampling.samplers import function_evaluations, sample


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
    noise: np.ndarray | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    decode: bool = True,
    vae: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, C, H, W]`` (NumPy) and their labels. Labels default to every class
    ``per_class`` times. The initial noise is ``noise`` when given, else drawn from
    ``default_rng(seed)``; the SDE's noise continues that generator. ``batch_size`` splits the
    work into chunks of that many samples (each chunk continues the same generator).
    ``progress`` shows a bar over the network evaluations on stderr. A model trained on
    ``dar prepare`` latents samples latents; with ``decode`` they are decoded to images by the
    VAE the data's manifest names (``vae``: that VAE's path on this machine)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"per_class must be a positive integer, got {per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ConfigError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if labels is not None and len(labels) == 0:
        raise ConfigError("labels is empty: give at least one label, or none for every class")
    if png:
        writable_parent(png)  # before the sampling, not after it
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    decoder = None
    if decode:
        from dar_core.io.data.vae import decoder_for_data

        decoder = decoder_for_data(str(ckpt.meta.get("train", {}).get("data", "procedural")),
                                   vae)
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
    shape = (len(y), cfg.in_channels, cfg.input_size, cfg.input_size)
    drawn = rng.standard_normal(shape, dtype=np.float32)
    if noise is not None:
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise ConfigError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
    else:
        noise = drawn
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    vm = load_backend(backend).velocity_model(cfg, ckpt.weights(weights), precision=precision,
                                              device=device)
    chunks = []
    step = batch_size or len(y)
    n_chunks = -(-len(y) // step)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_chunks * function_evaluations(sampler, steps), unit="eval",
                   desc=f"sample {len(y)}", dynamic_ncols=True, file=sys.stderr)
    velocity = vm.velocity if bar is None else _counted(vm.velocity, bar)
    try:
        for i in range(0, len(y), step):
            out = sample(velocity, vm.asarray(noise[i:i + step]),
                         vm.asarray(y[i:i + step].astype(np.int64)), sampler=sampler,
                         steps=steps, cfg_scale=cfg_scale, null_class=cfg.null_class,
                         guidance_interval=guidance_interval, rng=rng, asarray=vm.asarray)
            chunks.append(vm.to_numpy(out).astype(np.float32))
    finally:
        if bar is not None:
            bar.close()
    images = np.concatenate(chunks)
    bad = int(images.size - np.count_nonzero(np.isfinite(images)))
    if bad:
        raise InputError(f"the samples hold {bad} non-finite values of {images.size}: the "
                         f"checkpoint's {weights} weights or the sampler settings diverge")
    if decoder is not None:
        images = decoder(images)
    if png:
        from dar_core.io.images import save_image_grid

        save_image_grid(images, png, nrow=nrow)
    return images, y


def _counted(velocity: Callable[[Any, float, Any], Any], bar: Any) -> Callable:
    """``velocity`` that advances the progress ``bar`` by one per call."""
    def counted(x: Any, t: float, y: Any) -> Any:
        out = velocity(x, t, y)
        bar.update(1)
        return out

    return counted
