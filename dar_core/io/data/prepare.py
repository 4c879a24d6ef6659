"""``dar prepare``: an ImageFolder tree -> fixed-size shards of pixels or VAE latents.

Layout in: ``IMAGES/<class>/**/<file>.{jpg,jpeg,png,webp}``; classes are the sorted names of
the (non-hidden) subfolders, label ``i`` is the ``i``-th. Out: ``shard-00000.safetensors``
... (tensors ``x`` ``[n, C, H, W]``: ``uint8`` pixels, or ``float16`` latents times the VAE
scale factor; ``y`` ``int64 [n]``; with ``--flip --vae`` also ``x_flip``, the encoding of
each mirrored image) and ``manifest.json`` (see ``_manifest``), which ``ShardDataset`` and
``make_dataset`` read.

How the work is split, so that it is resumable and runs on any number of processes with no
coordination:

* the sorted list of image files (class, then path) is cut into **shards of
  ``--shard-size`` files**: shard ``k`` holds the usable images among files
  ``k*S .. (k+1)*S - 1`` (its count is lower by the files skipped in it);
* under ``torchrun`` (``RANK``/``WORLD_SIZE``) rank ``r`` makes the shards with
  ``k % WORLD_SIZE == r``;
* each shard is written atomically (temp file, fsync, rename) with, in its metadata, a hash
  of everything that decides its content (the file list with sizes and mtimes, image size,
  minimum size, shard size, the VAE's config and weights, flip): the **plan**. A shard that
  exists with this plan is done: a killed run continues at the next unfinished shard;
* after its own shards each process looks at all of them; the one that finds them all
  complete writes ``manifest.json`` (atomically; two writers would write the same bytes).
  Each process writes its shards before it looks, so the last to finish always sees them
  all. Where a shared file system is slow to show other machines' files, running
  ``dar prepare`` once more with the same arguments writes the manifest from the shards.

Images that are not RGB are converted and counted by mode; unreadable files and images whose
short side is below ``--min-size`` (default ``image_size // 8``) are skipped, counted, and
named (the first few on stderr, all in the shards' metadata, the first 20 in the manifest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import ConfigError, InputError
from dar_core.io.checkpoint import atomic_write_bytes, writable_folder
from dar_core.io.data.shards import FORMAT, MANIFEST, VERSION
from dar_core.io.data.st_format import read_header, write_safetensors
from dar_core.io.data.transforms import IMAGE_EXTENSIONS, load_image

SHARD_NAME = "shard-{:05d}.safetensors"
CROP = "adm-center-crop: BOX halving while short side >= 2x, BICUBIC to size, center crop"
WARN_FIRST = 10  # skipped files named on stderr (per process); the manifest names 20
MANIFEST_FIRST = 20


@dataclass(frozen=True)
class PrepareConfig:
    images: str
    out: str
    image_size: int = 256
    vae: str | None = None
    flip: bool = False
    shard_size: int = 4096
    batch_size: int = 32
    min_size: int | None = None  # default image_size // 8 (at least 1)
    workers: int = 4
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for f in ("image_size", "shard_size", "batch_size", "workers"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{f.replace('_', '-')} must be a positive integer, "
                                  f"got {v!r}")
        if self.min_size is not None and (not isinstance(self.min_size, int)
                                          or self.min_size < 1):
            raise ConfigError(f"--min-size must be a positive integer, got {self.min_size!r}")
        if self.flip and not self.vae:
            raise ConfigError("--flip stores the VAE encoding of every mirrored image and "
                              "needs --vae; pixel shards are mirrored exactly by the loader "
                              "(ShardDataset(flip=True))")

    @property
    def min_side(self) -> int:
        return self.min_size if self.min_size is not None else max(1, self.image_size // 8)


@dataclass(frozen=True)
class Source:
    root: Path
    classes: list[str]
    files: list[tuple[str, int]]  # (path relative to root, label), class then path order
    sha256: str
    ignored: list[str]


def list_source(images: str | os.PathLike[str]) -> Source:
    """The class folders and image files of an ImageFolder tree, and their checksum."""
    root = Path(images)
    if not root.is_dir():
        raise InputError(f"--images {str(root)!r} is not a folder (expected one subfolder "
                         "of images per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"--images {str(root)!r} has no class subfolders (expected "
                         "IMAGES/<class>/<image>.jpg, ImageFolder layout)")
    ignored = sorted(p.name for p in root.iterdir() if p.name not in classes)
    files: list[tuple[str, int]] = []
    h = hashlib.sha256()
    for label, name in enumerate(classes):
        found = 0
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                rel = Path(dirpath, fn).relative_to(root).as_posix()
                if fn.startswith(".") or Path(fn).suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored.append(rel)
                    continue
                st = os.stat(root / rel)
                h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
                files.append((rel, label))
                found += 1
        if not found:
            raise InputError(f"class folder {str(root / name)!r} holds no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    return Source(root, classes, files, h.hexdigest(), ignored)


def _plan_key(cfg: PrepareConfig, source: Source, vae: dict[str, Any] | None) -> str:
    decisive = {
        "format": FORMAT, "version": VERSION, "source": source.sha256,
        "classes": source.classes, "image_size": cfg.image_size, "min_size": cfg.min_side,
        "shard_size": cfg.shard_size, "flip": cfg.flip, "crop": CROP,
        "vae": None if vae is None else {k: vae[k] for k in ("config_sha256", "weights_sha256",
                                                              "posterior")},
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def _shard_meta(path: Path) -> dict[str, Any] | None:
    """The ``dar_shard`` metadata of a shard file, or None if it is unreadable."""
    try:
        return json.loads(read_header(path).metadata["dar_shard"])
    except (InputError, KeyError, ValueError):
        return None


def env_rank_world() -> tuple[int, int]:
    """``RANK``/``WORLD_SIZE`` as torchrun sets them; (0, 1) when absent."""
    r, w = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if r is None and w is None:
        return 0, 1
    try:
        rank, world = int(r or ""), int(w or "")
    except ValueError:
        raise ConfigError(f"RANK={r!r} and WORLD_SIZE={w!r} must both be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world


class _Notes:
    """Names the first few skipped files on stderr."""

    def __init__(self, rank: int, world: int, bar: Any) -> None:
        self.n = 0
        self.prefix = f"rank {rank}: " if world > 1 else ""
        self.bar = bar

    def _say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)  # above the progress bar, not through it
        else:
            print(msg, file=sys.stderr)

    def skipped(self, rel: str, kind: str, reason: str) -> None:
        self.n += 1
        if self.n <= WARN_FIRST:
            self._say(f"warning: {self.prefix}skipping {rel}: {kind.replace('_', ' ')} "
                      f"({reason})")
        elif self.n == WARN_FIRST + 1:
            self._say(f"warning: {self.prefix}more files skipped; the manifest counts them all")


def _make_shard(k: int, cfg: PrepareConfig, source: Source, encoder: Any, key: str,
                shape: tuple[int, ...], dtype: np.dtype, pool: ThreadPoolExecutor,
                bar: Any, notes: _Notes) -> None:
    first = k * cfg.shard_size
    chunk = source.files[first:first + cfg.shard_size]
    xs, xfs, ys = [], [], []
    converted: Counter[str] = Counter()
    skipped: dict[str, list[list[str]]] = {"unreadable": [], "too_small": []}
    for b in range(0, len(chunk), cfg.batch_size):
        batch = chunk[b:b + cfg.batch_size]
        loaded = list(pool.map(
            lambda f: load_image(source.root / f[0], cfg.image_size, cfg.min_side), batch))
        good = []
        for (rel, label), r in zip(batch, loaded):
            if r.pixels is None:
                skipped[r.skipped].append([rel, r.reason])
                notes.skipped(rel, r.skipped, r.reason)
                continue
            if r.converted_from:
                converted[r.converted_from] += 1
            good.append(r.pixels)
            ys.append(label)
        if good:
            px = np.stack(good)
            if encoder is None:
                xs.append(px)
            else:
                xs.append(encoder.encode(px))
                if cfg.flip:
                    xfs.append(encoder.encode(np.ascontiguousarray(px[..., ::-1])))
        if bar is not None:
            bar.update(len(batch))
    tensors = {"x": np.concatenate(xs) if xs else np.zeros((0, *shape), dtype)}
    if cfg.flip:
        tensors["x_flip"] = np.concatenate(xfs) if xfs else np.zeros((0, *shape), dtype)
    for name in tensors:
        if encoder is not None and not np.isfinite(tensors[name]).all():
            raise InputError(f"the VAE produced non-finite latents ({name}) for shard {k} "
                             f"(files {chunk[0][0]} .. {chunk[-1][0]}); is the VAE "
                             "folder's weight file damaged?")
    tensors["y"] = np.asarray(ys, dtype=np.int64)
    meta = {"plan": key, "index": k, "first_file": first, "files": len(chunk),
            "count": len(ys), "converted": dict(sorted(converted.items())), "skipped": skipped}
    write_safetensors(Path(cfg.out) / SHARD_NAME.format(k), tensors,
                      {"dar_shard": json.dumps(meta)})


def _check_existing(cfg: PrepareConfig, out: Path, key: str, num_shards: int, mine: list[int],
                    rank: int, world: int) -> list[int]:
    """The shards of this process still to make; conflicting files are an error (or, with
    ``--overwrite``, replaced). Removes this process's orphaned temp files."""
    for tmp in out.glob(".shard-*.safetensors.*.tmp"):
        try:
            k = int(tmp.name.split(".")[1].split("-")[1])
        except (IndexError, ValueError):
            continue
        if k % world == rank:
            tmp.unlink(missing_ok=True)
    todo = []
    for k in mine:
        path = out / SHARD_NAME.format(k)
        if not path.exists():
            todo.append(k)
            continue
        meta = _shard_meta(path)
        if meta is not None and meta.get("plan") == key and meta.get("index") == k:
            continue
        if not cfg.overwrite:
            raise InputError(f"{path} was written by another preparation (other images, image "
                             "size, VAE, flip or shard size); pass --overwrite to replace it, "
                             "or choose another --out")
        todo.append(k)
    for path in out.glob("shard-*.safetensors"):
        try:
            k = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if k >= num_shards and k % world == rank:
            if not cfg.overwrite:
                raise InputError(f"{path} is beyond this preparation's {num_shards} shards "
                                 "(left by another one); pass --overwrite to remove it")
            path.unlink()
    return todo


def _manifest(cfg: PrepareConfig, out: Path, source: Source, key: str, shape: tuple[int, ...],
              dtype: np.dtype, vae: dict[str, Any] | None, num_shards: int
              ) -> dict[str, Any] | None:
    """The manifest if every shard of the plan exists, else None."""
    metas = []
    for k in range(num_shards):
        meta = _shard_meta(out / SHARD_NAME.format(k))
        if meta is None or meta.get("plan") != key:
            return None
        metas.append(meta)
    converted: Counter[str] = Counter()
    skipped: dict[str, list[str]] = {"unreadable": [], "too_small": []}
    for meta in metas:
        converted.update(meta["converted"])
        for kind, items in meta["skipped"].items():
            skipped[kind] += [rel for rel, _ in items]
    latent = vae is not None
    return {
        "format": FORMAT, "version": VERSION, "plan": key,
        "kind": "latents" if latent else "pixels",
        "count": sum(m["count"] for m in metas), "shape": list(shape), "dtype": dtype.name,
        "image_size": cfg.image_size, "crop": CROP, "min_size": cfg.min_side,
        "latent_scale": vae["scaling_factor"] if latent else None,
        "latent_shift": vae["shift_factor"] if latent else None,
        "vae": vae, "flip_stored": cfg.flip,
        "num_classes": len(source.classes), "classes": source.classes,
        "label_map": {name: i for i, name in enumerate(source.classes)},
        "source": {"root": str(source.root.resolve()), "files": len(source.files),
                   "sha256": source.sha256,
                   "checksum_of": "relative path, size and mtime_ns of every image file"},
        "converted_to_rgb": {"count": sum(converted.values()),
                             "by_mode": dict(sorted(converted.items()))},
        "skipped": {kind: {"count": len(v), "first": v[:MANIFEST_FIRST]}
                    for kind, v in skipped.items()},
        "ignored": {"count": len(source.ignored), "first": source.ignored[:MANIFEST_FIRST]},
        "shard_size": cfg.shard_size,
        "shards": [{"file": SHARD_NAME.format(m["index"]), "count": m["count"],
                    "first_file": m["first_file"], "files": m["files"]} for m in metas],
    }


def prepare(cfg: PrepareConfig, rank: int | None = None, world: int | None = None
            ) -> dict[str, Any]:
    """Make this process's shards, then the manifest if all shards exist.

    Returns ``{"manifest": dict or None, "written": [k...], "reused": n, "rank", "world"}``.
    """
    if rank is None or world is None:
        rank, world = env_rank_world()
    source = list_source(cfg.images)
    out = writable_folder(cfg.out, "--out folder", InputError)
    encoder = None
    if cfg.vae:
        from dar_core.io.data.vae import VAEEncoder

        encoder = VAEEncoder(cfg.vae, cfg.device)
        shape, dtype, vae = encoder.latent_shape(cfg.image_size), np.dtype(np.float16), \
            encoder.identity
    else:
        shape, dtype, vae = (3, cfg.image_size, cfg.image_size), np.dtype(np.uint8), None
    key = _plan_key(cfg, source, vae)
    num_shards = -(-len(source.files) // cfg.shard_size)

    mpath = out / MANIFEST
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text()).get("plan")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != key:
            if not cfg.overwrite:
                raise InputError(f"{mpath} describes another preparation (other images, image "
                                 "size, VAE, flip or shard size); pass --overwrite to replace "
                                 "it, or choose another --out")
            mpath.unlink(missing_ok=True)

    mine = list(range(rank, num_shards, world))
    todo = _check_existing(cfg, out, key, num_shards, mine, rank, world)
    bar = None
    if todo and cfg.progress:
        from tqdm.auto import tqdm

        total = sum(len(source.files[k * cfg.shard_size:(k + 1) * cfg.shard_size])
                    for k in todo)
        bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr,
                   desc="prepare" + (f" rank {rank}" if world > 1 else ""))
    notes = _Notes(rank, world, bar)
    try:
        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            for k in todo:
                _make_shard(k, cfg, source, encoder, key, shape, dtype, pool, bar, notes)
    finally:
        if bar is not None:
            bar.close()
    manifest = _manifest(cfg, out, source, key, shape, dtype, vae, num_shards)
    if manifest is not None:
        data = json.dumps(manifest, indent=1).encode()
        if not mpath.exists() or mpath.read_bytes() != data:
            atomic_write_bytes(mpath, data)
    return {"manifest": manifest, "written": todo, "reused": len(mine) - len(todo),
            "rank": rank, "world": world, "num_shards": num_shards, "out": str(out)}


def summary(result: dict[str, Any]) -> str:
    """One line saying what was made, converted, skipped and ignored."""
    m = result["manifest"]
    if m is None:
        return (f"rank {result['rank']}: wrote {len(result['written'])} shard(s), "
                f"{result['reused']} already done; shards of other ranks are still missing, "
                "the last rank to finish writes the manifest")
    what = (f"latents {m['dtype']} {m['shape']} (scale {m['latent_scale']})"
            if m["kind"] == "latents" else f"pixels {m['dtype']} {m['shape']}")
    parts = [f"{m['count']} examples of {m['num_classes']} classes, {what}, in "
             f"{len(m['shards'])} shard(s) at {result['out']}"]
    conv = m["converted_to_rgb"]
    if conv["count"]:
        modes = ", ".join(f"{n} {mode}" for mode, n in conv["by_mode"].items())
        parts.append(f"converted to RGB: {conv['count']} ({modes})")
    for kind, s in m["skipped"].items():
        if s["count"]:
            more = " ..." if s["count"] > len(s["first"][:3]) else ""
            parts.append(f"skipped {s['count']} {kind.replace('_', ' ')} "
                         f"({', '.join(s['first'][:3])}{more})")
    if m["ignored"]["count"]:
        parts.append(f"ignored {m['ignored']['count']} non-image file(s) "
                     f"({', '.join(m['ignored']['first'][:3])})")
    return "; ".join(parts)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """``dar prepare``'s flags (the fields of ``PrepareConfig``)."""
    p = sub.add_parser("prepare", help="an ImageFolder tree -> shards of pixels or VAE "
                                       "latents with a manifest (the input of --data)")
    p.add_argument("--images", required=True, help="IMAGES/<class>/<image>.{jpg,png,webp}")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--image-size", type=int, default=256, help="center-crop size (default 256)")
    p.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL folder (save_pretrained) or hub id: store "
                        "float16 latents (posterior mean x scaling_factor) instead of pixels")
    p.add_argument("--flip", action="store_true",
                   help="with --vae, also store the latents of every mirrored image")
    p.add_argument("--shard-size", type=int, default=4096,
                   help="image files per shard (a shard is built in memory: 4096 256-px "
                        "images are 805 MB as pixels, 33 MB as SD-VAE latents)")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded/encoded at once")
    p.add_argument("--min-size", type=int, default=None,
                   help="skip images whose short side is below this (default image-size/8)")
    p.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    p.add_argument("--device", default="auto", help="torch device of the VAE (default: "
                                                     "cuda:LOCAL_RANK, mps or cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards and manifest of another preparation in --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def cmd_prepare(args: argparse.Namespace) -> int:
    fields = PrepareConfig.__dataclass_fields__
    cfg = PrepareConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = prepare(cfg)
    print(summary(result))
    return 0
