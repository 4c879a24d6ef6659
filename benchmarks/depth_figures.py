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
from benchmarks.common import read_jsonl
from benchmarks.depth_analysis import paired

SECONDARY = ("kid", "class_accuracy", "shape_accuracy", "texture_accuracy")


def arm_records(runs: Path) -> list[dict]:
    """Every evaluation on the arms' ``B / 2^k`` grid (the pilot's runs excluded)."""
    recs = []
    for log in sorted(Path(runs).glob("*-seed*/evals.jsonl")):
        if not log.parent.name.startswith("pilot-"):
            recs += read_jsonl(log)
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
    the runs evaluated at ``B``. A run adopted from the pilot is left out: its segments were
    timed in another study's schedule (other processes beside it, other segment ends)."""
    total: dict[tuple[str, int], float] = {}
    last = max(r["step"] for r in recs)
    done = {(r["arm"], int(r["seed"])) for r in recs if r["step"] == last
            and "adopted_from" not in r}
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


def diagnostics(runs: Path, out: Path, arms: list[str], pilot_diag: dict | None
                ) -> tuple[list[str], dict]:
    """The paper's three symptoms per t at ``B``: each arm's seed-0 run side by side in
    ``diagnostics/`` (symptoms, importance and routing plots of ``dar diagnose``), and per arm
    and t the means over its seeds of the state-RMS growth, the gradient decay and the mean
    adjacent cosine. Before any arm has its diagnostics, the pilot residual's at ``B``."""
    from dar_core.diagnostics.symptoms import write_report

    per_arm: dict[str, list[dict]] = {}
    for arm in arms:
        for f in sorted(Path(runs).glob(f"{arm.replace(' ', '-')}-seed[0-9]/diagnostics.json")):
            per_arm.setdefault(arm, []).append(json.loads(f.read_text()))
    if not per_arm and pilot_diag is None:
        return [], {}
    if not per_arm:
        per_arm = {"residual (pilot)": [pilot_diag]}
    first = next(iter(per_arm.values()))[0]
    models = [dict(d[0]["models"][0], label=arm) for arm, d in per_arm.items()]
    write_report({**first, "models": models}, out / "diagnostics")
    table: dict[str, list[dict]] = {}
    for arm, diags in per_arm.items():
        rows = []
        for i, t in enumerate(first["timesteps"]):
            ps = [d["models"][0]["per_t"][i] for d in diags]
            rows.append({
                "t": t, "seeds": len(ps),
                "state_growth": float(np.mean([p["state_rms"][-1] / p["state_rms"][0]
                                               for p in ps])),
                "grad_decay": float(np.mean([p["grad_rms"][-1] / p["grad_rms"][0]
                                             for p in ps if p.get("grad_rms")
                                             and p["grad_rms"][0]] or [np.nan])),
                "cosine": float(np.mean([np.mean(p["cosine"]) for p in ps]))})
        table[arm] = rows
    lines = ["", "## Symptoms per t at B", "",
             "`diagnostics/symptoms.png` (state RMS, gradient RMS and adjacent cosine over "
             "depth; each arm's seed 0), `diagnostics/importance.png`, and the routing "
             "weights of the DAR arms in `diagnostics/routing-*.png`. Means over seeds:", "",
             "| arm | t | seeds | state RMS z_D/z_1 | grad RMS z_D/z_1 | mean adjacent cosine |",
             "|---|---|---|---|---|---|"]
    for arm, rows in table.items():
        lines += [f"| {arm} | {r['t']:g} | {r['seeds']} | {r['state_growth']:.2f} | "
                  f"{r['grad_decay']:.2f} | {r['cosine']:.3f} |" for r in rows]
    return lines, table


def plot_trend(by_depth: dict[int, dict[str, dict]], path: Path) -> None:
    """Each arm's paired FD ratio vs the residual (95% t interval) at each depth."""
    from dar_core.io.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    arms = sorted({a for v in by_depth.values() for a in v})
    depths = sorted(by_depth)
    for i, arm in enumerate(arms):
        pts = [(d, by_depth[d][arm]) for d in depths
               if by_depth[d].get(arm, {}).get("n", 0) >= 2]
        if not pts:
            continue
        x = np.array([d for d, _ in pts]) + 0.15 * (i - (len(arms) - 1) / 2)
        r = np.array([v["ratio"] for _, v in pts])
        lo = np.array([v["ci95"][0] for _, v in pts])
        hi = np.array([v["ci95"][1] for _, v in pts])
        ax.errorbar(x, r, yerr=[r - lo, hi - r], marker="o", capsize=4, label=arm)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set(yscale="log", xlabel="blocks", xlim=(min(depths) - 1.5, max(depths) + 1.5),
           ylabel="FD ratio vs residual at B (< 1: better)",
           title="Depth trend: paired final FD ratio, 95% t interval")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
