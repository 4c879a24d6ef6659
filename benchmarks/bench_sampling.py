"""Sampling throughput of the bulk FID path at SiT-S/2 size (PyTorch, this CPU), and the
projected time of FID-50K for SiT-XL/2 on one GPU from the measured FLOPs per step.

Each case integrates one batch of SiT-S/2 latents (4 x 32 x 32, 1000 classes, DAR static_t
c4 as `model_config("SiT-S/2")` builds it) through exactly what `dar sample --num-samples`
runs per part: per-index noise and labels, the core sampler, per-row SDE noise. The VAE decode
is not included (it is the data's, not the model's). 1 vs 2 processes: two worker processes
run at once, each with one thread, as two torchrun ranks would; the rate is their images over
the slower one's time. FLOPs per network evaluation are counted by
``torch.utils.flop_counter.FlopCounterMode`` on one forward at batch 1 (S/2 and XL/2).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_sampling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import machine, md_table, write

BATCH = 2
STEPS = 2
CASES = [("euler", 1.0), ("heun", 1.0), ("sde", 1.0), ("euler", 4.0), ("heun", 4.0),
         ("sde", 4.0)]
# The projection's assumptions, stated in the output.
GPU = "H100 SXM (989 TFLOP/s dense bf16)"
GPU_FLOPS = 989e12
UTILISATION = 0.4
CONTENTION = ("\nThe load average was at or above the core count: the two processes shared "
              "the cores with other jobs, so the 1-vs-2 ratio above measures contention, not "
              "scaling (ranks never communicate: on free cores or GPUs the rate is the "
              "sum of the ranks').\n")
FID_RUNS = [("sde", 250, 1.5), ("heun", 50, 1.5), ("euler", 250, 1.0)]  # SiT's / ours


def _sit_s2():
    from dar_core.spec.config import model_config

    return model_config("SiT-S/2", input_size=32, in_channels=4, num_classes=1000)


def worker(sampler: str, cfg_scale: float, reps: int) -> dict:
    """Seconds of one batch (median of ``reps``) through the bulk path's per-part work."""
    import torch

    from dar_core.backends.torch import velocity_model
    from dar_core.sampling.bulk import RowNoise, index_labels, index_noise
    from dar_core.sampling.samplers import function_evaluations, sample
    from dar_core.spec.schema import init_params

    torch.set_num_threads(1)
    cfg = _sit_s2()
    vm = velocity_model(cfg, init_params(cfg, 0), device="cpu")
    idx = range(BATCH)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)

    def run(steps: int) -> None:
        x = np.stack([index_noise(0, i, shape) for i in idx])
        y = index_labels(0, idx, cfg.num_classes, "balanced")
        sample(vm.velocity, vm.asarray(x), vm.asarray(y), sampler=sampler, steps=steps,
               cfg_scale=cfg_scale, null_class=cfg.null_class, rng=RowNoise(0, idx),
               asarray=vm.asarray)

    run(1)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(STEPS)
        times.append(time.perf_counter() - t0)
    forwards = function_evaluations(sampler, STEPS) * (2 if cfg_scale != 1.0 else 1)
    return {"seconds": float(np.median(times)), "images": BATCH, "forwards": forwards}


def flops_per_forward(name: str) -> float:
    """FLOPs of one network evaluation of one image (batch 1), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dar_core.backends.torch import DARTransformer
    from dar_core.spec.config import model_config

    cfg = model_config(name, input_size=32, in_channels=4, num_classes=1000)
    model = DARTransformer(cfg).eval()
    x = torch.zeros(1, 4, 32, 32)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model.velocity(x, torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long))
    return float(fc.get_total_flops())


def _spawn(args: list[str], n: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_sampling", *args],
                              env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=3, metavar=("SAMPLER", "CFG", "REPS"))
    ap.add_argument("--flops", default=None)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], float(a.worker[1]), int(a.worker[2]))))
        return
    if a.flops:
        print(json.dumps({"flops": flops_per_forward(a.flops)}))
        return
    rows, results = [], []
    for sampler, cfg_scale in CASES:
        r = {"sampler": sampler, "cfg": cfg_scale}
        for n in (1, 2):
            w = _spawn(["--worker", sampler, str(cfg_scale), str(a.reps)], n)
            sec = max(x["seconds"] for x in w)
            r[f"img_s_{n}p"] = n * BATCH / sec
            r["forwards"] = w[0]["forwards"]
            r[f"ms_per_image_forward_{n}p"] = 1e3 * sec / (BATCH * w[0]["forwards"]) * (1 / n)
        results.append(r)
        print(r, file=sys.stderr)
        rows.append([sampler, f"{cfg_scale:g}", r["forwards"], f"{r['img_s_1p']:.3f}",
                     f"{r['img_s_2p']:.3f}", f"{r['img_s_2p'] / r['img_s_1p']:.2f}x",
                     f"{r['ms_per_image_forward_1p']:.1f}"])
    flops = {name: _spawn(["--flops", name], 1)[0]["flops"] for name in ("SiT-S/2", "SiT-XL/2")}
    proj = []
    for sampler, steps, cfg_scale in FID_RUNS:
        from dar_core.sampling.samplers import function_evaluations

        fwd = function_evaluations(sampler, steps) * (2 if cfg_scale != 1.0 else 1)
        total = 50_000 * fwd * flops["SiT-XL/2"]
        hours = total / (GPU_FLOPS * UTILISATION) / 3600
        proj.append({"sampler": sampler, "steps": steps, "cfg": cfg_scale,
                     "forwards_per_image": fwd, "total_flops": total, "hours": hours})
    payload = {"machine": machine(), "batch": BATCH, "steps": STEPS, "cases": results,
               "flops_per_forward": flops, "projection": {
                   "gpu": GPU, "gpu_flops": GPU_FLOPS, "utilisation": UTILISATION,
                   "runs": proj}}
    m = payload["machine"]
    text = "\n".join([
        "# Sampling throughput (bulk FID path) and the FID-50K projection",
        "",
        "Regenerate: `OMP_NUM_THREADS=1 python -m benchmarks.bench_sampling`",
        "",
        f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpus']} cores, load average "
        f"{m.get('load_average_1m', '?')} at the start (a 1-minute average: it counts jobs "
        "that ran just before).",
        "",
        f"SiT-S/2 (latents 4x32x32, DAR static_t c4), PyTorch CPU fp32, batch {BATCH}, "
        f"{STEPS} steps, one thread per process, VAE decode excluded. `forwards` = network "
        "evaluations per image (Heun 2 per step, CFG doubles the batch); images/s scale "
        "inversely with the step count.",
        "",
        md_table(["sampler", "cfg", "forwards", "img/s 1 proc", "img/s 2 procs", "speed-up",
                  "ms per image-forward (1 proc)"], rows),
        CONTENTION if m.get("load_average_1m", 0) >= m["cpus"] else "",
        f"FLOPs of one forward, one image (FlopCounterMode): SiT-S/2 "
        f"{flops['SiT-S/2'] / 1e9:.2f} GFLOP, SiT-XL/2 {flops['SiT-XL/2'] / 1e9:.1f} GFLOP "
        "(DiT's tables count multiply-adds: half of these).",
        "",
        f"## Projection (not a measurement): FID-50K of SiT-XL/2 on one {GPU}",
        "",
        f"Assumes {UTILISATION:.0%} of peak bf16 throughput is reached on the transformer "
        "forward; excludes the VAE decode and the Inception pass.",
        "",
        md_table(["sampler", "steps", "cfg", "forwards/image", "total PFLOP", "hours"],
                 [[p["sampler"], p["steps"], f"{p['cfg']:g}", p["forwards_per_image"],
                   f"{p['total_flops'] / 1e15:,.0f}", f"{p['hours']:.1f}"] for p in proj]),
    ])
    for p in write("sampling", payload, text):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
