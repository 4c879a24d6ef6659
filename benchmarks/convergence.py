"""Does DAR reach the residual model's quality in fewer iterations? A multi-seed study.

    python -m benchmarks.convergence                 # CPU preset, 3 seeds, 2 worker processes
    python -m benchmarks.convergence --preset gpu --jobs 1 --backend torch
    python -m benchmarks.convergence --analyze-only  # redo tables/plots from the raw JSON

Four arms (residual, DAR static_t c4, DAR dynamic c4, DAR static c4 without t), ``--seeds``
seeds each, the same data stream per seed in every arm. Each run trains in segments up to
log-spaced evaluation steps (``budget / sqrt(2)^k``), resuming from its own checkpoint, so a
segmented run is bit-identical to an uninterrupted one and an interrupted study resumes where
it stopped. After each segment the EMA weights are scored with the fixed protocol of
``dar_core.evaluation.protocol`` (common random numbers: the same noise and labels for every
checkpoint). ``benchmarks.convergence_analysis`` then fits and compares the curves.

Everything lands under ``--runs`` (checkpoints, per-run ``evals.jsonl``); the raw evaluation
records, the tables and the plots are written to ``benchmarks/results/convergence.*``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, read_jsonl
from dar_core.train.run import TrainConfig

ARMS = {  # name -> TrainConfig routing fields
    "residual": dict(routing="residual"),
    "static_t c4": dict(routing="dar", query="static_t", chunk_size=4),
    "dynamic c4": dict(routing="dar", query="dynamic", chunk_size=4),
    "static c4": dict(routing="dar", query="static", chunk_size=4),
}

PRESETS = {
    # Sized for a 2-core CPU: tiny SiT (4 blocks, width 64, patch 2) on 16x16 procedural
    # images of all 24 classes. Chosen once, before looking at any DAR arm: lr 1e-3 is the CPU
    # demo's, and the budget is one where the residual arm is still improving at its end.
    "cpu": dict(
        train=TrainConfig(model="tiny", image_size=16, num_classes=24, batch_size=64,
                          steps=3000, lr=1e-3, ema_decay=0.999, ema_warmup=True,
                          per_class=4, sample_steps=16, keep_checkpoints=2, progress=False,
                          device="cpu"),
        evals=9,  # budget / sqrt(2)^k for k = 8 .. 0
        protocol=dict(n_per_class=20, sampler="heun", steps=25, cfg_scale=1.0, seed=0),
    ),
    # A GPU run: SiT-S/2 on 32x32 images, bf16.
    "gpu": dict(
        train=TrainConfig(model="SiT-S/2", image_size=32, num_classes=24, batch_size=256,
                          steps=40_000, lr=2e-4, ema_decay=0.9999, ema_warmup=True,
                          precision="bf16", per_class=4, sample_steps=32,
                          keep_checkpoints=2, progress=False, device="auto"),
        evals=11,
        protocol=dict(n_per_class=100, sampler="heun", steps=50, cfg_scale=1.0, seed=0),
    ),
}


def eval_steps(budget: int, count: int) -> list[int]:
    """``count`` log-spaced steps ending at ``budget``, a factor sqrt(2) apart."""
    steps = sorted({max(1, round(budget / 2 ** (k / 2))) for k in range(count)})
    return steps


def run_arm(arm: str, seed: int, preset: str, runs: str, backend: str,
            budget: int | None, protocol: dict) -> list[dict]:
    """Train one (arm, seed) up to every evaluation step and score it there (resumable)."""
    spec = PRESETS[preset]
    base: TrainConfig = spec["train"]
    out = Path(runs) / f"{arm.replace(' ', '-')}-seed{seed}"
    return segmented_run(base.replace(**ARMS[arm], seed=seed), out,
                         eval_steps(budget or base.steps, spec["evals"]), protocol, backend,
                         dict(arm=arm, seed=seed))


PARTIAL = "partial-seconds.json"


def segmented_run(tc: TrainConfig, out: Path, steps: list[int], protocol: dict, backend: str,
                  tag: dict) -> list[dict]:
    """Train ``tc`` in segments ending at each of ``steps``, resuming from its own
    checkpoint, and score the EMA weights after each (``evals.jsonl`` in ``out``, so a killed
    study continues where it stopped). Records carry ``tag`` and the segment's seconds."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if backend == "torch":
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from dar_core.backend import load_backend
    from dar_core.evaluation.protocol import evaluate_checkpoint

    log = out / "evals.jsonl"
    done = {r["step"]: r for r in read_jsonl(log)}
    train = load_backend(backend).train
    records = []
    for n in steps:
        if n in done:
            records.append(done[n])
            continue
        seg = tc.replace(steps=n, out=str(out), resume="auto", ckpt_every=n, sample_every=n)
        # a stopped attempt's training time counts toward its segment (the resume times only
        # the rest): kept in PARTIAL until the segment ends
        spent = json.loads((out / PARTIAL).read_text()) if (out / PARTIAL).exists() else {}
        before = float(spent.get(str(n), 0.0))
        t0 = time.perf_counter()
        try:
            train(seg)
        except BaseException:
            out.mkdir(parents=True, exist_ok=True)
            (out / PARTIAL).write_text(json.dumps({str(n): before + time.perf_counter() - t0}))
            raise
        train_s = before + time.perf_counter() - t0
        (out / PARTIAL).unlink(missing_ok=True)
        ckpt = out / "checkpoints" / f"ckpt-{n:07d}.safetensors"
        r = evaluate_checkpoint(ckpt, backend=backend, **protocol, device=tc.device)
        r.update(**tag, step=n, segment_train_seconds=round(train_s, 2))
        records.append(r)
        with open(log, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[{' '.join(f'{k} {v}' for k, v in tag.items())}] step {n}: FD {r['fd']:.3f}  "
              f"class acc {r['class_accuracy']:.3f}", flush=True)
    return records


def step_time_ratios(preset: str, backend: str, reps: int) -> dict[str, float]:
    """Training-step time of each arm over residual, interleaved in this process, on one
    thread like the study's runs."""
    import importlib

    from benchmarks.common import interleaved

    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    cases = importlib.import_module(f"benchmarks.{backend}_cases")
    base: TrainConfig = PRESETS[preset]["train"]
    steps = {arm: cases.train_step(base.replace(**fields).model_config(), base.batch_size)
             for arm, fields in ARMS.items()}
    med = interleaved(steps, reps)
    return {arm: med[arm] / med["residual"] for arm in ARMS} | {
        f"{arm} ms": 1e3 * med[arm] for arm in ARMS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once (1 thread each)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--budget", type=int, default=None, help="override the preset's steps")
    ap.add_argument("--runs", default="runs/convergence")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--n-per-class", type=int, default=None,
                    help="override the preset's evaluation samples per class")
    ap.add_argument("--reps", type=int, default=10, help="repetitions of the step timing")
    ap.add_argument("--analyze-only", action="store_true",
                    help="recompute tables and plots from <results>/convergence.json")
    ap.add_argument("--retime", action="store_true",
                    help="measure the step-time ratios again into <results>/convergence.json "
                         "(on a quiet machine), then redo tables and plots")
    ap.add_argument("--no-diagnostics", action="store_true")
    args = ap.parse_args(argv)

    from benchmarks import convergence_analysis as analysis

    results = Path(args.results)
    raw_path = results / "convergence.json"
    if args.analyze_only or args.retime:
        raw = json.loads(raw_path.read_text())
        if args.retime:
            raw["step_time"] = step_time_ratios(raw["preset"], raw["backend"], args.reps)
            raw["step_time_machine"] = machine()
            raw_path.write_text(json.dumps(raw, indent=1))
        analysis.report(raw, results)
        return

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        sys.exit(f"unknown arm(s) {bad}; expected some of {list(ARMS)}")
    if "residual" not in arms:
        sys.exit("the study needs the 'residual' arm: speedups are measured against it")
    spec = PRESETS[args.preset]
    protocol = dict(spec["protocol"])
    if args.n_per_class:
        protocol["n_per_class"] = args.n_per_class
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    t0 = time.time()
    records: list[dict] = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_arm, a, s, args.preset, args.runs, args.backend,
                               args.budget, protocol): (a, s) for a, s in jobs}
        for fut in cf.as_completed(futures):
            records += fut.result()
            print(f"done: {futures[fut]} ({len(records)} evaluations so far)", flush=True)
    wall_s = time.time() - t0

    print("timing the training step of each arm (interleaved, one process) ...", flush=True)
    ratios = step_time_ratios(args.preset, args.backend, args.reps)
    base = spec["train"]
    raw = {
        "preset": args.preset,
        "train": dataclasses.asdict(base.replace(steps=args.budget or base.steps)),
        "arms": {a: ARMS[a] for a in arms},
        "seeds": args.seeds,
        "eval_steps": eval_steps(args.budget or base.steps, spec["evals"]),
        "protocol": protocol,
        "backend": args.backend,
        "step_time": ratios,
        "machine": machine(),
        "study_wall_seconds": round(wall_s),
        "command": "python -m benchmarks.convergence " + " ".join(argv or sys.argv[1:]),
        "records": sorted(records, key=lambda r: (r["arm"], r["seed"], r["step"])),
    }
    results.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps(raw, indent=1))
    if not args.no_diagnostics:
        analysis.final_diagnostics(raw, Path(args.runs), results / "convergence-diagnostics")
    analysis.report(raw, results)


if __name__ == "__main__":
    main()
