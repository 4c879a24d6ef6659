"""Scoring a checkpoint with a fixed sampling protocol, so numbers from different runs compare.

FD, KID and accuracy of a handful of samples are noisy; most of that noise is which starting
noise each image got. The protocol therefore uses **common random numbers**: the labels and
the initial noise are a pure function of ``(seed, num_classes, n_per_class, image shape)``
(:func:`protocol_inputs`), never of the checkpoint, the backend or the step. Two checkpoints
of the same data setup integrate the same noise with the same sampler, the same number of
steps and the same guidance, so the difference between their scores is the difference between
the models, not between draws.

Labels are every class in turn (``0, 1, ..., K-1, 0, 1, ...``), so any prefix is balanced. The
noise is ``default_rng(seed).standard_normal((N, C, H, W), float32)``, handed explicitly to
:func:`dar_core.sampling.from_checkpoint.sample_checkpoint`, which does the sampling in chunks
of 256 (any backend, any sampler; the SDE sampler continues the same generator). The returned
``protocol_id`` hashes labels and noise, so a table of results can check it compares like with
like.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from os import PathLike
from typing import Any

import numpy as np

from dar_core.backend import installed_backends
from dar_core.errors import ConfigError
from dar_core.evaluation.metrics import quality_report
from dar_core.io.checkpoint import read_header
from dar_core.io.data.procedural import IMAGE_SIZES, MAX_CLASSES
from dar_core.sampling.from_checkpoint import sample_checkpoint
from dar_core.spec.config import ModelConfig

PROTOCOL_VERSION = 1


def protocol_inputs(*, seed: int, num_classes: int, n_per_class: int,
                    image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``int64 [N]`` and initial noise ``float32 [N, C, H, W]``, ``N = K * n_per_class``.

    A pure function of its arguments: nothing about a checkpoint enters.
    """
    for name, v, lo in (("seed", seed, 0), ("num_classes", num_classes, 1),
                        ("n_per_class", n_per_class, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
        raise ConfigError(f"image_shape must be (C, H, W) positive ints, got {image_shape!r}")
    n = int(num_classes) * int(n_per_class)
    labels = np.arange(n, dtype=np.int64) % int(num_classes)
    rng = np.random.default_rng(int(seed))
    noise = rng.standard_normal((n, *(int(s) for s in shape)), dtype=np.float32)
    return labels, noise


def protocol_id(labels: np.ndarray, noise: np.ndarray) -> str:
    """Short SHA-256 of the protocol's labels and noise."""
    h = hashlib.sha256(np.ascontiguousarray(labels, np.int64).tobytes())
    h.update(np.ascontiguousarray(noise, np.float32).tobytes())
    return h.hexdigest()[:16]


def _checkpoint_config(checkpoint: str | PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    md = read_header(checkpoint)
    cfg = ModelConfig.from_json(md["config"])
    if cfg.in_channels != 3:
        raise ConfigError(f"the evaluator scores RGB images; this checkpoint has "
                          f"in_channels={cfg.in_channels}")
    if cfg.input_size not in IMAGE_SIZES:
        raise ConfigError(f"there is an evaluator for image sizes {IMAGE_SIZES}; this "
                          f"checkpoint has input_size={cfg.input_size}")
    if cfg.num_classes > MAX_CLASSES:
        raise ConfigError(f"the procedural dataset has {MAX_CLASSES} classes; this "
                          f"checkpoint has num_classes={cfg.num_classes}")
    return cfg, json.loads(md.get("meta", "{}"))


def sample_protocol(
    checkpoint: str | PathLike[str],
    *,
    backend: str = "auto",
    n_per_class: int = 100,
    sampler: str = "heun",
    steps: int = 50,
    cfg_scale: float = 1.0,
    seed: int = 0,
    weights: str = "ema",
    precision: str = "fp32",
    device: str = "auto",
    force: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Samples ``[N, 3, S, S]``, their labels and the protocol fields for ``checkpoint``.

    The evaluator knows the procedural data only: a checkpoint trained on other data is
    refused, or with ``force`` scored with a warning (its numbers then measure how far the
    samples are from the procedural images, not from the model's own data)."""
    cfg, meta = _checkpoint_config(checkpoint)
    data = meta.get("train", {}).get("data", "procedural")
    if data != "procedural":
        msg = (f"checkpoint {str(checkpoint)!r} was trained on data {data!r}, but the evaluator "
               "scores against the procedural dataset")
        if not force:
            raise ConfigError(msg + "; pass --force to score it anyway")
        print(f"warning: {msg}; its scores are not a measure of fit to {data!r}",
              file=sys.stderr)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    labels, noise = protocol_inputs(seed=seed, num_classes=cfg.num_classes,
                                    n_per_class=n_per_class, image_shape=shape)
    if backend == "auto":
        found = installed_backends()
        backend = found[0] if found else backend  # load_backend names the problem
    t0 = time.perf_counter()
    images, y = sample_checkpoint(str(checkpoint), backend=backend, sampler=sampler,
                                  steps=steps, cfg_scale=cfg_scale, labels=labels.tolist(),
                                  weights=weights, seed=seed, precision=precision,
                                  device=device, noise=noise, batch_size=256,
                                  progress=progress)
    if not np.array_equal(np.asarray(y), labels):
        raise AssertionError("sample_checkpoint returned labels other than the protocol's")
    protocol = {
        "checkpoint": str(checkpoint),
        "step": meta.get("step"),
        "backend": backend,
        "protocol_version": PROTOCOL_VERSION,
        "protocol_id": protocol_id(labels, noise),
        "seed": seed,
        "n_per_class": n_per_class,
        "sampler": sampler,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "weights": weights,
        "precision": precision,
        "sample_seconds": round(time.perf_counter() - t0, 3),
    }
    return images, labels, protocol


def evaluate_checkpoint(
    checkpoint: str | PathLike[str],
    *,
    backend: str = "auto",
    n_per_class: int = 100,
    sampler: str = "heun",
    steps: int = 50,
    cfg_scale: float = 1.0,
    seed: int = 0,
    weights: str = "ema",
    precision: str = "fp32",
    device: str = "auto",
    n_reference: int = 2000,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample ``checkpoint`` under the fixed protocol and score the samples.

    Returns :func:`dar_core.evaluation.metrics.quality_report`'s fields (``fd``, ``kid``,
    ``class_accuracy``, ``shape_accuracy``, ``texture_accuracy``, the real-image floors, ...)
    plus the protocol fields (``protocol_id``, ``seed``, ``n_per_class``, ``sampler``,
    ``steps``, ``cfg_scale``, ``weights``, ``backend``, ``checkpoint``, ``step``) and timings.
    """
    images, labels, protocol = sample_protocol(
        checkpoint, backend=backend, n_per_class=n_per_class, sampler=sampler, steps=steps,
        cfg_scale=cfg_scale, seed=seed, weights=weights, precision=precision, device=device,
        force=force, progress=progress)
    cfg, _ = _checkpoint_config(checkpoint)
    t0 = time.perf_counter()
    report = quality_report(images, labels, image_size=cfg.input_size,
                            num_classes=cfg.num_classes, n_reference=n_reference,
                            kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    report["eval_seconds"] = round(time.perf_counter() - t0, 3)
    report.update(protocol)
    return report
