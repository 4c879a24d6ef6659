"""Per-rank peak memory of unsharded (DDP) and sharded (FSDP2) torch training at SiT-B/2 on
2 CPU processes (torchrun, gloo), and the per-device memory it projects for SiT-XL/2 at 8
and 64 devices.

    python -m benchmarks.bench_sharded_memory      # ~5 min on 2 cores, ~10 GB of RAM

Each mode is a real ``dar train`` launch: 3 steps, then the final checkpoint (DDP's rank 0
gathers and writes the whole file, a sharded run's ranks write their shards) and a small
sample grid. Every rank resets its peak-RSS mark when training starts (setup's whole-model
build is left out: a GPU run builds it in host memory) and after the last step, so the
steps and the checkpoint have a peak each. SiT-B/2 at 64 tokens (16x16 pixels, patch 2):
the training state, not the activations, is what sharding divides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import machine, md_table, reset_peak, return_freed_memory, status_mb, write
from dar_core.spec.config import model_config
from dar_core.spec.schema import param_shapes

MODES = ("none", "params", "opt")
STATE_BYTES = 20  # per parameter: fp32 weight 4, gradient 4, AdamW moments 8, EMA 4
TRAIN = ["--model", "SiT-B/2", "--image-size", "16", "--batch-size", "4", "--steps", "3",
         "--ckpt-every", "3", "--sample-every", "1000", "--per-class", "1", "--sample-steps", "2",
         "--sample-sampler", "euler", "--no-progress", "--no-tensorboard",
         "--log-every", "1"]


def worker(out: str) -> None:
    """One rank of ``dar train`` (under torchrun), its memory written to ``out``: the peak of
    the training steps (from the first step to the last step's log), then the peak of the
    final checkpoint and sample grid."""
    from dar_core.backends.torch import train
    from dar_core.cli import build_parser
    from dar_core.train import run as run_module
    from dar_core.train.run import TrainConfig

    return_freed_memory()
    marks = {"rss_after_import_mb": status_mb("VmRSS")}
    steps, log = run_module.Run.steps, run_module.Run.log

    def measured_steps(self):
        for i, step in enumerate(steps(self)):
            if i == 0:
                return_freed_memory()
                marks["rss_at_first_step_mb"] = reset_peak()
            yield step

    def measured_log(self, step, *a, **k):
        log(self, step, *a, **k)
        if step == self.tc.steps - 1:
            marks["peak_steps_mb"] = status_mb("VmHWM")
            return_freed_memory()
            reset_peak()

    run_module.Run.steps, run_module.Run.log = measured_steps, measured_log
    args = build_parser().parse_args(["train", *sys.argv[3:]])
    train(TrainConfig(**{k: v for k, v in vars(args).items()
                         if k in TrainConfig.__dataclass_fields__}))
    marks["peak_save_sample_mb"] = status_mb("VmHWM")
    rank = int(os.environ["RANK"])
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, **marks}))


def measure(mode: str, tmp: Path) -> list[dict]:
    out = tmp / mode
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "benchmarks.bench_sharded_memory",
                    "--worker", str(out), *TRAIN, "--shard", mode, "--out", str(out / "run")],
                   check=True, env=env)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    ckpt = out / "run" / "checkpoints"
    files = sorted(ckpt.rglob("*.distcp")) if mode != "none" else \
        sorted(ckpt.glob("*.safetensors"))
    for r in ranks:  # what each rank wrote of the final checkpoint
        mine = [f for f in files if mode == "none" and r["rank"] == 0
                or f.name.startswith(f"__{r['rank']}_")]
        r["checkpoint_mb"] = sum(f.stat().st_size for f in mine) / 2**20
    return ranks


def n_params(name: str) -> tuple[int, int, int]:
    """Parameters of a preset, of one block (an FSDP2 unit) and of the root unit (the
    embedders, the final layer and router: everything outside the blocks)."""
    shapes = param_shapes(model_config(name))
    total = sum(int(np.prod(s)) for s in shapes.values())
    block = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith("blocks.0."))
    outside = sum(int(np.prod(s)) for n, s in shapes.items() if not n.startswith("blocks."))
    return total, block, outside


def expected_mb(mode: str, world: int, P: int, unit: int, root: int, gather: int = 4) -> float:
    """The training state a rank holds at its peak, from first principles: ``20 P`` bytes
    sharded over the world (unsharded: whole), plus the weights gathered at once (ZeRO-3: the
    root unit and two blocks, the one computing and the one prefetched; opt: every weight,
    kept from the forward to the backward) and one unit's unsharded float32 gradients before
    their reduce-scatter. Activations, buffers and the process are not in it."""
    if mode == "none":
        return STATE_BYTES * P / 2**20
    gathered = (root + 2 * unit if mode == "params" else P) * gather
    return (STATE_BYTES * P / world + gathered + 4 * unit) / 2**20


def projection(P: int, unit: int, root: int) -> list[list]:
    rows = []
    for N in (1, 8, 64):
        for mode in ("none", "params", "opt") if N > 1 else ("none",):
            for gather, label in ((4, "fp32"), (2, "bf16")) if mode != "none" else ((4, "-"),):
                rows.append([N, mode, label,
                             f"{expected_mb(mode, N, P, unit, root, gather) / 1024:.2f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args(argv)
    if args.worker:
        return worker(args.worker)
    P_b, unit_b, root_b = n_params("SiT-B/2")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {m: measure(m, Path(tmp)) for m in MODES}
    rows = []
    for m in MODES:
        for r in runs[m]:
            r["expected_state_mb"] = expected_mb(m, 2, P_b, unit_b, root_b)
            rows.append([m, r["rank"], f"{r['rss_after_import_mb']:.0f}",
                         f"{r['peak_steps_mb']:.0f}",
                         f"{r['peak_steps_mb'] - r['rss_after_import_mb']:.0f}",
                         f"{r['expected_state_mb']:.0f}", f"{r['peak_save_sample_mb']:.0f}",
                         f"{r['checkpoint_mb']:.0f}"])
    table = md_table(["shard", "rank", "RSS after import", "peak, training steps",
                      "peak minus import", "expected state", "peak, checkpoint + sample",
                      "checkpoint written"], rows)
    steps_peak = {m: max(r["peak_steps_mb"] for r in runs[m]) for m in MODES}
    save_peak = {m: max(r["peak_save_sample_mb"] for r in runs[m]) for m in MODES}
    ratios = {m: steps_peak[m] / steps_peak["none"] for m in MODES}
    P, unit, root = n_params("SiT-XL/2")
    proj = md_table(["devices", "shard", "gathers", "training state per device (GiB)"],
                    projection(P, unit, root))
    text = (f"# Sharded training memory (torch, 2 CPU processes, gloo)\n\n"
            f"`python -m benchmarks.bench_sharded_memory`. SiT-B/2 ({P_b / 1e6:.1f} M "
            f"parameters with DAR routing), 64 tokens, batch 4 (2 per rank), 3 steps, then "
            f"the final checkpoint and a 10-image sample grid. All figures MB of resident "
            f"memory per rank (VmHWM, reset when training starts and after the last step); "
            f"'expected state' is `expected_mb` below.\n\n{table}\n"
            f"Peak of the training steps relative to unsharded (the larger rank): params "
            f"{ratios['params']:.2f}, opt {ratios['opt']:.2f}. Peak of the checkpoint and "
            f"sample: unsharded {save_peak['none']:.0f} MB (rank 0 builds the whole file), "
            f"params {save_peak['params']:.0f} MB, opt {save_peak['opt']:.0f} MB.\n\n"
            f"## Projection (not a measurement): SiT-XL/2 ({P / 1e6:.1f} M parameters)\n\n"
            f"{' '.join(expected_mb.__doc__.split())}\n\n{proj}")
    paths = write("sharded_memory", {"measured": runs, "ratios": ratios,
                                     "params_B2": P_b, "machine": machine(),
                                     "command": "python -m benchmarks.bench_sharded_memory"},
                  text)
    print(text)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
