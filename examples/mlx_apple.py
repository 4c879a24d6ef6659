"""Train and sample a DAR SiT with MLX: Apple silicon's GPU in bf16 when present, else a CPU preset.

With a Metal GPU (``mx.metal.is_available()``) it trains SiT-S/2 on 32x32 procedural images in
bf16 (float32 master weights); anywhere else it falls back to the CPU with the tiny preset so
the same command finishes in a few minutes::

    python examples/mlx_apple.py                                # defaults for this machine
    python examples/mlx_apple.py --routing residual             # the plain SiT baseline
    python examples/mlx_apple.py --query dynamic --steps 4000
    python examples/mlx_apple.py --resume auto                  # continue the last run
    mlx.launch -n 2 --backend ring python examples/mlx_apple.py # data parallel (2 processes)

Writes ``<out>/samples/*.png`` (EMA grids during training), ``<out>/training.png``,
``<out>/final-cfg1.5.png`` and ``final-cfg1.0.png`` (Heun) and checkpoints. The flags are the
same in every backend's example (``dar_core.train.example``).
"""

from __future__ import annotations

from dar_core.train.example import config, parser, run
from dar_core.train.run import TrainConfig

PRESETS = {
    # Apple silicon's GPU: SiT-S/2 on 32x32 images in bf16, compiled.
    "gpu": TrainConfig(model="SiT-S/2", image_size=32, batch_size=128, steps=4000,
                       precision="bf16", ckpt_every=1000, sample_every=1000, per_class=8,
                       sample_steps=32, lr=1e-4, ema_decay=0.9995, compile=True,
                       out="runs/mlx-gpu"),
    # The CPU demo: the tiny preset on 16x16 images, a few minutes on 2 cores.
    "cpu": TrainConfig(model="tiny", image_size=16, batch_size=32, steps=100, ckpt_every=100,
                       sample_every=100, per_class=4, sample_steps=16, lr=1e-3, ema_decay=0.95,
                       compile=True, out="runs/mlx-cpu"),
}


def main() -> None:
    args = parser(__doc__.split("\n\n")[0], "gpu, cpu").parse_args()
    import mlx.core as mx  # after argparse, so that --help answers at once

    from dar_core.backends.mlx import train

    on_gpu = args.device == "gpu" or (args.device == "auto" and mx.metal.is_available())
    device = "gpu" if on_gpu else "cpu"
    group = mx.distributed.init()
    tc = config(args, PRESETS[device], device)
    run("mlx", tc, train, group.rank() == 0, args.final_steps,
        f"{group.size()} process(es), {mx.default_device()}")


if __name__ == "__main__":
    main()
