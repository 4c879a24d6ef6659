"""Does a custom-autograd history buffer earn its complexity in the torch backend? Side by side
with a plain list of sources on ordinary autograd, the JAX/MLX design.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_torch_history [--reps 7]

In the tables, "History" is ``benchmarks/torch_buffer_history.BufferHistory``, the backend's
routing state until this measurement: one preallocated ``[L+1, B, T, d]`` buffer outside
autograd, carried by the ``_Write``/``_Read`` Functions. "ListHistory" is the backend's
``History`` now (``backends/torch/routing.py``), which replaced it by the rule below: a Python
list of per-source ``[B, T, d]`` tensors (at least float32), each source's inverse RMS
``[B, T]`` computed once when written, the RMSNorm weight and ``1/sqrt(d)`` folded into the
query (``fold_query``), logits stacked as ``[N, B, T]``, softmax over ``N`` and the weighted sum
as one N-term expression, all differentiated by plain autograd.

First a full ``DARTransformer`` forward + backward with each is compared in float32 (outputs
and every parameter gradient, ``rel_err < 1e-5``, asserted). Then the backend trainer's step
(``torch_cases.train_step``: velocity loss, backward, clipping, AdamW, EMA) is timed for both,
interleaved in one process, on ``tiny`` (batch 64) and SiT-S/2 width (32x32x4, batch 8; the
presets of ``bench_overhead``), routing ``static_t`` chunk 4 and ``dynamic`` chunk 1. Peak
memory of a step is ``torch_cases.peak_memory_mb`` in a fresh process per config. The model
picks the implementation by the module-level name ``History`` in
``dar_core.backends.torch.model``, which is swapped for the duration of each call.
Writes ``benchmarks/results/torch_history.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np
import torch

import dar_core.backends.torch.model as torch_model
from benchmarks.bench_overhead import PRESETS
from benchmarks.common import interleaved, machine, md_table, probe_mb, write
from benchmarks.torch_buffer_history import BufferHistory
from benchmarks.torch_cases import peak_memory_mb, train_step
from dar_core.backends.torch import DARTransformer
from dar_core.backends.torch.routing import History
from dar_core.spec.config import ModelConfig, RoutingConfig, model_config
from dar_core.spec.schema import random_params
from dar_core.testing import parity_inputs, rel_err

COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_torch_history"
ROUTINGS = {"static_t c4": RoutingConfig(query="static_t", chunk_size=4),
            "dynamic c1": RoutingConfig(query="dynamic", chunk_size=1)}
TOLERANCE = 1e-5
# Keep History if, at SiT-S/2 width in both routing configs, it is >= 10% faster (throughput
# >= 1.10x: t_List / t_History >= 1.10) or uses >= 10% less peak memory (m_History <= 0.9
# m_List: m_List / m_History >= 1/0.9). Fixed before measuring.
TIME_KEEP, MEM_KEEP = 1.10, 1 / 0.9


IMPLS = {"History": BufferHistory, "ListHistory": History}


@contextlib.contextmanager
def using(impl: str):
    """The model builds ``IMPLS[impl]`` as its routing state while inside."""
    saved = torch_model.History
    torch_model.History = IMPLS[impl]
    try:
        yield
    finally:
        torch_model.History = saved


def configs() -> dict[tuple[str, str], tuple[ModelConfig, int]]:
    return {(p, r): (model_config(spec["name"], routing=rc, **spec["overrides"]), spec["batch"])
            for p, spec in PRESETS.items() for r, rc in ROUTINGS.items()}


def parity(cfg: ModelConfig, batch: int = 3) -> dict[str, float]:
    """Worst relative error of ListHistory against History: output and parameter gradients
    of a float32 forward + backward with dense random parameters (no zero init)."""
    p = {k: v.astype(np.float32) for k, v in random_params(cfg, seed=3).items()}
    x, t, y = parity_inputs(cfg, b=min(batch, 3))
    args = (torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
            torch.tensor(y))
    res = {}
    for impl in IMPLS:
        m = DARTransformer(cfg).load_weights(p)
        with using(impl):
            assert type(m.new_state(torch.zeros(1, 1, cfg.hidden_size))) is IMPLS[impl]
            out = m(*args)
            (out.square().mean() + out.mean()).backward()
        res[impl] = (out.detach(), {k: v.grad for k, v in m.named_parameters()})
    (o_ref, g_ref), (o_new, g_new) = res["History"], res["ListHistory"]
    assert all(g is not None for g in g_ref.values())
    assert any(g_ref[k].abs().max() > 0 for k in g_ref if "router" in k)
    errs = {"output": rel_err(o_new, o_ref)}
    errs["grads_max"] = max(rel_err(g_new[k], g_ref[k]) for k in g_ref)
    worst = max(g_ref, key=lambda k: rel_err(g_new[k], g_ref[k]))
    for what, e in errs.items():
        assert e < TOLERANCE, f"{cfg.routing}: {what} rel_err {e:.2e} (worst grad {worst})"
    return errs


def timings(reps: int) -> dict[tuple[str, str, str], float]:
    out = {}
    cfgs = configs()
    for preset in PRESETS:
        cases = {}
        for (p, r), (cfg, batch) in cfgs.items():
            if p != preset:
                continue
            for impl in IMPLS:
                step = train_step(cfg, batch)

                def run(step=step, impl=impl) -> None:
                    with using(impl):
                        step()

                cases[(p, r, impl)] = run
        med = interleaved(cases, reps)
        out.update(med)
        print(f"{preset}: " + ", ".join(f"{r} {i} {1e3 * s:.1f} ms" for (_, r, i), s
                                        in med.items()), file=sys.stderr)
    return out


def memory() -> dict[tuple[str, str, str], float]:
    out = {}
    for (p, r), (cfg, batch) in configs().items():
        for impl in IMPLS:
            out[(p, r, impl)] = probe_mb(["-m", "benchmarks.bench_torch_history", "--probe",
                                          impl, cfg.to_json(), str(batch)])
            print(f"{p} {r} {impl}: {out[(p, r, impl)]:.0f} MB", file=sys.stderr)
    return out


def verdict(rows: list[dict]) -> str:
    sit = [r for r in rows if r["preset"] == "SiT-S/2"]
    keep = len(sit) == len(ROUTINGS) and all(
        r["time_ratio"] >= TIME_KEEP or r["mem_ratio"] >= MEM_KEEP for r in sit)
    return "keep History" if keep else "replace History by the simpler ListHistory design"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--probe", nargs=3, metavar=("IMPL", "CONFIG_JSON", "BATCH"),
                    help=argparse.SUPPRESS)  # fresh-process peak memory of one config
    args = ap.parse_args()
    if args.probe:
        impl, cfg_json, batch = args.probe
        with using(impl):
            print(peak_memory_mb(ModelConfig.from_json(cfg_json), int(batch)))
        return
    errs = {}
    for (p, r), (cfg, batch) in configs().items():
        errs[f"{p} {r}"] = parity(cfg, batch)
        print(f"parity {p} {r}: {errs[f'{p} {r}']}", file=sys.stderr)
    times = timings(args.reps)
    mem = memory()
    rows = []
    for (p, r), (_, batch) in configs().items():
        th, tl = times[(p, r, "History")], times[(p, r, "ListHistory")]
        mh, ml = mem[(p, r, "History")], mem[(p, r, "ListHistory")]
        rows.append({"preset": p, "batch": batch, "routing": r, "history_ms": 1e3 * th,
                     "list_ms": 1e3 * tl, "time_ratio": tl / th, "history_mb": mh,
                     "list_mb": ml, "mem_ratio": ml / mh})
    decision = verdict(rows)
    body = [[r["preset"], r["routing"], f"{r['history_ms']:.1f}", f"{r['list_ms']:.1f}",
             f"{r['time_ratio']:.3f}", f"{r['history_mb']:.0f}", f"{r['list_mb']:.0f}",
             f"{r['mem_ratio']:.2f}"] for r in rows]
    mach = machine()
    threads = os.environ.get("OMP_NUM_THREADS")
    md = (f"# torch routing history: custom-autograd `History` vs plain-autograd `ListHistory`"
          f"\n\nRegenerate: `{COMMAND}`\n\n"
          f"Machine: {mach}; OMP_NUM_THREADS={threads}, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}\n\n"
          f"Training step (`torch_cases.train_step`: velocity loss, backward, clipping, AdamW, "
          f"EMA), median of {args.reps} interleaved reps after 2 warm-up rounds, both designs "
          "in one process; peak memory of one step above the resident state "
          "(`torch_cases.peak_memory_mb`, reset peak-RSS mark) in a fresh process per config. "
          "Ratios are ListHistory / History (> 1: History is better).\n\n"
          + md_table(["preset", "routing", "History ms", "ListHistory ms",
                      "time ratio List/History", "History peak MB", "ListHistory peak MB",
                      "memory ratio List/History"], body)
          + "\nParity (float32 forward + backward, random parameters, rel_err of ListHistory "
          "against History, asserted < 1e-5): "
          + "; ".join(f"{k}: output {e['output']:.1e}, gradients {e['grads_max']:.1e}"
                      for k, e in errs.items())
          + "\n\nRule (fixed before measuring): keep History if, at SiT-S/2 width in both "
          f"routing configs, it is at least 10% faster (time ratio ≥ {TIME_KEEP:.2f}) or uses "
          f"at least 10% less peak memory (memory ratio ≥ {MEM_KEEP:.3f}). "
          f"Verdict: **{decision}**.\n")
    j, m = write("torch_history", {"machine": mach, "omp_num_threads": threads,
                                   "torch": torch.__version__, "reps": args.reps,
                                   "parity_rel_err": errs, "rows": rows, "verdict": decision},
                 md)
    print(md)
    print(f"wrote {j} and {m}")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
