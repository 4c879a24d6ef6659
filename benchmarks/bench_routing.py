"""Routing micro-benchmark: one aggregator over N sources, forward + backward, optimized vs
the naive four-pass form (``dar_core.spec.routing.route`` on re-stacked sources), per backend.

    python -m benchmarks.bench_routing [--backends torch,jax,mlx] [--reps 20]
    python -m benchmarks.bench_routing --device cuda [--presets SiT-B/2,SiT-XL/2] [--batch 32]

Each backend runs in a fresh process of its own, as a user runs it (in one process the
frameworks' thread pools and allocators disturb each other's timings). Writes
``benchmarks/results/routing.{json,md}``.

``--device cuda`` measures PyTorch's routing impls on the GPU (``--impls history,fused``:
``History.read``, the per-source ops, and ``FusedHistory.read``, the Triton kernel) against
the naive form, each timed interleaved with it (CUDA-synchronised), at the shapes of the
presets' widest aggregators (``device_shapes``: SiT-XL/2's final aggregator reads 57 sources
of 32x256x1152), in float32 and bf16 sources; the max relative difference is to the naive
route in float32 of the same values. Each impl runs in a fresh process, and a case that
fails is a row with its error. Writes ``benchmarks/results/routing_cuda.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_overhead import (
    DEVICE_PRESETS,
    add_device_flags,
    check_device_args,
    installed,
)
from benchmarks.common import (
    RESULTS,
    error_line,
    fmt,
    interleaved,
    machine,
    md_table,
    rows_in_fresh_process,
    write,
)
from dar_core.spec.config import RoutingConfig, model_config
from dar_core.spec.routing import source_sets
from dar_core.testing import rel_err

SHAPES = [  # (sources N, batch, tokens, width)
    (5, 8, 64, 64), (17, 8, 64, 64), (57, 2, 64, 128), (17, 4, 256, 384)]
DEVICE_CHUNKS = (4, 1)  # chunk 4 (the default DAR) and dense routing (chunk 1)
DEVICE_DTYPES = ("float32", "bfloat16")


def measure(name: str, reps: int) -> list[dict]:
    cases = importlib.import_module(f"benchmarks.{name}_cases")
    rows = []
    for n, b, t, d in SHAPES:
        opt = cases.routing_case(n, b, t, d, "optimized")
        naive = cases.routing_case(n, b, t, d, "naive")
        err = rel_err(cases.to_numpy(opt()), cases.to_numpy(naive()))
        med = interleaved({"optimized": opt, "naive": naive}, reps)
        rows.append({"backend": name, "N": n, "B": b, "T": t, "d": d,
                     "optimized_ms": 1e3 * med["optimized"], "naive_ms": 1e3 * med["naive"],
                     "speedup": med["naive"] / med["optimized"], "rel_err": err})
        print(rows[-1], file=sys.stderr)
    return rows


def table(rows: list[dict], device_columns: bool = False) -> str:
    """The routing table; ``device_columns`` adds each row's case, source dtype and routing
    impl (whose time "optimized ms" is) and its error (a case that failed) at the end."""
    body = []
    for r in rows:
        ids = [r["case"], r["dtype"], r["routing_impl"]] if device_columns else []
        body.append([r["backend"], *ids, r["N"], f"{r['B']}×{r['T']}×{r['d']}",
                     fmt(r["optimized_ms"], ".2f"), fmt(r["naive_ms"], ".2f"),
                     fmt(r["speedup"], ".2f"), fmt(r["rel_err"], ".1e")]
                    + ([(r["error"] or "–").replace("|", "\\|")] if device_columns else []))
    ids = ["case", "sources dtype", "routing impl"] if device_columns else []
    return md_table(["backend", *ids, "sources", "B×T×d", "optimized ms", "naive ms",
                     "speedup", "max rel. diff", *["error"] * device_columns], body)


# --device cuda -----------------------------------------------------------------------------

def device_shapes(presets: list[str], batch: int) -> list[tuple[str, int, int, int, int]]:
    """``(case, N, B, T, d)`` per preset and chunk size in ``DEVICE_CHUNKS``: the preset's
    widest aggregator (most sources) over ``batch`` samples of its tokens and width."""
    out = []
    for preset in presets:
        spec = DEVICE_PRESETS[preset]
        for chunk in DEVICE_CHUNKS:
            cfg = model_config(spec["name"], routing=RoutingConfig(chunk_size=chunk),
                               **spec["overrides"])
            n = max(len(s) for s in source_sets(cfg.num_sublayers, cfg.routing))
            out.append((f"{preset} c{chunk}", n, batch, cfg.grid_size ** 2, cfg.hidden_size))
    return out


def _row(shape: tuple, dtype: str, impl: str, med: dict | None = None, err: float | None = None,
         error: str | None = None) -> dict:
    case, n, b, t, d = shape
    ms = (lambda k: None) if med is None else (lambda k: 1e3 * med[k])
    return {"backend": "torch", "case": case, "dtype": dtype, "routing_impl": impl, "N": n,
            "B": b, "T": t, "d": d, "optimized_ms": ms(impl), "naive_ms": ms("naive"),
            "speedup": None if med is None else med["naive"] / med[impl], "rel_err": err,
            "error": error}


def measure_device(device: str, presets: list[str], impl: str, batch: int,
                   reps: int) -> list[dict]:
    """Forward + backward of one aggregation with routing ``impl`` and of the naive form on
    ``device`` (``torch_cases.routing_case``), timed interleaved, at every shape of
    ``device_shapes`` and source dtype; the max relative difference of ``h`` is to the naive
    route in float32 of the same values. A case that fails is a row with its error."""
    import torch

    from benchmarks import torch_cases as cases

    rows = []
    for shape in device_shapes(presets, batch):
        for dtype in DEVICE_DTYPES:
            args = (*shape[1:], device, getattr(torch, dtype))
            try:
                expected = cases.to_numpy(cases.routing_case(*args[:4], "reference",
                                                             *args[4:])())
                cases.release(device)
                case = cases.routing_case(*args[:4], impl, *args[4:])
                err = rel_err(cases.to_numpy(case()), expected)
                naive = cases.routing_case(*args[:4], "naive", *args[4:])
                rows.append(_row(shape, dtype, impl, interleaved(
                    {"naive": naive, impl: case}, reps), err))
            except Exception as e:
                rows.append(_row(shape, dtype, impl, error=error_line(e)))
            finally:
                case = naive = None
                cases.release(device)
            print(rows[-1], file=sys.stderr)
    return rows


def run_device(device: str, presets: list[str], impls: list[str], batch: int, reps: int,
               out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """The ``--device`` benchmark: every routing impl in a fresh process (``measure_device``;
    an error that leaves the process unusable costs only that impl, whose rows carry it);
    writes ``<out_dir>/routing_<device type>.{json,md}`` and returns both paths.
    ``device="cpu"`` runs the same path on the CPU (the smoke test does)."""
    from benchmarks.torch_cases import describe

    rows = []
    for impl in impls:
        flags = ["--device", device, "--presets", ",".join(presets), "--group-impl", impl,
                 "--batch", str(batch), "--reps", str(reps)]
        try:
            rows += rows_in_fresh_process("benchmarks.bench_routing", "torch", flags)
        except (subprocess.CalledProcessError, ValueError, IndexError) as e:
            why = f"measuring process failed: {error_line(e)} (its stderr is above)"
            rows += [_row(s, dt, impl, error=why) for s in device_shapes(presets, batch)
                     for dt in DEVICE_DTYPES]
    info = describe(device)
    md = (f"# Routing micro-benchmark on {info['device']} (one aggregator, forward + "
          f"backward; medians of {reps} interleaved reps)\n\n"
          f"Device: {info['device']}; torch {info['torch']} (CUDA {info['cuda']}), "
          f"triton {info['triton']}\n\nMachine: {machine()}\n\n"
          "\"optimized ms\" is the row's routing impl, timed interleaved with the naive form "
          "(`route` on the stacked sources) in the same process; the histories hold their "
          "sources in float32 (as in the model, under autocast too). Max rel. diff: of `h`, "
          "to the naive route in float32 of the same values.\n\n"
          + table(rows, device_columns=True))
    payload = {"machine": machine(), "device": info, "reps": reps, "rows": rows}
    return write(f"routing_{device.split(':')[0]}", payload, md, out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="torch,jax,mlx")
    ap.add_argument("--reps", type=int, default=20)
    gpu = add_device_flags(ap, "whose aggregator shapes, of", "compared with naive")
    gpu.add_argument("--batch", type=int, default=32, help="samples per aggregation (default 32)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # measure one backend, print JSON rows
    ap.add_argument("--group-impl", help=argparse.SUPPRESS)  # one device impl, JSON rows
    args = ap.parse_args()
    presets = args.presets.split(",")
    if args.one and args.group_impl:
        print(json.dumps(measure_device(args.device, presets, args.group_impl, args.batch,
                                        args.reps)))
        return
    if args.one:
        print(json.dumps(measure(args.one, args.reps)))
        return
    if args.device != "cpu":
        check_device_args(ap, args)
        j, m = run_device(args.device, presets, args.impls.split(","), args.batch, args.reps,
                          args.out)
        print(m.read_text())
        print(f"wrote {j} and {m}")
        return
    rows = []
    for name in installed(args.backends.split(",")):  # each backend in a fresh process
        rows += rows_in_fresh_process("benchmarks.bench_routing", name,
                                      ["--reps", str(args.reps)])
    md = ("# Routing micro-benchmark (one aggregator, forward + backward)\n\n"
          f"Machine: {machine()}\n\n" + table(rows))
    write("routing", {"machine": machine(), "rows": rows}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
