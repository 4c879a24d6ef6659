"""Plots people look at instead of reading JSON (matplotlib, Agg backend, atomic PNG writes)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from dar_core.io.checkpoint import atomic_write_bytes


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


def plot_symptoms(result: dict, path: str | os.PathLike) -> None:
    """State RMS, gradient RMS and adjacent-block cosine over depth: one line per timestep
    (colour) and per model (line style)."""
    plt = pyplot()
    ts = result["timesteps"]
    cmap = plt.get_cmap("viridis")
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("state_rms", "RMS of block output state z_k", "forward magnitude", True),
              ("grad_rms", "RMS of dLoss/dz_k", "backward magnitude", True),
              ("cosine", "mean token cosine(z_k, z_k+1)", "redundancy", False)]
    for ax, (key, ylabel, title, logy) in zip(axes, panels):
        for mi, m in enumerate(result["models"]):
            for ti, (t, p) in enumerate(zip(ts, m["per_t"])):
                vals = p.get(key)
                if not vals:
                    continue
                xs = np.arange(1, len(vals) + 1)
                ax.plot(xs, vals, styles[mi % len(styles)], color=cmap(ti / max(1, len(ts) - 1)),
                        marker="o", ms=3, label=f"{m['label']}, t={t:g}")
        ax.set(xlabel="block k" if key != "cosine" else "block pair (k, k+1)", ylabel=ylabel,
               title=title)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7,
               bbox_to_anchor=(0.5, -0.02 - 0.035 * (len(labels) // 4)))
    fig.suptitle("Symptoms over depth (t = 0 noise, t = 1 data)")
    fig.tight_layout(rect=(0, 0.08 + 0.03 * (len(labels) // 4), 1, 1))
    save_figure(fig, path)


def plot_routing(model: dict, timesteps: list, path: str | os.PathLike) -> None:
    """Heat maps of token-averaged routing weights (source x aggregator), one per timestep.
    Blank cells are sources the aggregator cannot see."""
    plt = pyplot()
    sources = model["sources"]
    n_agg, n_src = len(sources), max(max(s) for s in sources) + 1
    fig, axes = plt.subplots(1, len(timesteps), figsize=(3.4 * len(timesteps) + 1, 3.8),
                             squeeze=False)
    im = None
    ticks = list(range(0, n_agg - 1, max(1, (n_agg - 1) // 8))) + [n_agg - 1]
    for j, (ax, t, p) in enumerate(zip(axes[0], timesteps, model["per_t"])):
        grid = np.full((n_src, n_agg), np.nan)
        for a, (idx, w) in enumerate(zip(sources, p["routing"])):
            grid[list(idx), a] = w
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set_xticks(ticks, [str(a + 1) if a < n_agg - 1 else "F" for a in ticks])
        ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set(title=f"t = {t:g}", xlabel="aggregator l (F = final)",
               ylabel="source i (0 = embedding)" if j == 0 else None)
    fig.colorbar(im, ax=axes[0].tolist(), label="routing weight α (mean over tokens)")
    fig.suptitle(f"Routing maps: {model['label']}")
    save_figure(fig, path)


def plot_importance(result: dict, path: str | os.PathLike) -> None:
    """Source importance dLoss/dg_i (gate of 1 on source i) against t, one panel per model.
    Negative (blue) = amplifying the source lowers the loss, i.e. the source is useful."""
    plt = pyplot()
    models = [m for m in result["models"] if m["per_t"][0].get("importance")]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models) + 1, 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        grid = np.array([p["importance"] for p in m["per_t"]]).T  # [sources, t]
        lim = float(np.abs(grid).max()) or 1.0
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(result["timesteps"])),
                      [f"{t:g}" for t in result["timesteps"]])
        ax.set(title=m["label"], xlabel="t (0 noise, 1 data)", ylabel="source i")
        fig.colorbar(im, ax=ax, label="dLoss / d gate_i")
    fig.suptitle("Counterfactual source importance")
    save_figure(fig, path)
