"""DAR's training-step and sampling-step overhead over the residual baseline, per backend.

    python -m benchmarks.bench_overhead [--backends torch,jax,mlx] [--reps 10] [--quick]
    python -m benchmarks.bench_overhead --device cuda [--presets SiT-B/2,SiT-XL/2] [--quick]

For each installed backend and each preset (``tiny`` batch 64; ``SiT-S/2`` on 32x32x4 latents,
batch 8), residual and DAR (static, static_t, dynamic x chunk 1, 4, 8) steps run interleaved
in one process; medians and ratios to residual are reported. Peak memory of a training step is
measured in a fresh process (``mem_probe``): XLA's temporary-buffer assignment for JAX, the
allocator's peak above the resident state for MLX and for PyTorch on CUDA, the reset peak-RSS
mark for PyTorch on CPU. MLX's SiT-S/2 rows need its GPU (Apple silicon): on its
reference CPU kernels one such step takes over a minute.
Each backend runs in a fresh process of its own (in one process the frameworks' thread pools
and allocators disturb each other's timings). Writes ``benchmarks/results/overhead.{json,md}``.

``--device cuda`` measures PyTorch on the GPU instead, as the trainer runs it: SiT-B/2 and
SiT-XL/2 on 256-px ImageNet latents (32x32x4, 1000 classes), batch 32 (SiT's 256 over 8 GPUs),
bf16 autocast, ``torch.compile`` of the velocity forward (``--no-compile``: eager); the
sampling step runs as the sampler does (inference mode, autocast, not compiled). Every DAR
variant runs with each routing impl (``--impls history,fused``: per-source ops, the Triton
kernel). Each preset x impl is measured in a fresh process; in it every DAR case is stepped
once (compiled there; a case that fails is a row with its error) and timed interleaved with
the residual case, CUDA-synchronised, two models held at a time. Peak memory: the CUDA
allocator's peak above the held memory, each case in a fresh process. Writes
``benchmarks/results/overhead_cuda.{json,md}``; the CPU files are left alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    error_line,
    fmt,
    interleaved,
    machine,
    md_table,
    probe_mb,
    rows_in_fresh_process,
    write,
)
from dar_core.errors import ConfigError
from dar_core.spec.config import ModelConfig, RoutingConfig, model_config

PRESETS = {
    "tiny": dict(name="tiny", batch=64, overrides=dict(input_size=16, in_channels=3,
                                                     num_classes=10)),
    "SiT-S/2": dict(name="SiT-S/2", batch=8, overrides=dict(input_size=32, in_channels=4,
                                                           num_classes=1000)),
}
IMAGENET_LATENTS = dict(input_size=32, in_channels=4, num_classes=1000)  # 256-px images
DEVICE_PRESETS = {  # --device cuda; "micro" is the smoke test's (tests/test_bench_cuda_mode.py)
    "SiT-B/2": dict(name="SiT-B/2", batch=32, overrides=IMAGENET_LATENTS),
    "SiT-XL/2": dict(name="SiT-XL/2", batch=32, overrides=IMAGENET_LATENTS),
    "micro": dict(name="micro", batch=2, overrides=dict(input_size=8, in_channels=4,
                                                       num_classes=10)),
}
DEVICE_IMPLS = ("history", "fused")
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


def configs(spec: dict, quick: bool) -> dict[str, ModelConfig]:
    """The preset's model config of every variant, residual first."""
    return {k: model_config(spec["name"], routing=r, **spec["overrides"])
            for k, r in variants(quick).items()}


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
        cfgs = configs(spec, quick)
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


def carried_rows(measured: list[str], out_dir: Path = RESULTS) -> list[dict]:
    """The previous results' rows of the backends this run does not measure (so measuring
    one backend does not drop the others' figures), each marked ``carried``."""
    path = Path(out_dir) / "overhead.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text()).get("rows", [])
    return [{**r, "carried": True} for r in old if r["backend"] not in measured]


def table(rows: list[dict], device_columns: bool = False) -> str:
    """The overhead table (✗: a missed target); ``device_columns`` adds each row's routing
    impl after its variant and its error (a case that failed) at the end."""
    def missed(value, target):
        return " ✗" if value is not None and value > target else ""

    def cell(value):
        return "–" if value is None else str(value).replace("|", "\\|")

    body = []
    for r in rows:
        impl = [cell(r.get("routing_impl"))] if device_columns else []
        body.append([r["backend"], r["preset"], r["variant"], *impl, fmt(r["train_ms"], ".1f"),
                     fmt(r["train_ratio"], ".3f")
                     + missed(r["train_ratio"], TARGETS.get(r["variant"], float("inf"))),
                     fmt(r["img_per_s"], ".0f"), fmt(r["sample_ms"], ".1f"),
                     fmt(r["sample_ratio"], ".3f"), fmt(r["mem_mb"], ".0f"),
                     fmt(r["mem_ratio"], ".2f") + missed(r["mem_ratio"],
                                                          memory_target(r["variant"]))]
                    + ([cell(r.get("error"))] if device_columns else []))
    return md_table(["backend", "preset", "routing", *["routing impl"] * device_columns,
                     "train step ms", "× residual", "img/s", "sample step ms", "× residual",
                     "step peak memory MB", "× residual", *["error"] * device_columns], body)


def targets_line() -> str:
    targets = ", ".join(f"{k} ≤ {v}×" for k, v in TARGETS.items())
    mem_targets = ", ".join(f"{k} ≤ {v}×" for k, v in MEMORY_TARGETS.items())
    return (f"Targets: {targets}; peak memory {mem_targets}, any other ≤ {MEMORY_TARGET}× "
            "(✗ marks a missed target).")


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


# --device cuda: PyTorch on a GPU, as the trainer runs it ---------------------------------

def _row(preset: str, batch: int, impl: str, variant: str, train: dict | None = None,
         sample: dict | None = None, error: str | None = None) -> dict:
    """A device run's row. ``train`` / ``sample``: median seconds of ``variant`` and of
    ``"residual"`` timed interleaved with it (``None`` where the case failed with ``error``)."""
    def ms(pair):
        return None if pair is None else 1e3 * pair[variant]

    def ratio(pair):
        return None if pair is None else pair[variant] / pair["residual"]

    return {"backend": "torch", "preset": preset, "batch": batch, "variant": variant,
            "routing_impl": impl, "train_ms": ms(train), "train_ratio": ratio(train),
            "img_per_s": None if train is None else batch / train[variant],
            "sample_ms": ms(sample), "sample_ratio": ratio(sample), "mem_mb": None,
            "mem_ratio": None, "error": error}


def measure_group(device: str, preset: str, impl: str, batch: int, reps: int, quick: bool,
                  precision: str, compile: bool) -> list[dict]:
    """Training-step and sampling-step medians on ``device`` at ``preset`` of residual and of
    every DAR variant with routing ``impl`` (``torch_cases``: ``precision``'s autocast, the
    training step compiled with ``compile``, CUDA-synchronised). Each DAR case is built and
    stepped once (``torch.compile`` compiles it there; a case that fails is a row with its
    error) and then timed interleaved with the residual case: two models are held at a time
    and every ratio is measured side by side. The residual row's times are the median of its
    pairs'."""
    from benchmarks import torch_cases as cases

    cfgs = configs(DEVICE_PRESETS[preset], quick)

    def build(cfg):
        steps = (cases.train_step(cfg, batch, impl, device, precision, compile),
                 cases.sample_step(cfg, batch, impl, device, precision))
        for step in steps:
            step()
        return steps

    try:
        base = build(cfgs["residual"])
    except Exception as e:
        why = error_line(e)
        return [_row(preset, batch, impl, k, error=why if k == "residual" else f"residual: {why}")
                for k in cfgs]
    rows, pairs = [], []
    for k, cfg in list(cfgs.items())[1:]:
        case = None
        try:
            case = build(cfg)
            pair = tuple(interleaved({"residual": b, k: c}, reps) for b, c in zip(base, case))
            pairs.append(pair)
            rows.append(_row(preset, batch, impl, k, *pair))
        except Exception as e:
            rows.append(_row(preset, batch, impl, k, error=error_line(e)))
        finally:
            case = None
            cases.release(device)
        r = rows[-1]
        print(f"torch {device} {preset} {impl} {k}: " + (
            r["error"] or f"train x{r['train_ratio']:.3f}, sample x{r['sample_ratio']:.3f}"),
            file=sys.stderr)
    if pairs:
        residual = tuple({"residual": statistics.median(p[i]["residual"] for p in pairs)}
                         for i in range(2))
    else:  # every DAR case failed: residual timed alone
        residual = tuple(interleaved({"residual": b}, reps) for b in base)
    return [_row(preset, batch, impl, "residual", *residual)] + rows


def group_rows(device: str, preset: str, impl: str, batch: int, reps: int, quick: bool,
               precision: str, compile: bool) -> list[dict]:
    """``measure_group`` in a fresh process: an error that leaves the process unusable (a
    kernel's illegal memory access poisons its CUDA context) costs only this group, whose
    rows then carry it."""
    flags = ["--device", device, "--presets", preset, "--group-impl", impl, "--batch",
             str(batch), "--reps", str(reps), "--precision", precision] + [
        "--quick"] * quick + ["--no-compile"] * (not compile)
    try:
        return rows_in_fresh_process("benchmarks.bench_overhead", "torch", flags)
    except (subprocess.CalledProcessError, ValueError, IndexError) as e:
        why = f"measuring process failed: {error_line(e)} (its stderr is above)"
        return [_row(preset, batch, impl, k, error=why) for k in variants(quick)]


def add_memory(rows: list[dict], device: str, quick: bool, precision: str,
               compile: bool) -> None:
    """Each timed row's step peak memory (``peak_memory_mb`` with the run's options), every
    case in a fresh process (``mem_probe``), and its ratio to the residual row of its preset
    and impl. A residual model has no routing to choose: one probe serves every impl."""
    probed: dict[tuple, float | str] = {}
    for r in rows:
        if r["error"] is not None:
            continue
        impl = None if r["variant"] == "residual" else r["routing_impl"]
        key = (r["preset"], r["batch"], r["variant"], impl)
        if key not in probed:
            cfg = configs(DEVICE_PRESETS[r["preset"]], quick)[r["variant"]]
            argv = ["-m", "benchmarks.mem_probe", "torch", cfg.to_json(), str(r["batch"]),
                    "--device", device, "--precision", precision,
                    "--routing-impl", r["routing_impl"]] + ["--compile"] * compile
            try:
                probed[key] = probe_mb(argv)
            except (subprocess.CalledProcessError, ValueError, IndexError) as e:
                probed[key] = f"memory probe: {error_line(e)}"
        if isinstance(probed[key], str):
            r["error"] = probed[key]
        else:
            r["mem_mb"] = probed[key]
    residual = {(r["preset"], r["routing_impl"]): r["mem_mb"] for r in rows
                if r["variant"] == "residual"}
    for r in rows:
        base = residual.get((r["preset"], r["routing_impl"]))
        if r["mem_mb"] is not None and base:
            r["mem_ratio"] = r["mem_mb"] / base


def device_markdown(rows: list[dict], info: dict, reps: int, precision: str,
                    compile: bool) -> str:
    """The device run's report: the device and software, the targets, the table."""
    mode = "torch.compile" if compile else "eager"
    peak = ("the CUDA allocator's peak above the held memory" if info["cuda_device"]
            else "the reset peak-RSS mark above the resident set (CPU)")
    return (f"# DAR overhead over residual on {info['device']} ({precision} autocast, "
            f"{mode}; medians of {reps} interleaved reps)\n\n"
            f"Device: {info['device']}; torch {info['torch']} (CUDA {info['cuda']}), "
            f"triton {info['triton']}\n\nMachine: {machine()}\n\n{targets_line()}\n\n"
            "Each preset × routing impl was measured in a fresh process with a residual run "
            "of its own: every ratio is to that residual, timed interleaved with the case. "
            f"Training steps: AdamW, clipping, EMA, {mode}; sampling steps as the sampler "
            f"runs them (inference mode, autocast, not compiled). Peak memory: {peak}, each "
            "case in a fresh process.\n\n"
            + table(rows, device_columns=True))


def run_device(device: str, presets: list[str], impls: list[str], batch: int | None,
               reps: int, quick: bool, precision: str, compile: bool, memory: bool,
               out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """The ``--device`` benchmark: every preset × routing impl in a fresh process
    (``measure_group``), then each case's peak memory; writes
    ``<out_dir>/overhead_<device type>.{json,md}`` and returns both paths. ``device="cpu"``
    runs the same path on the CPU (the smoke test does)."""
    from benchmarks.torch_cases import describe

    rows = []
    for preset in presets:
        b = batch or DEVICE_PRESETS[preset]["batch"]
        for impl in impls:
            rows += group_rows(device, preset, impl, b, reps, quick, precision, compile)
    if memory:
        add_memory(rows, device, quick, precision, compile)
    info = describe(device)
    payload = {"machine": machine(), "device": info, "reps": reps, "precision": precision,
               "compile": compile, "rows": rows}
    return write(f"overhead_{device.split(':')[0]}", payload,
                 device_markdown(rows, info, reps, precision, compile), out_dir)


def require_device(device: str) -> None:
    """Exit with one line (no traceback) where ``device`` is not a CUDA device here."""
    try:
        from benchmarks.torch_cases import check_device

        check_device(device)
    except (ConfigError, ImportError) as e:
        sys.exit(f"no CUDA device: {e}")


def skip_backends(names: list[str], device: str) -> None:
    """One line on stderr for every backend but PyTorch (a ``--device`` run measures it only)."""
    for name in names:
        if name != "torch":
            print(f"{name}: skipped (--device {device} measures PyTorch only)", file=sys.stderr)


def check_device_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """A GPU run's ``--device`` and ``--presets`` checked (one-line errors), the device
    required, the other backends reported skipped; returns the presets (this benchmark's
    and ``bench_routing``'s)."""
    presets = args.presets.split(",")
    if not args.device.startswith("cuda"):
        ap.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if unknown := [p for p in presets if p not in DEVICE_PRESETS]:
        ap.error(f"unknown presets {unknown}; choose from {list(DEVICE_PRESETS)}")
    require_device(args.device)
    skip_backends(args.backends.split(","), args.device)
    return presets


def main_device(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    presets = check_device_args(ap, args)
    j, m = run_device(args.device, presets, args.impls.split(","), args.batch, args.reps,
                      args.quick, args.precision, not args.no_compile, not args.no_memory,
                      args.out)
    print(m.read_text())
    print(f"wrote {j} and {m}")


def add_device_flags(ap: argparse.ArgumentParser, presets_help: str,
                     impls_help: str) -> argparse._ArgumentGroup:
    """``--out`` and the GPU run's ``--device``, ``--presets``, ``--impls`` (this benchmark's
    and ``bench_routing``'s); returns the group for the script's own flags."""
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    gpu = ap.add_argument_group("GPU run (--device cuda)")
    gpu.add_argument("--device", default="cpu",
                     help="cpu: every installed backend on the CPU; cuda[:i]: PyTorch on a GPU")
    gpu.add_argument("--presets", default="SiT-B/2,SiT-XL/2",
                     help=f"{presets_help} {list(DEVICE_PRESETS)}")
    gpu.add_argument("--impls", default=",".join(DEVICE_IMPLS),
                     help=f"routing impls {impls_help}: history, fused")
    return gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="torch,jax,mlx")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="fewer variants")
    ap.add_argument("--no-memory", action="store_true")
    gpu = add_device_flags(ap, "comma-separated, of", "of the DAR variants (DARTransformer's)")
    gpu.add_argument("--batch", type=int, help="per-GPU batch (default: the preset's, 32)")
    gpu.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                     help="autocast precision, as dar train --precision")
    gpu.add_argument("--no-compile", action="store_true", help="eager training steps")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # measure one backend, print JSON rows
    ap.add_argument("--group-impl", help=argparse.SUPPRESS)  # one device group, JSON rows
    args = ap.parse_args()
    if args.one and args.group_impl:
        print(json.dumps(measure_group(args.device, args.presets, args.group_impl, args.batch,
                                       args.reps, args.quick, args.precision,
                                       not args.no_compile)))
        return
    if args.one:
        print(json.dumps(run_backend(args.one, args.reps, args.quick, not args.no_memory)))
        return
    if args.device != "cpu":
        main_device(ap, args)
        return
    rows = []
    measured = installed(args.backends.split(","))
    for name in measured:  # each backend in a fresh process
        flags = ["--reps", str(args.reps)] + ["--quick"] * args.quick + [
            "--no-memory"] * args.no_memory
        rows += rows_in_fresh_process("benchmarks.bench_overhead", name, flags)
    carried = carried_rows(measured, args.out)
    note = (f"Rows of {sorted({r['backend'] for r in carried})} are carried over from the "
            f"previous results file (this run measured {measured} only): they were measured "
            "on another day, so compare ratios within a backend, not times across them.\n\n"
            if carried else "")
    rows += carried
    md = (f"# DAR overhead over residual (medians of {args.reps} interleaved reps)\n\n"
          f"Machine: {machine()}\n\n{targets_line()}\n\n" + note + table(rows)
          + "\n\n## Training throughput relative to the fastest backend (target ≤ 1.5)\n\n"
          + throughput_table(rows))
    j, m = write("overhead", {"machine": machine(), "reps": args.reps, "rows": rows}, md,
                 args.out)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
