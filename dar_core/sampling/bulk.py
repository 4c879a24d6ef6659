"""Bulk sampling for FID: ``N`` images in ADM's npz format, from one process or many.

Why it is shaped this way:

* **Per-index randomness.** Sample ``i`` gets its initial noise from
  ``default_rng([seed, i, 0])``, its label from ``i % num_classes`` (``balanced``, the default)
  or ``default_rng([seed, i, 1])`` (``random``), and the SDE's noise from
  ``default_rng([seed, i, 2])``, one draw per step (:class:`RowNoise`). No generator is shared
  between images, so the set of images is a function of the settings only, not of the world
  size or of which process sampled which image.
* **Parts.** Indices are cut into parts of ``batch_size`` consecutive images (the last may be
  shorter); part ``k`` is sampled by rank ``k % world`` as one batch. Each part is written
  atomically to ``OUT.parts/part-XXXXXX.npz`` with the hash of the settings; a restarted run
  skips the parts already there and refuses parts of other settings. Because a part is always
  the same batch, 1 and 2 processes compute bit-identical images on the same device.
* **Assembly.** The process that finds every part present after its own work (the last to
  finish) streams them into ``OUT`` (temp file, fsync, rename): ``arr_0`` uint8
  ``[N, H, W, 3]`` NHWC, ``labels`` int64 ``[N]`` and ``settings`` (a 1-element string array
  holding the JSON of every setting that changes FID). No collective is needed, so the same
  code serves torchrun, JAX multi-process and ``mlx.launch``; the output folder must be shared
  by all processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import ConfigError, InputError
from dar_core.io.checkpoint import atomic_file, atomic_write_bytes, read_header, writable_parent
from dar_core.sampling.from_checkpoint import SamplingSetup, load_for_sampling
from dar_core.sampling.samplers import SAMPLERS, function_evaluations

FORMAT = "dar-samples"
VERSION = 1
LABEL_MODES = ("balanced", "random")
PART = "part-{:06d}.npz"


# ---------------------------------------------------------------------------- per-index inputs
def index_noise(seed: int, i: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 initial noise of sample ``i``."""
    return np.random.default_rng([seed, i, 0]).standard_normal(shape, dtype=np.float32)


def index_labels(seed: int, indices: range, num_classes: int, mode: str) -> np.ndarray:
    """int64 labels of samples ``indices``: ``i % num_classes`` or a per-index uniform draw."""
    if mode == "balanced":
        return np.asarray([i % num_classes for i in indices], np.int64)
    if mode == "random":
        return np.asarray([np.random.default_rng([seed, i, 1]).integers(num_classes)
                           for i in indices], np.int64)
    raise ConfigError(f"label mode must be one of {list(LABEL_MODES)}, got {mode!r}")


class RowNoise:
    """Stands in for the SDE sampler's ``rng``: row ``j`` of every draw comes from sample
    ``indices[j]``'s own generator, so an image's noise does not depend on its batch."""

    def __init__(self, seed: int, indices: range) -> None:
        self._gens = [np.random.default_rng([seed, i, 2]) for i in indices]

    def standard_normal(self, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        if not shape or shape[0] != len(self._gens):
            raise InputError(f"RowNoise holds {len(self._gens)} rows, asked for shape "
                             f"{list(shape)}")
        return np.stack([g.standard_normal(tuple(shape[1:]), dtype=dtype) for g in self._gens])


# ---------------------------------------------------------------------------- processes
def rank_world(backend: str, device: Any) -> tuple[int, int, Any]:
    """``(rank, world, device)`` of this process: JAX multi-process through
    ``jax.distributed`` (one local device per process), else the launcher's variables
    (torchrun ``RANK``/``WORLD_SIZE``, ``mlx.launch``); torch's ``auto`` device under torchrun
    is ``cuda:LOCAL_RANK``."""
    from dar_core.train.run import env_rank_world

    if backend == "jax":
        from dar_core.backends.jax.trainer import initialize_distributed

        if initialize_distributed():
            import jax

            return (jax.process_index(), jax.process_count(),
                    jax.local_devices()[0] if device == "auto" else device)
    rank, world = env_rank_world()
    if backend == "torch" and device == "auto" and world > 1:
        from dar_core.backends.torch import resolve_device

        device = str(resolve_device("auto", local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    return rank, world, device


def _resolved_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    from dar_core.backend import installed_backends

    found = installed_backends()
    return found[0] if found else backend  # load_backend names the problem


# ---------------------------------------------------------------------------- settings
def checkpoint_id(checkpoint: str | os.PathLike[str]) -> str:
    """SHA-256 of a checkpoint's header (config, meta, the CRC-32 of every tensor): identifies
    its weights without reading them."""
    md = read_header(checkpoint)
    return hashlib.sha256(json.dumps(md, sort_keys=True).encode()).hexdigest()


def bulk_settings(setup: SamplingSetup, checkpoint: str, *, num_samples: int, batch_size: int,
                  sampler: str, steps: int, cfg_scale: float,
                  guidance_interval: tuple[float, float], seed: int, labels: str) -> dict:
    """Every setting that changes the images (and so FID). ``hash`` covers all of them but
    the checkpoint's path (its identity is ``checkpoint_sha256``)."""
    ck, cfg = setup.checkpoint, setup.config
    ident = getattr(getattr(setup.decoder, "_enc", None), "identity", None)
    s = {
        "format": FORMAT, "version": VERSION,
        "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_id(checkpoint),
        "step": ck.meta.get("step"), "model": cfg.name,
        "weights": "ema" if setup.weights == "ema" and ck.ema is not None else "params",
        "weights_requested": setup.weights,
        "backend": setup.backend, "precision": setup.precision,
        "sampler": sampler, "steps": steps, "nfe": function_evaluations(sampler, steps),
        "cfg_scale": float(cfg_scale), "guidance_interval": [float(v) for v in guidance_interval],
        "seed": seed, "num_samples": num_samples, "batch_size": batch_size, "labels": labels,
        "num_classes": cfg.num_classes,
        "model_shape": [cfg.in_channels, cfg.input_size, cfg.input_size],
        "vae": None if ident is None else {k: ident.get(k) for k in
                                           ("path", "config_sha256", "weights_sha256")},
        "noise": "default_rng([seed, i, 0]); sde: default_rng([seed, i, 2])",
    }
    keyed = {k: v for k, v in s.items() if k != "checkpoint"}
    s["hash"] = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    return s


def describe(s: dict) -> str:
    """One line of the FID-relevant settings."""
    gi = s["guidance_interval"]
    return (f"{s['num_samples']} samples | {s['sampler']} {s['steps']} steps (NFE {s['nfe']}) | "
            f"cfg {s['cfg_scale']:g} on t in [{gi[0]:g}, {gi[1]:g}] | {s['weights']} weights | "
            f"{s['precision']} | seed {s['seed']} | labels {s['labels']} | step {s['step']} | "
            f"checkpoint {s['checkpoint_sha256'][:12]} | vae "
            f"{'none' if s['vae'] is None else (s['vae']['config_sha256'] or '?')[:12]} | "
            f"settings {s['hash']}")


def read_settings(path: str | os.PathLike[str]) -> dict:
    """The settings JSON of a finished npz (``InputError`` if it has none)."""
    with np.load(path) as z:
        if "settings" not in z.files:
            raise InputError(f"{str(path)!r} holds no 'settings' (not written by dar sample)")
        return json.loads(str(z["settings"][0]))


# ---------------------------------------------------------------------------- parts
def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _part_hash(path: Path) -> str:
    try:
        with np.load(path) as z:
            return str(z["settings_hash"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(f"part {str(path)!r} is unreadable ({type(e).__name__}); "
                         "delete it and rerun") from None


def _check_parts(folder: Path, want: str) -> set[int]:
    """Indices of the parts already in ``folder``; ``ConfigError`` for a part of other
    settings."""
    done = set()
    for p in sorted(folder.glob("part-*.npz")):
        got = _part_hash(p)
        if got != want:
            raise ConfigError(f"{str(p)!r} was sampled with other settings (hash {got}, these "
                              f"are {want}); remove {str(folder)!r} or choose another --npz")
        done.add(int(p.stem.split("-")[1]))
    return done


def _write_part(path: Path, images: np.ndarray, labels: np.ndarray, start: int,
                settings_hash: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, arr_0=images, labels=labels, start=np.int64(start),
             settings_hash=np.str_(settings_hash))
    atomic_write_bytes(path, buf.getvalue())


def _npy_entry(zf: zipfile.ZipFile, name: str, dtype: Any, shape: tuple[int, ...]) -> Any:
    f = zf.open(f"{name}.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": shape})
    return f


def assemble(out: Path, settings: dict) -> tuple[int, ...]:
    """Stream every part into ``out`` (one part in memory at a time), then remove the parts;
    returns ``arr_0``'s shape. Raises ``FileNotFoundError`` if another process assembled and
    removed them first."""
    folder, n, b = _parts_dir(out), settings["num_samples"], settings["batch_size"]
    paths = [folder / PART.format(k) for k in range(-(-n // b))]
    with np.load(paths[0]) as z:
        hw3 = tuple(z["arr_0"].shape[1:])
    labels = np.empty(n, np.int64)
    with atomic_file(out) as fobj, zipfile.ZipFile(fobj, "w", zipfile.ZIP_STORED) as zf:
        with _npy_entry(zf, "arr_0", np.uint8, (n, *hw3)) as f:
            for k, p in enumerate(paths):
                with np.load(p) as z:
                    a = z["arr_0"]
                    if (str(z["settings_hash"]) != settings["hash"] or int(z["start"]) != k * b
                            or a.shape != (min(b, n - k * b), *hw3)):
                        raise InputError(f"part {str(p)!r} does not fit these settings")
                    f.write(np.ascontiguousarray(a, np.uint8).tobytes())
                    labels[k * b:k * b + len(a)] = z["labels"]
        with _npy_entry(zf, "labels", np.int64, (n,)) as f:
            f.write(labels.tobytes())
        text = np.asarray([json.dumps(settings, sort_keys=True)])
        with _npy_entry(zf, "settings", text.dtype, (1,)) as f:
            f.write(text.tobytes())
    shutil.rmtree(folder, ignore_errors=True)
    return (n, *hw3)


# ---------------------------------------------------------------------------- the run
def _check_args(num_samples: int, batch_size: int, seed: int, labels: str, sampler: str,
                steps: int, cfg_scale: float) -> None:
    for name, v, lo in (("--num-samples", num_samples, 1), ("--batch-size", batch_size, 1),
                        ("--seed", seed, 0), ("--steps", steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
    if labels not in LABEL_MODES:
        raise ConfigError(f"--class-labels must be one of {list(LABEL_MODES)}, got {labels!r}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if not (isinstance(cfg_scale, (int, float)) and np.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ConfigError(f"--cfg must be a finite number >= 0, got {cfg_scale!r}")


def sample_npz(
    checkpoint: str,
    out: str | os.PathLike[str],
    *,
    num_samples: int,
    batch_size: int = 64,
    backend: str = "auto",
    sampler: str = "heun",
    steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    labels: str = "balanced",
    weights: str = "ema",
    seed: int = 0,
    precision: str = "fp32",
    device: Any = "auto",
    decode: bool = True,
    vae: str | None = None,
    progress: bool = True,
    log: Any = sys.stdout,
) -> dict:
    """Sample this process's share of ``num_samples`` images into parts, and assemble
    ``out`` if every part is then present. Returns a summary (``settings``, ``rank``,
    ``world``, ``sampled``: images this process made, ``seconds``, ``assembled``)."""
    _check_args(num_samples, batch_size, seed, labels, sampler, steps, cfg_scale)
    out = writable_parent(out)
    backend = _resolved_backend(backend)
    rank, world, device = rank_world(backend, device)
    setup = load_for_sampling(checkpoint, backend=backend, weights=weights, precision=precision,
                              device=device, decode=decode, vae=vae)
    cfg = setup.config
    if setup.decoder is None and cfg.in_channels != 3:
        raise ConfigError(f"the npz holds RGB images for the Inception evaluator; this model "
                          f"samples {cfg.in_channels} channels and no VAE decodes them "
                          "(drop --no-decode, or pass --vae for a latent model)")
    s = bulk_settings(setup, checkpoint, num_samples=num_samples, batch_size=batch_size,
                      sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                      guidance_interval=guidance_interval, seed=seed, labels=labels)
    summary = {"settings": s, "rank": rank, "world": world, "sampled": 0, "seconds": 0.0,
               "assembled": False}
    if rank == 0:
        print(f"dar sample: {describe(s)}", file=log)
    if out.exists():
        got = read_settings(out).get("hash")
        if got != s["hash"]:
            raise ConfigError(f"{str(out)!r} exists and was sampled with other settings (hash "
                              f"{got}, these are {s['hash']}); remove it or choose another --npz")
        if rank == 0:
            print(f"dar sample: {out} is already complete", file=log)
        return summary
    folder = _parts_dir(out)
    folder.mkdir(exist_ok=True)
    done = _check_parts(folder, s["hash"])
    n_parts = -(-num_samples // batch_size)
    mine = list(range(rank, n_parts, world))
    todo = [k for k in mine if k not in done]
    size = lambda k: min(batch_size, num_samples - k * batch_size)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(size(k) for k in mine), initial=sum(size(k) for k in mine
                                                                 if k in done),
                   unit="img", desc=f"rank 0/{world}", dynamic_ncols=True, file=sys.stderr)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    t0 = time.perf_counter()
    try:
        for k in todo:
            idx = range(k * batch_size, k * batch_size + size(k))
            noise = np.stack([index_noise(seed, i, shape) for i in idx])
            y = index_labels(seed, idx, cfg.num_classes, labels)
            x = setup.integrate(noise, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                guidance_interval=guidance_interval, rng=RowNoise(seed, idx))
            images = to_rgb_uint8(setup.finish(x))
            _write_part(folder / PART.format(k), images, y, idx.start, s["hash"])
            summary["sampled"] += len(idx)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    summary["seconds"] = time.perf_counter() - t0
    if all((folder / PART.format(k)).exists() for k in range(n_parts)):
        try:
            shape = assemble(out, s)
            summary["assembled"] = True
            print(f"dar sample: wrote {out} (arr_0 uint8 {list(shape)} NHWC, labels, "
                  f"settings {s['hash']})", file=log)
        except FileNotFoundError:  # another process assembled first and removed the parts
            if not out.exists() or read_settings(out).get("hash") != s["hash"]:
                raise
    else:
        print(f"dar sample: rank {rank}/{world} done; the last process to finish writes "
              f"{out}", file=log)
    return summary


def to_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, 3]`` (ADM's layout)."""
    from dar_core.io.images import to_uint8

    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"expected RGB images [B, 3, H, W], got shape {list(images.shape)}")
    return to_uint8(images)


def cmd_sample_npz(args: Any) -> None:
    """``dar sample --num-samples N --npz OUT.npz``."""
    if not args.npz:
        raise ConfigError("--num-samples needs --npz OUT.npz (the ADM-format output)")
    if args.labels:
        raise ConfigError(f"--labels {args.labels!r} is for the PNG grid; with --num-samples "
                          "use --class-labels balanced|random")
    for flag, value in (("--out", args.out), ("--save-npz", args.save_npz)):
        if value:
            raise ConfigError(f"{flag} {value!r} is for the PNG grid; with --num-samples the "
                              "output is --npz")
    r = sample_npz(args.checkpoint, args.npz, num_samples=args.num_samples,
                   batch_size=args.batch_size, backend=args.backend, sampler=args.sampler,
                   steps=args.steps, cfg_scale=args.cfg,
                   guidance_interval=tuple(args.guidance_interval), labels=args.class_labels,
                   weights=args.weights, seed=args.seed, precision=args.precision,
                   device=args.device, decode=args.decode, vae=args.vae)
    if r["sampled"]:
        print(f"dar sample: rank {r['rank']}/{r['world']} sampled {r['sampled']} images in "
              f"{r['seconds']:.1f} s ({r['sampled'] / max(r['seconds'], 1e-9):.2f} img/s)")
