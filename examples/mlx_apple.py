"""Train a DAR diffusion transformer on Apple silicon with MLX, then sample from it.

With a Metal GPU (``mx.metal.is_available()``) it trains SiT-S/2 on 32x32 procedural images in
bf16 (float32 master weights); anywhere else it falls back to the CPU with the tiny preset so
the same command finishes in a few minutes::

    python examples/mlx_apple.py                                # defaults for this machine
    python examples/mlx_apple.py --routing residual             # the plain SiT baseline
    python examples/mlx_apple.py --query dynamic --steps 4000
    python examples/mlx_apple.py --resume auto                  # continue the last run
    mlx.launch -n 2 --backend ring python examples/mlx_apple.py # data parallel (2 processes)

The run folder holds ``metrics.jsonl``, ``training.png``, ``checkpoints/`` and sample grids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx

from dar_core.train.run import TrainConfig

# Preset per device: model, data, schedule, precision, cadence, sample grid, lr and EMA.
APPLE_GPU = dict(model="SiT-S/2", image_size=32, batch_size=128, steps=4000, precision="bf16",
                 every=1000, per_class=8, sample_steps=32, lr=1e-4, ema_decay=0.9995)
CPU = dict(model="tiny", image_size=16, batch_size=32, steps=100, precision="fp32", every=100,
           per_class=4, sample_steps=16, lr=1e-3, ema_decay=0.95)


def parse_args() -> argparse.Namespace:
    on_gpu = mx.metal.is_available()
    preset = APPLE_GPU if on_gpu else CPU
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=preset["model"], help="preset name (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=preset["image_size"], choices=(16, 32))
    ap.add_argument("--batch-size", type=int, default=preset["batch_size"])
    ap.add_argument("--steps", type=int, default=preset["steps"])
    ap.add_argument("--precision", default=preset["precision"], choices=("fp32", "bf16"))
    ap.add_argument("--routing", default="dar", choices=("dar", "residual"))
    ap.add_argument("--query", default="static_t", choices=("static", "static_t", "dynamic"))
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=preset["lr"])
    ap.add_argument("--ema-decay", type=float, default=preset["ema_decay"],
                    help="EMA decay, matched to the run length (default: %(default)s)")
    ap.add_argument("--every", type=int, default=preset["every"],
                    help="checkpoint and sample-grid cadence in steps (default: %(default)s)")
    ap.add_argument("--out", default=f"runs/mlx-{'gpu' if on_gpu else 'cpu'}")
    ap.add_argument("--resume", default="", help="'auto' or a checkpoint path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=preset["per_class"],
                    help="sample-grid images per class (default: %(default)s)")
    ap.add_argument("--sample-steps", type=int, default=preset["sample_steps"],
                    help="Heun steps of the sample grids (default: %(default)s)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from dar_core.backends.mlx import train

    tc = TrainConfig(
        model=args.model, image_size=args.image_size, batch_size=args.batch_size,
        steps=args.steps, precision=args.precision, routing=args.routing, query=args.query,
        chunk_size=args.chunk_size, lr=args.lr, ckpt_every=args.every, sample_every=args.every,
        log_every=10, per_class=args.per_class, sample_steps=args.sample_steps, out=args.out,
        resume=args.resume, seed=args.seed, compile=True,
        ema_decay=args.ema_decay, device="auto",
    )
    group = mx.distributed.init()
    if group.rank() == 0:
        print(f"MLX {mx.__version__} on {mx.default_device()} "
              f"(Metal: {mx.metal.is_available()}), {group.size()} process(es): "
              f"{tc.model} {tc.routing}/{tc.query} c{tc.chunk_size}, {tc.precision}, "
              f"batch {tc.batch_size}, {tc.steps} steps")
    run_dir = train(tc)
    if group.rank() != 0:
        return
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    grids = sorted(Path(run_dir, "samples").glob("*.png"))
    print(f"step {last['step']}: loss {last['loss']:.4f}, {last['img_per_s']:.0f} img/s")
    print(f"run folder: {run_dir}  (latest samples: {grids[-1] if grids else 'none'})")
    print(f"sample again: dar sample --backend mlx --checkpoint "
          f"{sorted(Path(run_dir, 'checkpoints').iterdir())[-1]} --sampler heun --steps 50")


if __name__ == "__main__":
    main()
