"""The paper's three symptoms and DAR's routing maps, at every timestep.

For a model and a fixed evaluation batch (held-out images, fixed noise), at each ``t``:

1. forward magnitude: RMS of each block's output state ``z_k``;
2. backward magnitude: RMS of ``dLoss/dz_k``;
3. redundancy: mean per-token cosine similarity of ``z_k`` and ``z_{k+1}``;
4. DAR: routing weights ``alpha_{i->l}(t)`` of every aggregator, averaged over tokens;
5. importance of every source: ``dLoss/dg_i`` for a measurement-only gate ``g_i = 1`` on
   source ``v_i`` (docs/spec.md §1); for a residual model this is counterfactual routing.

``z_k`` (k = 1..D) is the state block ``k`` hands onward: the input of the next block's
attention sublayer, or of the final layer after the last block. In a residual model it is
the stream ``v_0 + sum v_j``; in DAR it is the aggregated (routed) input.

The loss is the training loss at fixed ``(x, noise, y)``. A backend supplies one pass
(``measure``); the reductions here are array-API generic, so they run on the backend's arrays.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.spec.config import ModelConfig
from dar_core.xp import namespace

DEFAULT_TIMESTEPS = (0.0, 0.25, 0.5, 0.75, 1.0)


def block_state_indices(cfg: ModelConfig) -> list[int]:
    """Aggregator indices whose input is ``z_1 .. z_D``."""
    return [2 * k for k in range(1, cfg.depth)] + [cfg.num_sublayers]


def rms(a: Any) -> float:
    xp = namespace(a)
    return float(xp.sqrt(xp.mean(a * a)))


def token_cosine(a: Any, b: Any, eps: float = 1e-12) -> float:
    """Mean over tokens of ``cos(a_tok, b_tok)`` for ``[B, T, d]`` states."""
    xp = namespace(a, b)
    num = xp.sum(a * b, axis=-1)
    den = xp.sqrt(xp.sum(a * a, axis=-1) * xp.sum(b * b, axis=-1)) + eps
    return float(xp.mean(num / den))


def summarize_pass(
    cfg: ModelConfig,
    loss: float,
    inputs: list[Any],
    input_grads: list[Any] | None,
    weights: list[Any],
    gate_grads: list[float] | None,
) -> dict[str, Any]:
    """Reduce one pass: ``inputs`` are the L+1 aggregated inputs ``[B, T, d]`` (and their
    gradients), ``weights`` the per-aggregator routing weights ``[N, B, T]`` (DAR only)."""
    idx = block_state_indices(cfg)
    z = [inputs[i] for i in idx]
    out: dict[str, Any] = {
        "loss": float(loss),
        "state_rms": [rms(a) for a in z],
        "cosine": [token_cosine(a, b) for a, b in zip(z[:-1], z[1:])],
        "grad_rms": None if input_grads is None else [rms(input_grads[i]) for i in idx],
        "importance": None if gate_grads is None else [float(g) for g in gate_grads],
    }
    if cfg.routing.is_dar and weights:
        out["routing"] = [
            [float(v) for v in np.asarray(_mean_over_tokens(w), dtype=np.float64)]
            for w in weights
        ]
    return out


def _mean_over_tokens(w: Any) -> Any:
    xp = namespace(w)
    return xp.mean(xp.mean(w, axis=-1), axis=-1)


def eval_batch(cfg: ModelConfig, n: int = 32, seed: int = 0, data: str = "procedural",
               data_seed: int = 0, holdout: int = 0) -> dict[str, np.ndarray]:
    """Held-out images with fixed noise: the same batch for every checkpoint. Folder data
    trained without a hold-out has none: its first training batch of ``n`` stands in (the
    symptoms measure the network's signal flow, not generalisation)."""
    from dar_core.io.data import make_dataset

    ds = make_dataset(data, image_size=cfg.input_size, num_classes=cfg.num_classes,
                      seed=data_seed, holdout=holdout)
    x, y = ds.heldout(n)
    if len(x) == 0:
        x, y = ds.train_batch(0, n)
    rng = np.random.default_rng([seed, 5])
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    return {"x": x.astype(np.float32), "y": y.astype(np.int64), "noise": noise}


def reference_measure(cfg: ModelConfig, weights: dict[str, np.ndarray],
                      batch: dict[str, np.ndarray], t: float) -> dict[str, Any]:
    """Forward-only pass with the float64 NumPy reference (no gradients: metrics 2 and 5 are
    reported as null). For small models when no backend is installed."""
    from dar_core.spec.interpolant import interpolate, velocity_target
    from dar_core.spec.reference import Trace, forward

    x, noise = batch["x"].astype(np.float64), batch["noise"].astype(np.float64)
    tt = np.full(len(x), t)
    tr = Trace()
    pred = forward(weights, cfg, interpolate(x, noise, tt), tt, batch["y"], trace=tr)
    loss = float(np.mean((pred - velocity_target(x, noise)) ** 2))
    return summarize_pass(cfg, loss, tr.inputs, None, tr.weights, None)


def diagnose(
    checkpoints: list[str],
    timesteps: tuple[float, ...] = DEFAULT_TIMESTEPS,
    *,
    n: int = 32,
    backend: str = "auto",
    weights: str = "ema",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Every number, for every checkpoint and timestep, as one JSON-ready dict (``progress``:
    a bar over the passes on stderr). Labels name each model; checkpoints with the same file
    name are told apart by their folders."""
    from dar_core.backend import installed_backends, load_backend
    from dar_core.errors import ConfigError, InputError
    from dar_core.io.checkpoint import load_checkpoint

    bad = [t for t in timesteps if not 0.0 <= t <= 1.0]
    if bad:
        raise ConfigError(f"timesteps must lie in [0, 1], got {bad[0]!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if backend == "auto":
        usable = [b for b in installed_backends()
                  if hasattr(load_backend(b), "measure")]
        backend = usable[0] if usable else "reference"
    result: dict[str, Any] = {"timesteps": list(timesteps), "backend": backend, "n": n,
                              "models": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(checkpoints) * len(timesteps), unit="pass", desc="diagnose",
                   dynamic_ncols=True, file=sys.stderr)
    names = _distinct_names([str(c) for c in checkpoints])
    for path, name in zip(checkpoints, names):
        ck = load_checkpoint(path)
        cfg = ck.config
        train = ck.meta.get("train", {})
        batch = eval_batch(cfg, n, seed, train.get("data", "procedural"), train.get("seed", 0),
                           train.get("holdout", 0))
        w = ck.weights(weights)
        if backend == "reference":
            measure = reference_measure
        else:
            mod = load_backend(backend)
            if not hasattr(mod, "measure"):
                raise ConfigError(f"backend {backend!r} has no diagnostics pass; use torch "
                                  "or 'reference'")
            measure = mod.measure
        passes = []
        for t in timesteps:
            passes.append(measure(cfg, w, batch, t))
            if bar is not None:
                bar.update(1)
        for t, p in zip(timesteps, passes):
            if not np.isfinite(p["loss"]) or not np.isfinite(p["state_rms"]).all():
                raise InputError(f"checkpoint {str(path)!r} ({weights} weights) gives a "
                                 f"non-finite loss or state at t={t}: nothing to diagnose")
        result["models"].append({
            "checkpoint": str(path),
            "label": _label(name, cfg, ck.meta),
            "config": cfg.to_dict(),
            "step": ck.meta.get("step"),
            "sources": [list(s) for s in _sources(cfg)],
            "per_t": passes,
        })
    if bar is not None:
        bar.close()
    return result


def _distinct_names(paths: list[str]) -> list[str]:
    """The shortest trailing part of each path (file stem, then with its folders) that tells
    it apart from the others; the same path given twice gets ``#2``, ``#3``..."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    names = []
    for i, own in enumerate(parts):
        for k in range(1, len(own) + 1):
            tail = own[-k:]
            if all(o[-k:] != tail for j, o in enumerate(parts) if j != i and o != own):
                break
        name = "/".join(tail)
        repeat = sum(1 for o in parts[:i] if o == own)
        names.append(name + (f" #{repeat + 1}" if repeat else ""))
    return names


def _sources(cfg: ModelConfig) -> list[tuple[int, ...]]:
    from dar_core.spec.routing import source_sets

    return source_sets(cfg.num_sublayers, cfg.routing)


def _label(name: str, cfg: ModelConfig, meta: dict) -> str:
    r = cfg.routing
    kind = "residual" if not r.is_dar else f"DAR {r.query} c{r.chunk_size}"
    step = meta.get("step")
    return f"{kind}" + (f" @{step}" if step is not None else "") + f" ({name})"


def save_json(result: dict[str, Any], path: str | Path) -> None:
    from dar_core.io.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(result, indent=1).encode())


def _ratio(a: float, b: float) -> str:
    """``a / b`` for the headline; an untrained model's zero-initialised last layer passes no
    gradient back, so ``b`` can be 0."""
    return f"{a / b:.3g}" if b else ("n/a (0/0)" if not a else "inf (denominator 0)")


def headline(result: dict[str, Any]) -> list[str]:
    """One line per model and timestep: growth factor, gradient decay, mean adjacent cosine."""
    lines = []
    for m in result["models"]:
        for t, p in zip(result["timesteps"], m["per_t"]):
            s = p["state_rms"]
            line = f"{m['label']}  t={t:.2f}  loss={p['loss']:.4f}  " \
                   f"state RMS z_D/z_1={_ratio(s[-1], s[0])}"
            if p["grad_rms"]:
                g = p["grad_rms"]
                line += f"  grad RMS z_1/z_D={_ratio(g[0], g[-1])}"
            if p["cosine"]:
                line += f"  mean cos(z_k,z_k+1)={np.mean(p['cosine']):.3f}"
            lines.append(line)
    return lines


def write_report(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``diagnostics.json`` plus the PNGs; returns the written paths."""
    from dar_core.io.plots import plot_importance, plot_routing, plot_symptoms

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "diagnostics.json", out / "symptoms.png", out / "importance.png"]
    save_json(result, paths[0])
    plot_symptoms(result, paths[1])
    plot_importance(result, paths[2])
    for i, m in enumerate(result["models"]):
        if m["per_t"][0].get("routing"):
            p = out / f"routing-{i}.png"
            plot_routing(m, result["timesteps"], p)
            paths.append(p)
    return [p for p in paths if p.exists()]
