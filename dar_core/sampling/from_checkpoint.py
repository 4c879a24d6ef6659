"""Sampling a checkpoint with any backend: the same noise and labels everywhere.

:class:`SamplingSetup` holds the pieces one run needs (checkpoint, velocity model, the data's
VAE decoder); :func:`sample_checkpoint` (PNG grids, ``dar eval``) and
:mod:`dar_core.sampling.bulk` (``dar sample --num-samples``) both integrate through it."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dar_core.backend import VelocityModel, load_backend
from dar_core.errors import ConfigError, InputError
from dar_core.io.checkpoint import Checkpoint, load_checkpoint, writable_parent
from dar_core.sampling.samplers import function_evaluations, sample
from dar_core.spec.config import ModelConfig


@dataclass
class SamplingSetup:
    """A loaded checkpoint ready to sample: ``integrate`` runs the sampler on one batch,
    ``finish`` checks the result and decodes latents. The velocity model is built on first
    use, so input errors surface before the model is."""

    checkpoint: Checkpoint
    backend: str
    weights: str
    precision: str
    device: Any
    decoder: Callable[[np.ndarray], np.ndarray] | None
    _vm: VelocityModel | None = field(default=None, repr=False)

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def velocity_model(self) -> VelocityModel:
        if self._vm is None:
            self._vm = load_backend(self.backend).velocity_model(
                self.config, self.checkpoint.weights(self.weights), precision=self.precision,
                device=self.device)
        return self._vm

    def integrate(self, noise: np.ndarray, y: np.ndarray, *, sampler: str, steps: int,
                  cfg_scale: float, guidance_interval: tuple[float, float], rng: Any,
                  bar: Any = None) -> np.ndarray:
        """float32 ``[B, C, H, W]`` model-space samples (latents for a latent model) from
        ``noise`` and labels ``y``; ``rng`` feeds the SDE's noise; ``bar`` counts evaluations."""
        vm = self.velocity_model
        velocity = vm.velocity if bar is None else _counted(vm.velocity, bar)
        out = sample(velocity, vm.asarray(np.asarray(noise, np.float32)),
                     vm.asarray(np.asarray(y).astype(np.int64)), sampler=sampler, steps=steps,
                     cfg_scale=cfg_scale, null_class=self.config.null_class,
                     guidance_interval=guidance_interval, rng=rng, asarray=vm.asarray)
        return vm.to_numpy(out).astype(np.float32)

    def finish(self, samples: np.ndarray) -> np.ndarray:
        """Refuse non-finite samples, then decode latents with the data's VAE (if any)."""
        bad = int(samples.size - np.count_nonzero(np.isfinite(samples)))
        if bad:
            raise InputError(f"the samples hold {bad} non-finite values of {samples.size}: the "
                             f"checkpoint's {self.weights} weights or the sampler settings "
                             "diverge")
        return samples if self.decoder is None else self.decoder(samples)


def load_for_sampling(checkpoint: str, *, backend: str = "auto", weights: str = "ema",
                      precision: str = "fp32", device: Any = "auto", decode: bool = True,
                      vae: str | None = None) -> SamplingSetup:
    """Read ``checkpoint`` and, with ``decode``, find its data's VAE decoder (None for pixel
    models); the backend's velocity model is built when first needed."""
    ckpt = load_checkpoint(checkpoint)
    if weights == "ema" and ckpt.ema is None:
        print(f"dar: {checkpoint} holds no EMA weights; sampling its raw weights ('params')",
              file=sys.stderr)
    decoder = None
    if decode:
        from dar_core.io.data.vae import decoder_for_data

        decoder = decoder_for_data(str(ckpt.meta.get("train", {}).get("data", "procedural")),
                                   vae)
    return SamplingSetup(ckpt, backend, weights, precision, device, decoder)


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
    setup = load_for_sampling(checkpoint, backend=backend, weights=weights,
                              precision=precision, device=device, decode=decode, vae=vae)
    cfg = setup.config
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
    chunks = []
    step = batch_size or len(y)
    n_chunks = -(-len(y) // step)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_chunks * function_evaluations(sampler, steps), unit="eval",
                   desc=f"sample {len(y)}", dynamic_ncols=True, file=sys.stderr)
    try:
        for i in range(0, len(y), step):
            chunks.append(setup.integrate(noise[i:i + step], y[i:i + step], sampler=sampler,
                                          steps=steps, cfg_scale=cfg_scale,
                                          guidance_interval=guidance_interval, rng=rng,
                                          bar=bar))
    finally:
        if bar is not None:
            bar.close()
    images = setup.finish(np.concatenate(chunks))
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
