"""The command line every backend's example shares (``examples/{torch_cuda,jax_tpu,mlx_apple}.py``):
the same flags, the same preset choice (an accelerator preset when the framework sees one, a
CPU preset otherwise), the same run, the same final sample grids and the same summary.

An example supplies only its framework glue: its presets, how it finds an accelerator and how
it learns its process rank. Any flag left unset keeps the chosen preset's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from dar_core.train.run import TrainConfig

# flag -> TrainConfig field (``--every`` sets both the checkpoint and the sample cadence)
_FIELDS = {"model": "model", "image_size": "image_size", "batch_size": "batch_size",
           "steps": "steps", "precision": "precision", "routing": "routing", "query": "query",
           "chunk_size": "chunk_size", "lr": "lr", "ema_decay": "ema_decay", "out": "out",
           "resume": "resume", "overwrite": "overwrite", "seed": "seed",
           "per_class": "per_class",
           "sample_steps": "sample_steps"}


def parser(description: str, devices: str) -> argparse.ArgumentParser:
    """The shared flags; ``devices`` names the ``--device`` choices for the help text."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help=f"{devices} or auto (default)")
    ap.add_argument("--model", help="model preset, e.g. SiT-S/2, SiT-B/2, tiny, micro")
    ap.add_argument("--image-size", type=int, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, help="global batch size")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--precision", choices=("fp32", "bf16"))
    ap.add_argument("--routing", choices=("dar", "residual"))
    ap.add_argument("--query", choices=("static", "static_t", "dynamic"))
    ap.add_argument("--chunk-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--ema-decay", type=float, help="EMA decay, matched to the run length")
    ap.add_argument("--every", type=int, help="checkpoint and sample-grid cadence in steps")
    ap.add_argument("--out", help="run folder")
    ap.add_argument("--resume", help="'auto' or a checkpoint path")
    ap.add_argument("--overwrite", action="store_true", default=None,
                    help="replace the run already in --out (default: refuse)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--per-class", type=int, help="sample-grid images per class")
    ap.add_argument("--sample-steps", type=int, help="Heun steps of the training sample grids")
    ap.add_argument("--final-steps", type=int, default=50,
                    help="Heun steps of the final grids (default: %(default)s)")
    return ap


def config(args: argparse.Namespace, preset: TrainConfig, device: str) -> TrainConfig:
    """``preset`` with every flag that was given, on ``device``."""
    changes = {f: getattr(args, a) for a, f in _FIELDS.items() if getattr(args, a) is not None}
    if args.every is not None:
        changes.update(ckpt_every=args.every, sample_every=args.every)
    return dataclasses.replace(preset, device=device, **changes)


def run(backend: str, tc: TrainConfig, train: Callable[[TrainConfig], Path], is_main: bool,
        final_steps: int, where: str) -> Path:
    """Train, then on the main process write ``final-cfg1.5.png`` and ``final-cfg1.0.png``
    (Heun, ``final_steps`` steps, from the last checkpoint's EMA) and print a summary."""
    from dar_core.sampling.from_checkpoint import sample_checkpoint

    if is_main:
        print(f"training {tc.model} ({tc.routing}, query={tc.query}, chunk={tc.chunk_size}, "
              f"{tc.precision}, batch {tc.batch_size}) on {where} for {tc.steps} steps "
              f"-> {tc.out}", flush=True)
    run_dir = train(tc)
    if not is_main:
        return run_dir
    ckpt = sorted((run_dir / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    for cfg_scale in (1.5, 1.0):
        png = run_dir / f"final-cfg{cfg_scale}.png"
        sample_checkpoint(str(ckpt), backend=backend, sampler="heun", steps=final_steps,
                          cfg_scale=cfg_scale, per_class=tc.per_class, device=tc.device,
                          precision=tc.precision, png=str(png))
        print(f"samples: {png}")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"step {last['step']}: loss {last['loss']:.4f}, {last['img_per_s']:.0f} img/s")
    print(f"loss curve: {run_dir / 'training.png'}; checkpoint: {ckpt}")
    return run_dir
