"""Train and sample a DAR SiT with JAX: TPU/GPU with bf16 when present, else a CPU preset.

    python examples/jax_tpu.py                     # TPU/GPU: SiT-S/2 on 32x32 procedural data
    python examples/jax_tpu.py --device cpu        # tiny preset, a few hundred steps on a CPU
    DAR_JAX_DISTRIBUTED=1 python examples/jax_tpu.py --steps 50000   # on every host of a pod

On one host the batch is sharded over all local devices. On a TPU pod, run the same command on
every host with ``DAR_JAX_DISTRIBUTED=1`` (``jax.distributed.initialize()`` finds the pod); each
process then feeds its slice of the global batch. Writes ``<out>/samples/*.png`` (EMA grids
during training), ``<out>/training.png``, ``<out>/final-cfg1.5.png`` and ``final-cfg1.0.png``
(Heun) and checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses

PRESETS = {
    # An accelerator run: SiT-S/2 on 32x32 images in bf16 with fp32 master weights.
    "accelerator": dict(model="SiT-S/2", image_size=32, batch_size=256, steps=20_000, lr=1e-4,
                        ema_decay=0.9999, precision="bf16", ckpt_every=2000, sample_every=2000,
                        out="runs/jax_tpu"),
    # The CPU demo: a 4-block, 64-wide DAR model on 16x16 images, a few minutes on 2 cores.
    "cpu": dict(model="tiny", image_size=16, batch_size=64, steps=300, lr=1e-3, ema_decay=0.99,
                ckpt_every=100, sample_every=300, sample_steps=16, out="runs/jax_demo",
                device="cpu"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="tpu, gpu, cpu or auto (default)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--model", help="override the preset's model (e.g. SiT-B/2, small, micro)")
    ap.add_argument("--out")
    ap.add_argument("--query", choices=("static", "static_t", "dynamic"))
    ap.add_argument("--routing", choices=("dar", "residual"))
    ap.add_argument("--precision", choices=("fp32", "bf16"))
    ap.add_argument("--resume", default="", help="'auto' or a checkpoint path")
    ap.add_argument("--per-class", type=int, help="images per class in the sample grids")
    ap.add_argument("--final-steps", type=int, default=50, help="Heun steps of the final grids")
    args = ap.parse_args()

    import jax  # after argparse, so that --help answers at once

    from dar_core.backends.jax import train
    from dar_core.backends.jax.trainer import initialize_distributed
    from dar_core.sampling.from_checkpoint import sample_checkpoint
    from dar_core.train.run import TrainConfig

    initialize_distributed()
    platform = jax.default_backend() if args.device == "auto" else args.device
    preset = "accelerator" if platform in ("tpu", "gpu", "cuda") else "cpu"
    tc = TrainConfig(**{**PRESETS[preset], "device": platform})
    changes = dict(steps=args.steps, batch_size=args.batch_size, model=args.model, out=args.out,
                   query=args.query, routing=args.routing, precision=args.precision,
                   resume=args.resume, per_class=args.per_class)
    tc = dataclasses.replace(tc, **{k: v for k, v in changes.items() if v})
    print(f"training {tc.model} ({tc.routing}, query={tc.query}, chunk={tc.chunk_size}, "
          f"{tc.precision}) on {jax.device_count()} {platform} device(s) for {tc.steps} steps "
          f"-> {tc.out}")
    run_dir = train(tc)

    if jax.process_index() == 0:
        ckpt = sorted((run_dir / "checkpoints").glob("ckpt-*.safetensors"))[-1]
        for cfg_scale in (1.5, 1.0):
            png = run_dir / f"final-cfg{cfg_scale}.png"
            sample_checkpoint(str(ckpt), backend="jax", sampler="heun", steps=args.final_steps,
                              cfg_scale=cfg_scale, per_class=tc.per_class, device=platform,
                              precision=tc.precision, png=str(png))
            print(f"samples: {png}")
        print(f"loss curve: {run_dir / 'training.png'}")


if __name__ == "__main__":
    main()
