"""The GPU benchmarks' measuring path (``--device cuda``) run on the CPU at the ``micro``
preset, one rep, not compiled: the fresh processes, the error rows, the memory probes and the
tables' structure. Timings are never checked, only that the figures exist and are finite."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytest.importorskip("torch")

from benchmarks import bench_overhead, bench_routing  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.mark.slow  # 7 fresh processes (2 groups, 5 memory probes): ~35-50 s on 2 CPU cores
def test_overhead_device_path(tmp_path, monkeypatch):
    # fused on CPU without Triton's interpreter cannot run: its DAR rows must carry the error
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    j, m = bench_overhead.run_device("cpu", ["micro"], ["history", "fused"], batch=2, reps=1,
                                     quick=True, precision="bf16", compile=False, memory=True,
                                     out_dir=tmp_path)
    assert (j.name, m.name) == ("overhead_cpu.json", "overhead_cpu.md")
    payload = json.loads(j.read_text())
    assert payload["precision"] == "bf16" and payload["compile"] is False
    rows = payload["rows"]
    variants = list(bench_overhead.variants(True))
    for impl in ("history", "fused"):
        assert [r["variant"] for r in rows if r["routing_impl"] == impl] == variants
    timed = [r for r in rows if r["routing_impl"] == "history" or r["variant"] == "residual"]
    for r in timed:
        assert r["error"] is None, r
        for key in ("train_ms", "train_ratio", "img_per_s", "sample_ms", "sample_ratio",
                    "mem_mb"):
            assert _finite(r[key]), (key, r)
        assert r["mem_ratio"] is None or _finite(r["mem_ratio"])
        if r["variant"] == "residual":
            assert r["train_ratio"] == r["sample_ratio"] == 1.0
    for r in rows:
        if r["routing_impl"] == "fused" and r["variant"] != "residual":
            assert r["error"] and r["train_ms"] is None and r["mem_mb"] is None, r
    md = m.read_text()
    header = ("| backend | preset | routing | routing impl | train step ms | × residual | img/s "
              "| sample step ms | × residual | step peak memory MB | × residual | error |")
    assert header in md and "torch 2." in md and "bf16 autocast, eager" in md
    assert md.count("\n| torch | micro |") == len(rows)


def test_routing_device_path(tmp_path, monkeypatch):
    impls = ["history"]
    if HAS_TRITON:  # the kernel under Triton's interpreter, set before the children import it
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        impls.append("fused")
    j, m = bench_routing.run_device("cpu", ["micro"], impls, batch=2, reps=1,
                                    out_dir=tmp_path)
    assert (j.name, m.name) == ("routing_cpu.json", "routing_cpu.md")
    rows = json.loads(j.read_text())["rows"]
    shapes = bench_routing.device_shapes(["micro"], 2)
    assert len(rows) == len(impls) * len(shapes) * len(bench_routing.DEVICE_DTYPES)
    for r in rows:
        assert r["error"] is None, r
        assert r["routing_impl"] in impls and r["dtype"] in bench_routing.DEVICE_DTYPES
        for key in ("optimized_ms", "naive_ms", "speedup", "rel_err"):
            assert _finite(r[key]), (key, r)
        assert r["rel_err"] < 1e-5  # to the float32 naive route of the same values
    md = m.read_text()
    assert ("| backend | case | sources dtype | routing impl | sources | B×T×d | optimized ms "
            "| naive ms | speedup | max rel. diff | error |") in md
    assert md.count("\n| torch | micro c") == len(rows)
