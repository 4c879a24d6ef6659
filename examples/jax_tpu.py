"""Train and sample a DAR SiT with JAX: TPU/GPU with bf16 when present, else a CPU preset.

    python examples/jax_tpu.py                     # TPU/GPU: SiT-S/2 on 32x32 procedural data
    python examples/jax_tpu.py --device cpu        # tiny preset, a few hundred steps on a CPU
    DAR_JAX_DISTRIBUTED=1 python examples/jax_tpu.py --steps 50000   # on every host of a pod

On one host the batch is sharded over all local devices. On a TPU pod, run the same command on
every host with ``DAR_JAX_DISTRIBUTED=1`` (``jax.distributed.initialize()`` finds the pod); each
process then feeds its slice of the global batch. Writes ``<out>/samples/*.png`` (EMA grids
during training), ``<out>/training.png``, ``<out>/final-cfg1.5.png`` and ``final-cfg1.0.png``
(Heun) and checkpoints. The flags are the same in every backend's example
(``dar_core.train.example``).
"""

from __future__ import annotations

from dar_core.train.example import config, parser, run
from dar_core.train.run import TrainConfig

PRESETS = {
    # An accelerator run: SiT-S/2 on 32x32 images in bf16 with fp32 master weights.
    "accelerator": TrainConfig(model="SiT-S/2", image_size=32, batch_size=256, steps=20_000,
                               lr=1e-4, ema_decay=0.9999, precision="bf16", ckpt_every=2000,
                               sample_every=2000, out="runs/jax_tpu"),
    # The CPU demo: a 4-block, 64-wide DAR model on 16x16 images, a few minutes on 2 cores.
    "cpu": TrainConfig(model="tiny", image_size=16, batch_size=64, steps=300, lr=1e-3,
                       ema_decay=0.99, ckpt_every=100, sample_every=300, sample_steps=16,
                       out="runs/jax_demo"),
}


def main() -> None:
    args = parser(__doc__.split("\n")[0], "tpu, gpu, cpu").parse_args()
    import jax  # after argparse, so that --help answers at once

    from dar_core.backends.jax import train
    from dar_core.backends.jax.trainer import initialize_distributed

    initialize_distributed()
    platform = jax.default_backend() if args.device == "auto" else args.device
    preset = "accelerator" if platform in ("tpu", "gpu", "cuda") else "cpu"
    tc = config(args, PRESETS[preset], platform)
    run("jax", tc, train, jax.process_index() == 0, args.final_steps,
        f"{jax.device_count()} {platform} device(s)")


if __name__ == "__main__":
    main()
