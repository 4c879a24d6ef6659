"""Analytic cost of the routing per training step: bytes moved and FLOPs of the residual
stream, naive DAR, today's history path and the fused kernels, at SiT-S/B/L/XL (dense, c4, c8),
and the floor on the step time they imply at a given memory bandwidth (docs/spec.md §8).

    python -m benchmarks.routing_cost_model [--bandwidth-tbs 3.35,4.8] [--peak-tflops 989]
        [--mfu 0.5] [--bytes 2] [--patch 2] [--batch 32]

Writes ``benchmarks/results/routing_cost.{json,md}``. Nothing is measured: the counts come from
``dar_core.spec.routing.source_sets`` and the model config, the traffic of each
implementation from the passes listed in ``PASSES`` (one line per pass, in units of one
``[T, d]`` row block of one sample, ``x = T d`` elements).
"""

from __future__ import annotations

import argparse

from benchmarks.common import md_table, write
from dar_core.spec.config import RoutingConfig, model_config
from dar_core.spec.routing import source_sets

SIZES = ("S", "B", "L", "XL")
ROUTINGS = {"dense": 1, "c4": 4, "c8": 8}

# Per source read, by pass: (what it does, reads of the source v, elements moved in x, FLOPs
# per element). "acc" is a source's gradient accumulator: every read of v_j adds into dL/dv_j.
PASSES = {
    "naive": {  # autograd of route's four passes (keys materialized), rstd per read
        "fwd": [("rms: read v", 1, 1, 2), ("keys: read v, write k", 1, 2, 2),
                ("logits: read k", 0, 1, 2), ("sum: read v", 1, 1, 2)],
        "bwd": [("dalpha = g.v: read v", 1, 1, 2), ("acc += alpha g: rmw acc", 0, 2, 2),
                ("dk = beta q: write dk", 0, 1, 1), ("rstd grad dk.v: read dk, v", 1, 2, 2),
                ("acc += dk r w + rstd term: read dk, v, rmw acc", 1, 4, 5)],
    },
    "history": {  # backends/torch/routing.py today: cached rstd, folded query, autograd
        "fwd": [("logit: read v", 1, 1, 2), ("sum: read v", 1, 1, 2)],
        "bwd": [("dalpha = g.v: read v", 1, 1, 2), ("acc += alpha g: rmw acc", 0, 2, 2),
                ("acc += beta r q: rmw acc", 0, 2, 2), ("dq += beta r v: read v", 1, 1, 2)],
    },
    "fused": {  # backends/torch/triton_route.py as built: dv_i written, autograd adds it
        "fwd": [("rms, logit, online softmax: read v", 1, 1, 7)],
        "bwd": [("beta, dv_i, dq: read v", 1, 1, 11), ("write dv_i", 0, 1, 0),
                ("acc += dv_i: read acc and dv_i, write acc", 0, 3, 1)],
    },
    "fused_floor": {  # the same kernel accumulating dL/dv_j in place (a preallocated buffer)
        "fwd": [("read v", 1, 1, 7)],
        "bwd": [("read v", 1, 1, 11), ("rmw acc", 0, 2, 1)],
    },
}
# Per aggregator (DAR): write h in the forward, read g and h in the backward (3 x), plus the
# dynamic query's projection (d^2 MACs per token, forward and twice that backward).
PER_AGGREGATOR = 3
# Residual: per sublayer one stream add forward (read 2, write 1) and one gradient add
# backward (read 2, write 1), 1 FLOP per element each.
RESIDUAL_PER_SUBLAYER = 6


def reads(depth: int, chunk: int) -> int:
    """``R = sum_l |S_l|``: source reads of one forward pass (docs/spec.md §8.1)."""
    return sum(len(s) for s in source_sets(2 * depth, RoutingConfig(chunk_size=chunk)))


def model_flops(cfg) -> float:
    """FLOPs of one training step per sample (forward + backward = 3 forward), the blocks'
    ``12 T d^2 + 2 T^2 d`` MACs (docs/spec.md §8.1), 2 FLOPs each."""
    T, d = cfg.num_tokens, cfg.hidden_size
    return 3 * 2 * cfg.depth * (12 * T * d * d + 2 * T * T * d)


def costs(size: str, patch: int, chunk: int) -> dict:
    cfg = model_config(f"SiT-{size}/{patch}")
    T, d, L = cfg.num_tokens, cfg.hidden_size, cfg.num_sublayers
    x, R, A = T * d, reads(cfg.depth, chunk), L + 1
    out = {"model": f"SiT-{size}/{patch}", "chunk": chunk, "T": T, "d": d, "L": L, "reads": R,
           "model_flops": model_flops(cfg), "dynamic_flops": 3 * 2 * A * T * d * d,
           "residual": {"elements": RESIDUAL_PER_SUBLAYER * L * x, "flops": 2 * L * x}}
    for name, passes in PASSES.items():
        per_read = sum(n for p in passes.values() for _, _, n, _ in p)
        flops = sum(f for p in passes.values() for _, _, _, f in p)
        rms = 0 if name == "naive" else 2 * (L + 1) * x  # cached: once per source written
        out[name] = {"elements": R * per_read * x + A * PER_AGGREGATOR * x,
                     "flops": R * flops * x + rms,
                     "fwd_source_reads": sum(p[1] for p in passes["fwd"]),
                     "bwd_source_reads": sum(p[1] for p in passes["bwd"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bandwidth-tbs", default="3.35,4.8",
                    help="HBM bandwidths, TB/s (H100 SXM 3.35, H200 4.8)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak, TFLOP/s (H100/H200 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.5, help="model FLOP utilisation assumed")
    ap.add_argument("--bytes", type=int, default=2, help="bytes per stored element (bf16: 2)")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="samples per device per step")
    args = ap.parse_args()
    bws = [float(b) for b in args.bandwidth_tbs.split(",")]
    rows = [costs(s, args.patch, c) for s in SIZES for c in ROUTINGS.values()]
    impls = ["residual", "naive", "history", "fused", "fused_floor"]
    body, times = [], []
    for r in rows:
        gb = {k: r[k]["elements"] * args.bytes * args.batch / 1e9 for k in impls}
        body.append([r["model"], _chunk(r["chunk"]), r["reads"],
                     *[f"{gb[k]:.2f}" for k in impls],
                     f"{100 * r['fused']['flops'] / r['model_flops']:.2f}",
                     f"{100 * r['dynamic_flops'] / r['model_flops']:.1f}"])
        t_model = r["model_flops"] * args.batch / (args.peak_tflops * 1e12 * args.mfu)
        for bw in bws:
            ms = {k: 1e3 * gb[k] / (bw * 1e3) for k in impls}
            times.append([r["model"], _chunk(r["chunk"]), f"{bw:g}", f"{1e3 * t_model:.1f}",
                          *[f"{ms[k]:.2f} ({100 * (ms[k] - ms['residual']) / 1e3 / t_model:+.1f}%)"
                            for k in impls]])
    md = _markdown(args, body, times, rows)
    write("routing_cost", {"args": vars(args), "passes": PASSES, "rows": rows}, md)
    print(md)


def _chunk(c: int) -> str:
    return "dense" if c == 1 else f"c{c}"


def _markdown(args, body, times, rows) -> str:
    xl = next(r for r in rows if r["model"].startswith("SiT-XL") and r["chunk"] == 1)
    per = {k: f"{xl[k]['fwd_source_reads']}/{xl[k]['bwd_source_reads']}"
           for k in ("naive", "history", "fused")}
    return (
        "# Routing cost model (analytic, per training step)\n\n"
        "Regenerate: `python -m benchmarks.routing_cost_model "
        f"--bandwidth-tbs {args.bandwidth_tbs} --peak-tflops {args.peak_tflops:g} "
        f"--mfu {args.mfu:g} --bytes {args.bytes} --patch {args.patch} --batch {args.batch}`"
        "\n\nNothing here is measured. Reads `R = sum_l |S_l|` come from "
        "`dar_core.spec.routing.source_sets`; the traffic of each implementation is the sum of "
        "the passes in `benchmarks/routing_cost_model.py::PASSES` (reads of each visible "
        f"source per aggregation, forward/backward: naive {per['naive']}, history "
        f"{per['history']}, fused {per['fused']}), plus 3 `[T, d]` per aggregator (write h; "
        "read g and h) and, except naive, one inverse RMS per source written. `fused` is "
        "the Triton kernel as built "
        "(each read writes its `dv_i`, autograd adds it to the source's gradient: 3 more "
        "passes); `fused_floor` the same kernel accumulating in place. Residual: one stream "
        "add forward and one gradient add backward per sublayer. The dynamic query's "
        "projection is model compute (last column), not routing traffic.\n\n"
        f"## Bytes moved per step (GB, batch {args.batch}, {args.bytes} B per element)\n\n"
        + md_table(["model", "routing", "reads R", "residual", "naive", "history", "fused",
                    "fused floor", "fused FLOPs % of model", "dynamic query FLOPs %"], body)
        + "\n## Floor on routing time per step (ms) and over the residual, relative to the "
        f"model's compute time at {args.peak_tflops:g} TFLOP/s x {args.mfu:g} MFU\n\n"
        "Each cell: bytes / bandwidth (the routing cannot be faster), and in brackets the "
        "extra time over the residual's as a share of the model's compute time. A lower "
        "bound: real kernels reach 70-90% of HBM bandwidth.\n\n"
        + md_table(["model", "routing", "TB/s", "model ms", "residual", "naive", "history",
                    "fused", "fused floor"], times))


if __name__ == "__main__":
    main()
