"""Plots people look at instead of reading JSON (matplotlib, Agg backend, atomic PNG writes)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from dar_core.checkpoint import atomic_write_bytes


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def smooth(y: np.ndarray, frac: float = 0.05) -> np.ndarray:
    """Centered moving average over ``frac`` of the points (at least 1)."""
    k = max(1, int(len(y) * frac)) | 1
    if len(y) < k:
        return y
    pad = np.pad(y, (k // 2, k // 2), mode="edge")
    return np.convolve(pad, np.ones(k) / k, mode="valid")


def plot_training(metrics: str | os.PathLike, path: str | os.PathLike) -> None:
    """Loss (raw and smoothed, log scale) and gradient norm against the step."""
    recs = read_jsonl(metrics)
    if not recs:
        return
    plt = pyplot()
    step = np.array([r["step"] for r in recs])
    loss = np.array([r["loss"] for r in recs])
    gn = np.array([r["grad_norm"] for r in recs])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(step, loss, alpha=0.35, lw=0.8, label="loss")
    a.plot(step, smooth(loss), lw=1.8, label="smoothed")
    a.set_yscale("log")
    a.set(xlabel="step", ylabel="velocity MSE", title="training loss")
    a.legend()
    b.plot(step, gn, lw=1.0)
    b.set(xlabel="step", ylabel="global grad norm (before clipping)", title="gradient norm")
    fig.suptitle(str(Path(metrics).parent.name))
    save_figure(fig, path)
