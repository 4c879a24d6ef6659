"""DAR's training-step and sampling-step overhead over the residual baseline, per backend.

    python -m benchmarks.bench_overhead [--backends torch,jax,mlx] [--reps 10] [--quick]

For each installed backend and each preset (``tiny`` batch 64; ``SiT-S/2`` on 32x32x4 latents,
batch 8), residual and DAR (static, static_t, dynamic x chunk 1, 4, 8) steps run interleaved
in one process; medians and ratios to residual are reported. Peak memory of a training step is
measured in a fresh process (``mem_probe``): XLA's temporary-buffer assignment for JAX, the
allocator's peak above the resident state for MLX and for PyTorch on CUDA, the reset peak-RSS
mark for PyTorch on CPU. MLX's SiT-S/2 rows need its GPU (Apple silicon): on its
reference CPU kernels one such step takes over a minute.
Each backend runs in a fresh process of its own (in one process the frameworks' thread pools
and allocators disturb each other's timings). Writes ``benchmarks/results/overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

from benchmarks.common import (
    RESULTS,
    interleaved,
    machine,
    md_table,
    probe_mb,
    rows_in_fresh_process,
    write,
)
from dar_core.spec.config import RoutingConfig, model_config

PRESETS = {
    "tiny": dict(name="tiny", batch=64, overrides=dict(input_size=16, in_channels=3,
                                                     num_classes=10)),
    "SiT-S/2": dict(name="SiT-S/2", batch=8, overrides=dict(input_size=32, in_channels=4,
                                                           num_classes=1000)),
}
TARGETS = {"static_t c4": 1.05, "static_t c1": 1.15, "dynamic c4": 1.20}
MEMORY_TARGET = 1.15
MEMORY_TARGETS = {"static_t c4": 1.05, "dynamic c4": 1.15}  # tighter, for these two


def memory_target(variant: str) -> float:
    return MEMORY_TARGETS.get(variant, MEMORY_TARGET)


def variants(quick: bool) -> dict[str, RoutingConfig]:
    out = {"residual": RoutingConfig(mode="residual")}
    queries = ("static_t", "dynamic") if quick else ("static", "static_t", "dynamic")
    chunks = (1, 4) if quick else (1, 4, 8)
    for q in queries:
        for s in chunks:
            out[f"{q} c{s}"] = RoutingConfig(query=q, chunk_size=s)
    return out


def installed(names: list[str]) -> list[str]:
    mods = {"torch": "torch", "jax": "jax", "mlx": "mlx"}
    return [n for n in names if importlib.util.find_spec(mods[n]) is not None
            and importlib.util.find_spec(f"benchmarks.{n}_cases") is not None]


def run_backend(name: str, reps: int, quick: bool, memory: bool) -> list[dict]:
    cases = importlib.import_module(f"benchmarks.{name}_cases")
    rows = []
    for preset, spec in PRESETS.items():
        if preset != "tiny" and not getattr(cases, "gpu_available", lambda: True)():
            print(f"{name} {preset}: skipped (no GPU: {cases.gpu_available.__doc__})",
                  file=sys.stderr)
            continue
        cfgs = {k: model_config(spec["name"], routing=r, **spec["overrides"])
                for k, r in variants(quick).items()}
        train = interleaved({k: cases.train_step(c, spec["batch"]) for k, c in cfgs.items()},
                            reps)
        infer = interleaved({k: cases.sample_step(c, spec["batch"]) for k, c in cfgs.items()},
                            reps)
        mem = {}
        if memory:
            for k, c in cfgs.items():
                mem[k] = probe_mb(["-m", "benchmarks.mem_probe", name, c.to_json(),
                                   str(spec["batch"])])
        for k in cfgs:
            rows.append({
                "backend": name, "preset": preset, "batch": spec["batch"], "variant": k,
                "train_ms": 1e3 * train[k], "train_ratio": train[k] / train["residual"],
                "img_per_s": spec["batch"] / train[k],
                "sample_ms": 1e3 * infer[k], "sample_ratio": infer[k] / infer["residual"],
                "mem_mb": mem.get(k), "mem_ratio": (mem[k] / mem["residual"]) if mem else None,
            })
        print(f"{name} {preset}: " + ", ".join(
            f"{r['variant']} x{r['train_ratio']:.2f}" for r in rows if r["preset"] == preset),
            file=sys.stderr)
    return rows


def carried_rows(measured: list[str]) -> list[dict]:
    """The previous results' rows of the backends this run does not measure (so measuring
    one backend does not drop the others' figures), each marked ``carried``."""
    path = RESULTS / "overhead.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text()).get("rows", [])
    return [{**r, "carried": True} for r in old if r["backend"] not in measured]


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    body = [[r["backend"], r["preset"], r["variant"], f(r["train_ms"], ".1f"),
             f(r["train_ratio"], ".3f") + (" ✗" if r["variant"] in TARGETS
                                           and r["train_ratio"] > TARGETS[r["variant"]] else ""),
             f(r["img_per_s"], ".0f"), f(r["sample_ms"], ".1f"), f(r["sample_ratio"], ".3f"),
             f(r["mem_mb"], ".0f"), f(r["mem_ratio"], ".2f") + (
                 " ✗" if r["mem_ratio"] is not None
                 and r["mem_ratio"] > memory_target(r["variant"]) else "")]
            for r in rows]
    return md_table(["backend", "preset", "routing", "train step ms", "× residual", "img/s",
                     "sample step ms", "× residual", "step peak memory MB", "× residual"], body)


def throughput_table(rows: list[dict]) -> str:
    """Each backend's training throughput as a fraction of the fastest backend's on the same
    preset and routing (target: within 1.5x, i.e. a slowdown <= 1.5)."""
    body = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["preset"] == preset):
            same = {r["backend"]: r["img_per_s"] for r in rows
                    if r["preset"] == preset and r["variant"] == variant}
            best = max(same, key=same.get)
            body.append([preset, variant, best] + [
                "–" if b not in same else f"{same[best] / same[b]:.2f}"
                + (" ✗" if same[best] / same[b] > 1.5 else "")
                for b in ("torch", "jax", "mlx")])
    return md_table(["preset", "routing", "fastest", "torch slowdown", "jax slowdown",
                     "mlx slowdown"], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="torch,jax,mlx")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="fewer variants")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # measure one backend, print JSON rows
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_backend(args.one, args.reps, args.quick, not args.no_memory)))
        return
    rows = []
    measured = installed(args.backends.split(","))
    for name in measured:  # each backend in a fresh process
        flags = ["--reps", str(args.reps)] + ["--quick"] * args.quick + [
            "--no-memory"] * args.no_memory
        rows += rows_in_fresh_process("benchmarks.bench_overhead", name, flags)
    carried = carried_rows(measured)
    targets = ", ".join(f"{k} ≤ {v}×" for k, v in TARGETS.items())
    mem_targets = ", ".join(f"{k} ≤ {v}×" for k, v in MEMORY_TARGETS.items())
    note = (f"Rows of {sorted({r['backend'] for r in carried})} are carried over from the "
            f"previous results file (this run measured {measured} only).\n\n"
            if carried else "")
    rows += carried
    md = (f"# DAR overhead over residual (medians of {args.reps} interleaved reps)\n\n"
          f"Machine: {machine()}\n\nTargets: {targets}; peak memory {mem_targets}, any other "
          f"≤ {MEMORY_TARGET}× (✗ marks a missed target).\n\n" + note + table(rows)
          + "\n\n## Training throughput relative to the fastest backend (target ≤ 1.5)\n\n"
          + throughput_table(rows))
    j, m = write("overhead", {"machine": machine(), "reps": args.reps, "rows": rows}, md)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
