"""Fitting and comparing quality-vs-iterations curves of the convergence study.

The quality is the Fréchet distance (FD, lower is better) of the fixed-protocol samples.
Per seed, ``log FD`` over the evaluation steps is fitted by a non-increasing isotonic
regression (the best monotone curve; a model that got worse for a while counts as not having
improved), and read between evaluation steps by linear interpolation in ``(log n, log FD)``.
An arm's curve is the mean of its seeds' fitted ``log FD`` curves (still non-increasing).

``iters(q)`` is where an arm's curve first reaches ``FD <= q``: the interpolated step; the
first evaluation step when already there (the speedup is then a lower bound, flagged "≥");
past the budget, an extrapolation along the log-log slope of the last three evaluations, up
to four budgets (flagged "≈"); else infinity. The speedup at ``q`` is ``iters_residual(q) /
iters_arm(q)``; the headline threshold ``q*`` is the residual arm's fitted FD at the end of
its budget, so ``iters_residual(q*)`` is the budget. Confidence intervals come from a
bootstrap over seeds: each replicate resamples every arm's seeds with replacement and
recomputes everything, ``q*`` included. The wall-clock speedup divides by the arm's
training-step time ratio to residual, measured side by side in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
EXTRAPOLATE = 4.0  # read a curve at most this many budgets past its last evaluation


# ------------------------------------------------------------------------------- fitting
def isotonic_nonincreasing(y: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit of ``y`` (pool adjacent violators)."""
    y = np.asarray(y, dtype=np.float64)
    blocks: list[list[float]] = []  # [mean, weight]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


def seed_curves(records: list[dict], arm: str, steps: list[int]) -> dict[int, np.ndarray]:
    """``seed -> fitted log FD`` at ``steps`` for every seed of ``arm`` that has all steps."""
    by_seed: dict[int, dict[int, float]] = {}
    for r in records:
        if r["arm"] == arm:
            by_seed.setdefault(r["seed"], {})[r["step"]] = r["fd"]
    out = {}
    for seed, fd in sorted(by_seed.items()):
        if all(s in fd for s in steps):
            out[seed] = isotonic_nonincreasing(np.log([fd[s] for s in steps]))
    return out


def iters_to_reach(steps: list[int], log_fd: np.ndarray, q: float,
                   extrapolate: float = EXTRAPOLATE) -> tuple[float, str]:
    """``(step, how)``: where the curve first reaches ``FD <= q``.

    ``how`` is ``"interpolated"`` (linear in ``(log step, log FD)`` between evaluations),
    ``"lower_bound"`` (already there at the first evaluation), ``"extrapolated"`` (past the
    budget, along the log-log slope of the last three evaluations, up to ``extrapolate``
    times the budget) or ``"never"`` (``inf``: not improving, or further than that).
    """
    lq = np.log(q)
    ls = np.log(np.asarray(steps, dtype=np.float64))
    below = np.nonzero(log_fd <= lq + 1e-12)[0]
    if below.size == 0:
        slope = np.polyfit(ls[-3:], log_fd[-3:], 1)[0] if len(steps) >= 3 else 0.0
        if slope < 0:
            n = float(np.exp(ls[-1] + (lq - log_fd[-1]) / slope))
            if n <= extrapolate * steps[-1]:
                return n, "extrapolated"
        return float("inf"), "never"
    k = int(below[0])
    if k == 0:
        return float(steps[0]), "lower_bound"
    y0, y1 = log_fd[k - 1], log_fd[k]
    frac = (y0 - lq) / (y0 - y1)
    return float(np.exp(ls[k - 1] + frac * (ls[k] - ls[k - 1]))), "interpolated"


def arm_curve(curves: dict[int, np.ndarray], seeds: list[int]) -> np.ndarray:
    return np.mean([curves[s] for s in seeds], axis=0)


def speedups(curves: dict[str, dict[int, np.ndarray]], steps: list[int],
             thresholds: np.ndarray, picks: dict[str, list[int]]) -> dict[str, dict]:
    """Speedup of every non-residual arm at each threshold and at ``q*``, for the seeds in
    ``picks`` (the arm's seeds, or one bootstrap resample of them)."""
    res = arm_curve(curves["residual"], picks["residual"])
    q_star = float(np.exp(res[-1]))
    budget = float(steps[-1])
    out = {}
    for arm, c in curves.items():
        if arm == "residual":
            continue
        cur = arm_curve(c, picks[arm])
        n_star, how = iters_to_reach(steps, cur, q_star)
        per_q = []
        for q in thresholds:
            n_res, _ = iters_to_reach(steps, res, q)
            n_arm, _ = iters_to_reach(steps, cur, q)
            per_q.append(_ratio(n_res, n_arm))
        out[arm] = {"q_star": q_star, "iters_at_q_star": n_star, "how": how,
                    "speedup_at_q_star": _ratio(budget, n_star), "speedup": per_q}
    return out


def paired_speedup(res: dict[int, np.ndarray], arm: dict[int, np.ndarray],
                   steps: list[int]) -> dict:
    """Per seed, the budget over the iterations the arm's seed needs to reach the same seed's
    final residual FD (paired: same initialisation and data), with a t interval on the log
    speedups (n - 1 degrees of freedom); no interval where a seed's speedup is not finite or
    its seed never reaches that FD."""
    from benchmarks.depth_analysis import t_interval

    seeds = sorted(set(res) & set(arm))
    per = {}
    for s in seeds:
        n, how = iters_to_reach(steps, arm[s], float(np.exp(res[s][-1])))
        per[s] = {"speedup": _ratio(float(steps[-1]), n), "how": how}
    x = np.array([per[s]["speedup"] for s in seeds])
    out = {"per_seed": {str(s): v for s, v in per.items()}, "n": len(seeds)}
    if len(seeds) >= 2 and np.all(np.isfinite(x)) and np.all(x > 0):
        m, lo, hi = t_interval(np.log(x))
        out.update(speedup=float(np.exp(m)), ci95=[float(np.exp(lo)), float(np.exp(hi))])
    return out


def _ratio(a: float, b: float) -> float:
    if np.isinf(a) and np.isinf(b):
        return float("nan")
    return float(a / b) if b > 0 else float("inf")


def bootstrap(curves: dict[str, dict[int, np.ndarray]], steps: list[int],
              thresholds: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict]:
    """Percentile intervals of the speedups over seed resamples."""
    rng = np.random.default_rng(seed)
    seeds = {arm: sorted(c) for arm, c in curves.items()}
    reps = []
    for _ in range(n_boot):
        picks = {arm: list(rng.choice(s, size=len(s), replace=True)) for arm, s in seeds.items()}
        reps.append(speedups(curves, steps, thresholds, picks))
    lo_p, hi_p = (1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2
    out = {}
    for arm in reps[0]:
        star = np.array([r[arm]["speedup_at_q_star"] for r in reps])
        per_q = np.array([r[arm]["speedup"] for r in reps])  # [n_boot, n_thresholds]
        out[arm] = {
            "speedup_at_q_star_ci": _interval(star, lo_p, hi_p),
            "speedup_ci": [_interval(per_q[:, j], lo_p, hi_p) for j in range(len(thresholds))],
            "p_faster": float(np.mean(star > 1.0)),
        }
    return out


def _interval(x: np.ndarray, lo: float, hi: float) -> list[float]:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.quantile(x, lo, method="inverted_cdf")),
            float(np.quantile(x, hi, method="inverted_cdf"))]


# ------------------------------------------------------------------------------ analysis
def analyze(raw: dict, n_boot: int = N_BOOT) -> dict:
    steps = raw["eval_steps"]
    records = raw["records"]
    curves = {arm: seed_curves(records, arm, steps) for arm in raw["arms"]}
    empty = [arm for arm, c in curves.items() if not c]
    if empty:
        raise ValueError(f"arm(s) {empty} have no seed evaluated at every step {steps}")
    res_mean = arm_curve(curves["residual"], sorted(curves["residual"]))
    # Thresholds from the residual's fitted FD at ~1/8 of the budget down to its final FD.
    start = int(np.searchsorted(steps, steps[-1] / 8))
    thresholds = np.exp(np.linspace(res_mean[start], res_mean[-1], 24))
    point = speedups(curves, steps, thresholds, {a: sorted(c) for a, c in curves.items()})
    ci = bootstrap(curves, steps, thresholds, n_boot)
    ratios = raw.get("step_time", {})
    for arm, p in point.items():
        p.update(ci[arm])
        p["paired"] = paired_speedup(curves["residual"], curves[arm], steps)
        r = ratios.get(arm)
        if r:
            p["step_time_ratio"] = r
            p["wall_speedup_at_q_star"] = p["speedup_at_q_star"] / r
            p["wall_speedup_at_q_star_ci"] = [v / r for v in p["speedup_at_q_star_ci"]]
    return {"steps": steps, "thresholds": thresholds.tolist(), "arms": point,
            "curves": {a: {str(s): np.exp(v).tolist() for s, v in c.items()}
                       for a, c in curves.items()}}


def _raw_table(records: list[dict], arm: str, key: str, steps: list[int]) -> np.ndarray:
    """``[seeds, steps]`` of ``key`` for ``arm`` (NaN where missing)."""
    seeds = sorted({r["seed"] for r in records if r["arm"] == arm})
    out = np.full((len(seeds), len(steps)), np.nan)
    for r in records:
        if r["arm"] == arm and r["step"] in steps:
            out[seeds.index(r["seed"]), steps.index(r["step"])] = r[key]
    return out


# -------------------------------------------------------------------------------- output
def plot_quality(raw: dict, path: Path) -> None:
    from dar_core.io.plots import pyplot, save_figure

    plt = pyplot()
    steps = raw["eval_steps"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, arm in enumerate(raw["arms"]):
        color = plt.get_cmap("tab10")(i)
        for ax, key in zip(axes, ("fd", "class_accuracy")):
            tab = _raw_table(raw["records"], arm, key, steps)
            mean = np.nanmean(tab, axis=0)
            ax.fill_between(steps, np.nanmin(tab, axis=0), np.nanmax(tab, axis=0),
                            color=color, alpha=0.18, lw=0)
            ax.plot(steps, mean, "o-", color=color, ms=3,
                    label=f"{arm} ({tab.shape[0]} seeds)")
    floor = np.mean([r["fd_real_floor"] for r in raw["records"]])
    axes[0].plot([], [], " ", label=f"(real images score {floor:.2f})")
    axes[0].set(xscale="log", yscale="log", xlabel="training iterations",
                ylabel="Fréchet distance (evaluator features)",
                title="sample quality (lower is better)")
    axes[1].set(xscale="log", xlabel="training iterations", ylabel="class accuracy",
                title="conditional accuracy (higher is better)", ylim=(0, 1.02))
    axes[0].yaxis.set_major_formatter(_plain())
    axes[0].yaxis.set_minor_formatter(_plain())
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        _step_ticks(ax, steps)
    axes[0].legend(fontsize=8)
    fig.suptitle("Convergence: mean over seeds, band = min..max over seeds")
    fig.tight_layout()
    save_figure(fig, path)


def _plain():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _step_ticks(ax, steps: list[int]) -> None:
    """Label the evaluation steps themselves (no minor log labels)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.xaxis.set_major_locator(FixedLocator(steps[::2]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([str(s) for s in steps[::2]])


def plot_speedup(result: dict, path: Path) -> None:
    from dar_core.io.plots import pyplot, save_figure

    plt = pyplot()
    q = np.array(result["thresholds"])
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, (arm, p) in enumerate(result["arms"].items()):
        color = plt.get_cmap("tab10")(i + 1)
        s = np.array(p["speedup"], dtype=float)
        ci = np.array(p["speedup_ci"], dtype=float)
        cap = 4 * max(1.0, float(np.nanmax(np.where(np.isfinite(s), s, np.nan))))
        ax.fill_between(q, np.maximum(ci[:, 0], 0.0), np.minimum(ci[:, 1], cap), color=color,
                        alpha=0.15, lw=0)
        ax.plot(q, s, "o-", ms=3, color=color, label=f"{arm} (95% CI band)")
    q_star = next(iter(result["arms"].values()))["q_star"]
    ax.axvline(q_star, color="k", ls="--", lw=1, label=f"residual's final FD {q_star:.2f}")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set(xscale="log", xlabel="FD threshold q (harder to the right)",
           ylabel="iters_residual(q) / iters_arm(q)", title="speedup to reach FD <= q")
    ax.invert_xaxis()
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(_plain())
        axis.set_minor_formatter(_plain())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


MARK = {"lower_bound": "≥ ", "extrapolated": "≈ "}


def _fmt_ci(v: float, ci: list[float], how: str = "") -> str:
    def f(x: float) -> str:
        return "0 (never)" if x == 0 else ("∞" if np.isinf(x) else f"{x:.2f}")

    return f"{MARK.get(how, '')}{f(v)}× [{f(ci[0])}, {f(ci[1])}]"


def markdown(raw: dict, result: dict) -> str:
    steps, records = raw["eval_steps"], raw["records"]
    tc = raw["train"]
    res = _raw_table(records, "residual", "fd", steps)
    lines = ["# Convergence study: DAR vs residual at small scale", ""]
    lines += _headline(result)
    lines += ["", "## Setup", "",
              f"- Model `{tc['model']}` ({tc['image_size']}×{tc['image_size']} procedural "
              f"images, {tc['num_classes']} classes), batch {tc['batch_size']}, AdamW lr "
              f"{tc['lr']}, grad clip {tc['grad_clip']}, EMA {tc['ema_decay']} with warm-up, "
              f"{tc['steps']} iterations, {raw['backend']} backend, float32.",
              f"- Arms: {', '.join(raw['arms'])}; {raw['seeds']} seeds each (seed = init and "
              "data stream, shared across arms).",
              f"- Evaluated at steps {steps} on the EMA weights: "
              f"{_protocol(raw['protocol'])}; FD and class accuracy from the shipped evaluator "
              "against 2000 held-out real images.",
              f"- Machine: {raw['machine'].get('cpu_model', raw['machine'].get('processor'))}, "
              f"{raw['machine'].get('cpus')} cores; study wall time "
              f"{raw['study_wall_seconds'] / 3600:.1f} h.",
              "", "## Is the residual arm still improving at the end of its budget?", ""]
    a, b = res[:, -2], res[:, -1]
    lines.append(f"Residual FD at step {steps[-2]} → {steps[-1]}, per seed: " + ", ".join(
        f"{x:.3f} → {y:.3f}" for x, y in zip(a, b))
                 + f". Improving in {int(np.sum(b < a))} of {len(a)} seeds "
                 f"(mean {np.mean(a):.3f} → {np.mean(b):.3f}).")
    lines += ["", "## Quality per arm (mean ± sd over seeds)", ""]
    head = ["arm"] + [str(s) for s in steps] + ["final class acc."]
    rows = []
    for arm in raw["arms"]:
        fd = _raw_table(records, arm, "fd", steps)
        acc = _raw_table(records, arm, "class_accuracy", steps)
        rows.append([arm] + [f"{m:.2f}±{s:.2f}" for m, s in
                             zip(np.nanmean(fd, 0), np.nanstd(fd, 0, ddof=1))]
                    + [f"{np.nanmean(acc[:, -1]):.3f}"])
    lines.append("FD (evaluator features; real-image floor at this sample size "
                 f"{np.mean([r['fd_real_floor'] for r in records]):.3f}) at each step:")
    lines += ["", _table(head, rows), "## Speedup", ""]
    rows = []
    for arm, p in result["arms"].items():
        n = p["iters_at_q_star"]
        rows.append([arm, (MARK.get(p["how"], "") + f"{n:.0f}") if np.isfinite(n)
                     else "not reached",
                     _fmt_ci(p["speedup_at_q_star"], p["speedup_at_q_star_ci"], p["how"]),
                     f"{p['p_faster']:.2f}",
                     f"{p.get('step_time_ratio', float('nan')):.2f}",
                     _fmt_ci(p.get("wall_speedup_at_q_star", float("nan")),
                             p.get("wall_speedup_at_q_star_ci", [float("nan")] * 2),
                             p["how"])])
    q_star = next(iter(result["arms"].values()))["q_star"]
    lines += [f"At the residual arm's final FD q* = {q_star:.3f} (the residual arm reaches it "
              f"at {steps[-1]} iterations by construction):", "",
              _table(["arm", "iterations to q*", "speedup [95% CI]", "P(speedup > 1)",
                      "step time × residual", "wall-clock speedup [95% CI]"], rows),
              "Speedup over a range of thresholds (from the residual's FD at 1/8 of the "
              "budget down to its final FD; each threshold is held fixed across the bootstrap "
              "resamples, so the last row's interval differs from the q* row above, where q* "
              "is recomputed in every resample):", "",
              _table(["FD threshold"] + list(result["arms"]),
                     [[f"{q:.3f}"] + [_fmt_ci(p["speedup"][j], p["speedup_ci"][j])
                                      for p in result["arms"].values()]
                      for j, q in enumerate(result["thresholds"]) if j % 4 == 0
                      or j == len(result["thresholds"]) - 1]),
              "![quality](convergence-quality.png)", "",
              "![speedup](convergence-speedup.png)", "",
              "## Method", "",
              "Per seed, log FD over the evaluation steps is fitted by a non-increasing "
              "isotonic regression and read between steps by linear interpolation in "
              "(log step, log FD); an arm's curve is the mean of its seeds' fitted curves. "
              "iters(q) is where that curve first reaches FD ≤ q (\"≥\" marks a lower bound: "
              "already there at the first evaluation; \"≈\" an extrapolation past the budget "
              "along the log-log slope of the last three evaluations, at most "
              f"{EXTRAPOLATE:g} budgets). Speedup(q) = iters_residual(q) / "
              f"iters_arm(q). Intervals: {N_BOOT} bootstrap resamples of the seeds of every "
              "arm (q* recomputed in each), 2.5–97.5 percentiles. Wall-clock speedup divides "
              "by the training-step time ratio, measured interleaved in one process "
              f"({raw['backend']}, one thread, batch {tc['batch_size']}). With "
              f"{raw['seeds']} seeds the intervals are coarse.", "",
              "## Regenerate", "",
              "```bash",
              "python3 -m nox -s convergence                       # the whole study (hours)",
              "python -m benchmarks.convergence --analyze-only     # tables/plots from the JSON",
              "python -m benchmarks.convergence --retime --reps 20 # step-time ratios again",
              "```", "",
              "Raw records (every evaluation of every seed and arm, with the protocol id): "
              "`convergence.json`. Diagnostics of the final checkpoints (seed 0 of every "
              "arm): `convergence-diagnostics/`."]
    return "\n".join(lines) + "\n"


SUPERSEDED = [
    "**Superseded.** This 4-block study cannot test the paper's claim, and its headline is not "
    "a finding: the residual shows few of the deep-stack symptoms DAR targets at 4 blocks, "
    "training stops early (far above the real-image floor), and 3 seeds give a bootstrap "
    "of only 10 distinct resamples (the paired t intervals below are the honest ones). The "
    "pre-registered 12-block depth study "
    "(`benchmarks/README.md`, \"Depth study\"; `results/depth/depth.md`) replaces it.", ""]


def _headline(result: dict) -> list[str]:
    out = SUPERSEDED + ["**Headline (as first reported; bootstrap over only 3 seeds).**"]
    for arm, p in result["arms"].items():
        lo, hi = p["speedup_at_q_star_ci"]
        s = p["speedup_at_q_star"]
        if lo > 1:
            verdict = "faster than residual"
        elif hi < 1:
            verdict = "slower than residual"
        else:
            verdict = "no speedup established (the interval includes 1)"
        out.append(f"- {arm}: reaches the residual arm's final quality (FD {p['q_star']:.3f}) "
                   f"with speedup {_fmt_ci(s, p['speedup_at_q_star_ci'], p['how'])} "
                   f"in iterations: {verdict}.")
    n = max((p["paired"]["n"] for p in result["arms"].values()), default=0)
    out += ["", "**Paired per seed** (each seed's arm against the same seed's final residual "
            f"FD; 95% t interval, {n - 1} degrees of freedom):"]
    for arm, p in result["arms"].items():
        q = p["paired"]
        each = ", ".join(f"{v['speedup']:.3f}" + ("" if v["how"] == "interpolated"
                                                    else f" ({v['how']})")
                         for v in q["per_seed"].values())
        iv = (f"{q['speedup']:.3f}× [{q['ci95'][0]:.3f}, {q['ci95'][1]:.3f}]" if "ci95" in q
              else "no interval (a seed never reaches it, or its speedup is not finite)")
        out.append(f"- {arm}: per seed {each}; {iv}.")
    return out


def _protocol(p: dict) -> str:
    return (f"{p['n_per_class']} samples per class, {p['sampler']} {p['steps']} steps, "
            f"guidance {p['cfg_scale']}, the same noise and labels for every checkpoint "
            f"(seed {p['seed']})")


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(raw: dict, results: Path) -> dict:
    """Write ``convergence.md``, ``convergence-analysis.json`` and the two PNGs."""
    results = Path(results)
    result = analyze(raw)
    (results / "convergence-analysis.json").write_text(json.dumps(result, indent=1))
    plot_quality(raw, results / "convergence-quality.png")
    plot_speedup(result, results / "convergence-speedup.png")
    md = markdown(raw, result)
    (results / "convergence.md").write_text(md)
    print(md)
    return result


def final_diagnostics(raw: dict, runs: Path, out: Path) -> None:
    """``dar diagnose`` of the final checkpoint of seed 0 of every arm."""
    from dar_core.diagnostics.symptoms import diagnose, headline, write_report

    last = raw["eval_steps"][-1]
    ckpts = [str(runs / f"{arm.replace(' ', '-')}-seed0" / "checkpoints"
                 / f"ckpt-{last:07d}.safetensors") for arm in raw["arms"]]
    result = diagnose(ckpts, backend=raw["backend"])
    for p in write_report(result, out):
        print(f"wrote {p}")
    (out / "headline.txt").write_text("\n".join(headline(result)) + "\n")
