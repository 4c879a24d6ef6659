"""Shard loader throughput and peak memory against the dataset size, next to training speed.

    python -m benchmarks.bench_loader [--sizes 10000,100000,1000000] [--root /tmp/dar-bench-loader]
                                      [--seconds 4] [--keep]

For each size a latent dataset (``float16 [4, 32, 32]``, 8 KiB an example, 1000 classes,
shards of 4096 examples, the layout ``dar prepare --vae`` writes) is generated on disk
unless it is there already, then a fresh process builds a ``ShardDataset`` and draws
training batches (``TrainConfig``'s default batch size) for ``--seconds``: once with the
dataset's pages in the page cache (warm: the data was just written or read) and once after
``posix_fadvise(DONTNEED)`` on every shard (cold: each row is a random read from disk). The
child reports its peak RSS (``VmHWM``) so each size's memory is its own. A
last fresh process times the torch backend's ``tiny`` training step (``TrainConfig``
defaults: DAR static_t chunk 4, 16x16x3, batch 64; AdamW, clipping, EMA), for the ratio.
The disk space each size needs is checked first; a size that does not fit is skipped and
said so. Writes ``benchmarks/results/loader.{json,md}``; ``--keep`` leaves the datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, md_table, status_mb, write

SHAPE = (4, 32, 32)
SHARD = 4096
CLASSES = 1000
TARGET_RATIO = 20.0
COMMAND = "OMP_NUM_THREADS=1 python -m benchmarks.bench_loader"


def generate(root: Path, n: int) -> Path:
    """A latent dataset of ``n`` examples in ``root/n<n>`` (reused when complete)."""
    from dar_core.io.data.shards import MANIFEST, write_shards

    out = root / f"n{n}"
    mpath = out / MANIFEST
    if mpath.exists() and json.loads(mpath.read_text()).get("count") == n:
        return out
    if out.exists():
        shutil.rmtree(out)
    block = np.random.default_rng(0).standard_normal((SHARD, *SHAPE)).astype(np.float16)

    def chunks():
        for start in range(0, n, SHARD):
            k = min(SHARD, n - start)
            x = block[:k] + np.float16(start // SHARD % 7)  # shards differ
            yield x, (np.arange(start, start + k) % CLASSES)

    t0 = time.perf_counter()
    write_shards(out, chunks(), [f"c{i:03d}" for i in range(CLASSES)], kind="latents",
                 latent_scale=0.18215)
    print(f"generated {n} examples in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


def _drop_cache(folder: Path) -> None:
    for p in folder.glob("shard-*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rate(ds, batch: int, seconds: float, first_step: int) -> tuple[float, int]:
    """Samples per second drawing consecutive training batches for ``seconds``."""
    step, t0 = first_step, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, y = ds.train_batch(step, batch)
        step += 1
    return (step - first_step) * batch / (time.perf_counter() - t0), step


def measure_loader(folder: Path, batch: int, seconds: float) -> dict:
    """Runs in the child: warm and cold throughput, peak RSS."""
    from dar_core.io.data import ShardDataset

    rss_import = status_mb("VmRSS")
    ds = ShardDataset(folder)
    rss_open = status_mb("VmRSS")
    for s in range(3):
        ds.train_batch(s, batch)
    # warm: pages of the rows read are in the page cache (the dataset was just written)
    warm, step = _rate(ds, batch, seconds, 10)
    _drop_cache(folder)
    cold, step = _rate(ds, batch, seconds, step + 10**6)  # positions not read before
    rank, _ = _rate_rank(ds, batch * 8, 8, seconds / 2, step + 2 * 10**6)
    return {"n": len(ds), "batch": batch, "warm": warm, "cold": cold, "rank0_of_8": rank,
            "rss_after_import_mb": rss_import, "rss_after_open_mb": rss_open,
            "peak_rss_mb": status_mb("VmHWM")}


def _rate_rank(ds, global_batch: int, world: int, seconds: float, first_step: int):
    """Samples per second of rank 0's part of a global batch, cache state as it is."""
    step, t0 = first_step, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ds.train_batch(step, global_batch, rank=0, world=world)
        step += 1
    return (step - first_step) * global_batch // world / (time.perf_counter() - t0), step


def measure_training(reps: int = 12) -> dict:
    """Runs in the child: the tiny preset's training step (TrainConfig defaults)."""
    import torch

    from benchmarks.torch_cases import train_step
    from dar_core.train.run import TrainConfig

    tc = TrainConfig()
    step = train_step(tc.model_config(), tc.batch_size)
    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"model": tc.model, "routing": f"{tc.routing} {tc.query} c{tc.chunk_size}",
            "batch": tc.batch_size, "step_ms": 1000 * sec, "samples_per_s": tc.batch_size / sec,
            "torch_threads": torch.get_num_threads()}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_loader", *args], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--root", default="/tmp/dar-bench-loader")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=None, help="default: TrainConfig.batch_size")
    ap.add_argument("--keep", action="store_true", help="keep the generated datasets")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: a dataset folder
    ap.add_argument("--train", action="store_true", help=argparse.SUPPRESS)  # child: training
    a = ap.parse_args()
    if a.train:
        print(json.dumps(measure_training()))
        return
    if a.batch is None:
        from dar_core.train.run import TrainConfig

        a.batch = TrainConfig().batch_size
    if a.one:
        print(json.dumps(measure_loader(Path(a.one), a.batch, a.seconds)))
        return

    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    row_bytes = int(np.prod(SHAPE)) * 2
    rows, skipped = [], []
    for n in (int(s) for s in a.sizes.split(",")):
        need = n * (row_bytes + 8) * 1.02
        have = (root / f"n{n}").exists() or shutil.disk_usage(root).free > need + 2e9
        if not have:
            skipped.append(f"{n} (needs {need / 1e9:.1f} GB, {root} has "
                           f"{shutil.disk_usage(root).free / 1e9:.1f} GB free)")
            print(f"skipping {n}: not enough disk space", file=sys.stderr)
            continue
        folder = generate(root, n)
        r = _child(["--one", str(folder), "--batch", str(a.batch), "--seconds", str(a.seconds)])
        r["disk_gb"] = sum(p.stat().st_size for p in folder.iterdir()) / 1e9
        rows.append(r)
        print(f"{n}: warm {r['warm']:.0f}/s cold {r['cold']:.0f}/s peak RSS "
              f"{r['peak_rss_mb']:.1f} MB", file=sys.stderr)
        if not a.keep:
            shutil.rmtree(folder)
    train = _child(["--train"])
    ratio = lambda v: v / train["samples_per_s"]
    table = md_table(
        ["examples", "on disk GB", "warm samples/s", "cold samples/s", "rank 0 of 8 samples/s",
         "× training (cold)", "peak RSS MB", "RSS after imports MB", "RSS after open MB"],
        [[f"{r['n']:,}", f"{r['disk_gb']:.2f}", f"{r['warm']:,.0f}", f"{r['cold']:,.0f}",
          f"{r['rank0_of_8']:,.0f}",
          f"{ratio(r['cold']):.0f}" + (" ✗" if ratio(r["cold"]) < TARGET_RATIO else ""),
          f"{r['peak_rss_mb']:.1f}", f"{r['rss_after_import_mb']:.1f}",
          f"{r['rss_after_open_mb']:.1f}"] for r in rows])
    lo, hi = (min(r["peak_rss_mb"] for r in rows), max(r["peak_rss_mb"] for r in rows)) \
        if rows else (0, 0)
    md = (f"# Shard loader: throughput and peak memory against dataset size\n\n"
          f"Regenerate: `{COMMAND} --sizes {a.sizes} --seconds {a.seconds:g}`\n\n"
          f"Machine: {machine()}\n\n"
          f"Latents float16 {list(SHAPE)} (8 KiB an example), shards of {SHARD}, batch "
          f"{a.batch} (TrainConfig default), one reading thread. Warm: the rows are in the "
          f"page cache; cold: after posix_fadvise(DONTNEED) on every shard, so each row is a "
          f"random read from disk. 'rank 0 of 8': rank 0's 1/8 of a global batch of "
          f"{a.batch * 8} (cache as left by the cold run). Peak RSS is each size's own fresh "
          f"process (VmHWM: the high-water mark of its resident memory).\n\n{table}\n"
          f"Training, same run: torch `{train['model']}` ({train['routing']}), batch "
          f"{train['batch']}, {train['torch_threads']} thread(s): {train['step_ms']:.1f} ms a "
          f"step = **{train['samples_per_s']:.0f} samples/s**. Target: loader ≥ "
          f"{TARGET_RATIO:.0f}× that ({TARGET_RATIO * train['samples_per_s']:.0f} samples/s).\n\n"
          f"Peak RSS ranges over {lo:.1f} – {hi:.1f} MB across the sizes"
          + (f"; skipped for lack of disk space: {', '.join(skipped)}" if skipped else "")
          + ". The only memory that grows with the dataset is its labels, 2 bytes an example "
          "(uint16 for 1000 classes); the shuffle is computed, not stored. 'Cold' drops this "
          "machine's page cache only: on a virtual machine the host may still cache the "
          "files, so a real disk can be slower.\n")
    j, m = write("loader", {"machine": machine(), "command": COMMAND, "sizes": rows,
                            "training": train, "skipped": skipped}, md)
    print(md)
    print(f"wrote {j} and {m}", file=sys.stderr)


if __name__ == "__main__":
    main()
