"""Routing micro-benchmark: one aggregator over N sources, forward + backward, optimized vs
the naive four-pass form (``dar_core.spec.routing.route`` on re-stacked sources), per backend.

    python -m benchmarks.bench_routing [--backends torch,jax,mlx] [--reps 20]

Each backend runs in a fresh process of its own, as a user runs it (in one process the
frameworks' thread pools and allocators disturb each other's timings). Writes
``benchmarks/results/routing.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from benchmarks.bench_overhead import installed
from benchmarks.common import interleaved, machine, md_table, rows_in_fresh_process, write
from dar_core.testing import rel_err

SHAPES = [  # (sources N, batch, tokens, width)
    (5, 8, 64, 64), (17, 8, 64, 64), (57, 2, 64, 128), (17, 4, 256, 384)]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="torch,jax,mlx")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # measure one backend, print JSON rows
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.reps)))
        return
    rows = []
    for name in installed(args.backends.split(",")):  # each backend in a fresh process
        rows += rows_in_fresh_process("benchmarks.bench_routing", name,
                                      ["--reps", str(args.reps)])
    body = [[r["backend"], r["N"], f"{r['B']}×{r['T']}×{r['d']}", f"{r['optimized_ms']:.2f}",
             f"{r['naive_ms']:.2f}", f"{r['speedup']:.2f}", f"{r['rel_err']:.1e}"] for r in rows]
    md = ("# Routing micro-benchmark (one aggregator, forward + backward)\n\n"
          f"Machine: {machine()}\n\n" + md_table(
              ["backend", "sources", "B×T×d", "optimized ms", "naive ms", "speedup",
               "max rel. diff"], body))
    write("routing", {"machine": machine(), "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
