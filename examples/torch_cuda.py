"""Train and sample a DAR SiT with PyTorch: CUDA with bf16 when present, else a CPU preset.

    python examples/torch_cuda.py                    # CUDA: SiT-S/2 on 32x32 procedural data
    python examples/torch_cuda.py --device cpu       # tiny preset, a few minutes on a laptop
    torchrun --nproc_per_node 8 examples/torch_cuda.py --steps 50000   # data parallel

Writes ``<out>/samples/*.png`` (EMA sample grids during training), ``<out>/training.png``,
``<out>/final-cfg1.5.png`` and ``final-cfg1.0.png`` (Heun) and checkpoints. The flags are the
same in every backend's example (``dar_core.train.example``).
"""

from __future__ import annotations

from dar_core.train.example import config, parser, run
from dar_core.train.run import TrainConfig, env_rank_world

PRESETS = {
    # A GPU run: SiT-S/2 on 32x32 images, bf16 autocast, compiled.
    "cuda": TrainConfig(model="SiT-S/2", image_size=32, batch_size=256, steps=20_000, lr=1e-4,
                        ema_decay=0.9999, precision="bf16", compile=True, ckpt_every=2000,
                        sample_every=2000, out="runs/torch_cuda"),
    # The CPU demo: a 4-block, 64-wide DAR model on 16x16 images, minutes on 2 cores. The EMA
    # horizon (~1/(1-decay) steps) must be short against the run: 0.999 would still hold 22%
    # of the initial weights after 1500 steps, and its samples would be noise.
    "cpu": TrainConfig(model="tiny", image_size=16, batch_size=64, steps=1500, lr=1e-3,
                       ema_decay=0.99, ckpt_every=500, sample_every=500, sample_steps=32,
                       out="runs/demo"),
}


def main() -> None:
    args = parser(__doc__.split("\n")[0], "cuda, cpu").parse_args()
    import torch  # after argparse, so that --help answers at once

    from dar_core.backends.torch import train

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if use_cuda else "cpu"
    tc = config(args, PRESETS[device], device)
    rank, world = env_rank_world()
    run("torch", tc, train, rank == 0, args.final_steps, f"{world} {device} process(es)")


if __name__ == "__main__":
    main()
