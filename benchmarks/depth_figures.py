"""The depth study's arms, beyond the primary metric (``benchmarks/README.md``, "Depth study",
secondary metrics): quality curves with seed bands, the speedup over FD thresholds with its
crossings, paired iterations to the residual's final FD, KID and accuracies at ``B``,
wall-clock from the segment times the study measured, and the forest plot of the paired
ratios. The curve fitting is the convergence study's (``benchmarks.convergence_analysis``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import convergence_analysis as conv
from benchmarks.depth_analysis import paired

SECONDARY = ("kid", "class_accuracy", "shape_accuracy", "texture_accuracy")


def arm_records(runs: Path) -> list[dict]:
    """Every evaluation on the arms' ``B / 2^k`` grid (the pilot's runs excluded)."""
    recs = []
    for log in sorted(Path(runs).glob("*-seed*/evals.jsonl")):
        if not log.parent.name.startswith("pilot-"):
            recs += [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return recs


def curves(recs: list[dict], arms: list[str], out: Path) -> dict:
    """``depth-quality.png`` (mean over seeds, min..max band) and, for the arms with a seed
    evaluated at every step (once the residual is one of them), the speedups over thresholds
    (``depth-speedup.png``) and the paired per-seed iterations to the residual's final FD."""
    steps = sorted({r["step"] for r in recs})
    present = [a for a in arms if any(r["arm"] == a for r in recs)]
    raw = {"eval_steps": steps, "records": recs, "arms": present}
    conv.plot_quality(raw, out / "depth-quality.png")
    complete = [a for a in present if conv.seed_curves(recs, a, steps)]
    if "residual" not in complete or len(complete) < 2:
        return {"complete_arms": complete}
    result = conv.analyze(dict(raw, arms=complete))
    conv.plot_speedup(result, out / "depth-speedup.png")
    return {"complete_arms": complete, "thresholds": result["thresholds"],
            "arms": {a: {k: p[k] for k in ("q_star", "speedup", "speedup_ci",
                                           "speedup_at_q_star", "speedup_at_q_star_ci",
                                           "paired")}
                     for a, p in result["arms"].items()}}


def secondary(finals: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per arm, mean and sd over seeds of KID and the accuracies of one final evaluation."""
    out: dict[str, dict[str, list[float]]] = {}
    for arm in sorted({r["arm"] for r in finals}):
        rows = [r for r in finals if r["arm"] == arm]
        out[arm] = {k: [float(np.mean([r[k] for r in rows])),
                        float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0]
                    for k in SECONDARY}
        out[arm]["seeds"] = [len(rows), 0.0]
    return out


def wall_clock(recs: list[dict]) -> dict[str, dict]:
    """Paired per-seed ratio of the training seconds to ``B`` (the segments' own times), over
    the runs evaluated at ``B``."""
    total: dict[tuple[str, int], float] = {}
    last = max(r["step"] for r in recs)
    done = {(r["arm"], int(r["seed"])) for r in recs if r["step"] == last}
    for r in recs:
        key = (r["arm"], int(r["seed"]))
        if key in done:
            total[key] = total.get(key, 0.0) + float(r["segment_train_seconds"])
    return {arm: paired(total, arm, "residual")
            for arm in sorted({a for a, _ in total}) if arm != "residual"}


def plot_forest(rows: list[tuple[str, dict]], path: Path) -> None:
    """The paired ratios with their 95% t intervals, one row each, on a log axis."""
    from dar_core.io.plots import pyplot, save_figure

    rows = [(label, v) for label, v in rows if v.get("n", 0) >= 2]
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.4))
    for i, (_, v) in enumerate(reversed(rows)):
        lo, hi = v["ci95"]
        ax.plot([lo, hi], [i, i], color="k", lw=1.5)
        ax.plot([v["ratio"]], [i], "o", color="tab:blue")
        ax.annotate(f"{v['ratio']:.3f} [{lo:.3f}, {hi:.3f}], n={v['n']}", (hi, i),
                    xytext=(6, -3), textcoords="offset points", fontsize=8)
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    ax.set(xscale="log", xlabel="paired FD ratio (95% t interval); < 1: the first is better",
           title="Depth study: paired ratios at B")
    ax.grid(alpha=0.3, axis="x", which="both")
    fig.tight_layout()
    save_figure(fig, path)


def arms_report(runs: Path, out: Path, arms: list[str], finals: list[dict],
                forest: list[tuple[str, dict]]) -> tuple[list[str], dict]:
    """The markdown lines and JSON of everything above, for the arms evaluated so far."""
    recs = arm_records(runs)
    if not recs:
        return [], {}
    doc = {"curves": curves(recs, arms, out), "wall_clock": wall_clock(recs),
           "secondary_at_B": secondary(finals) if finals else {}}
    plot_forest(forest, out / "depth-forest.png")
    lines = ["", "## Secondary metrics", "",
             "Quality over iterations: `depth-quality.png` (mean over seeds, band = min..max); "
             "paired ratios: `depth-forest.png`."]
    c = doc["curves"]
    if "arms" in c:
        lines += ["", "Speedup to reach the residual's final FD (iterations; bootstrap over "
                  "seeds, and paired per seed with a t interval), over thresholds in "
                  "`depth-speedup.png`:", ""]
        for arm, p in c["arms"].items():
            lo, hi = p["speedup_at_q_star_ci"]
            q = p["paired"]
            iv = (f"{q['speedup']:.3f}× [{q['ci95'][0]:.3f}, {q['ci95'][1]:.3f}]"
                  if "ci95" in q else "no interval")
            lines.append(f"- {arm}: {p['speedup_at_q_star']:.3f}× [{lo:.3f}, {hi:.3f}] "
                         f"(bootstrap); paired {iv}")
    else:
        lines += ["", f"Speedups wait for every arm's seeds to reach B (complete so far: "
                  f"{c['complete_arms'] or 'none'})."]
    if doc["wall_clock"]:
        lines += ["", "| arm | seeds | training seconds vs residual | 95% CI |",
                  "|---|---|---|---|"]
        lines += [f"| {a} | {v['n']} | {v['ratio']:.3f} | [{v['ci95'][0]:.3f}, "
                  f"{v['ci95'][1]:.3f}] |" for a, v in doc["wall_clock"].items() if v["n"]]
    if doc["secondary_at_B"]:
        lines += ["", "| arm (at B, 60 per class) | seeds | KID | class acc | shape acc | "
                  "texture acc |", "|---|---|---|---|---|---|"]
        for arm, v in doc["secondary_at_B"].items():
            cells = " | ".join(f"{v[k][0]:.4f} ± {v[k][1]:.4f}" for k in SECONDARY)
            lines.append(f"| {arm} | {int(v['seeds'][0])} | {cells} |")
    return lines, doc
