"""The depth study's statistics and report (``benchmarks/README.md``, "Depth study"): paired
log-FD ratios with t intervals and exact sign-flip permutation p-values, the decision rules,
and whatever phase the study has reached."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from benchmarks.common import read_jsonl


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``x`` and its two-sided t interval (n - 1 degrees of freedom)."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("-inf"), float("inf")
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def sign_flip_p(x: np.ndarray) -> float:
    """Exact two-sided permutation p-value of a zero mean: the share of the 2^n sign flips of
    the paired differences whose |mean| is at least the observed one."""
    x = np.asarray(x, dtype=np.float64)
    obs = abs(x.mean())
    flips = [abs(np.mean(x * np.array(s))) for s in itertools.product((1, -1), repeat=len(x))]
    return float(np.mean([f >= obs - 1e-12 for f in flips]))


def paired(final: dict[tuple[str, int], float], arm: str, base: str) -> dict:
    """Per-seed ``log(FD_arm / FD_base)`` over the seeds both have, with the interval as a
    ratio and the permutation p-value."""
    seeds = sorted(s for (a, s) in final if a == arm and (base, s) in final)
    d = np.array([math.log(final[(arm, s)] / final[(base, s)]) for s in seeds])
    if not len(d):
        return {"seeds": [], "n": 0}
    m, lo, hi = t_interval(d)
    return {"seeds": seeds, "n": len(d), "log_ratios": d.tolist(), "ratio": math.exp(m),
            "ci95": [math.exp(lo), math.exp(hi)], "p_sign_flip": sign_flip_p(d)}


def decisions(primary: dict[str, dict], static_vs_uniform: dict) -> dict[str, str]:
    """The pre-registered rules, applied to whatever the study measured."""
    st = primary.get("static_t c4", {})
    out = {}
    if st.get("n", 0) >= 2:
        better = st["ci95"][1] < 1
        out["DAR is better at depth"] = "yes" if better else "not shown (interval reaches 1)"
        if better:
            ok = static_vs_uniform.get("n", 0) >= 2 and static_vs_uniform["ci95"][1] < 1
            out["learned routing matters"] = "yes" if ok else \
                "not shown (static_t vs uniform c4 interval reaches 1)"
        else:
            out["learned routing matters"] = "not tested (the first rule does not hold)"
    return out


def _final_evals(runs: Path, name: str) -> dict[tuple[str, int], float]:
    out = {}
    for log in runs.glob("*-seed*/final-evals.jsonl"):
        for r in read_jsonl(log):
            if r["eval"] == name:
                out[(r["arm"], int(r["seed"]))] = float(r["fd"])
    return out


def depth_trend(deep: dict, shallow: dict | None, blocks: tuple[int, int]) -> str:
    """The third rule: the deep preset's static_t interval lies below the shallow one's point
    estimate (``blocks``: the deep and the shallow depth, for the message)."""
    st = deep.get("static_t c4", {})
    sh = (shallow or {}).get("static_t c4", {})
    if st.get("n", 0) < 2 or sh.get("n", 0) < 1:
        return "not tested yet (both depths need their static_t ratio at B)"
    return "yes" if st["ci95"][1] < sh["ratio"] else \
        (f"not shown ({blocks[0]}-block interval reaches the {blocks[1]}-block ratio "
         f"{sh['ratio']:.3f})")


def report(out: Path, runs: Path, preset: str, shallow_path: Path | None = None) -> dict:
    """``depth.json`` and ``depth.md`` for the phase the study is in; with ``shallow_path``
    (the 4-block rerun's ``depth.json``), the depth trend."""
    from dar_core.spec.config import model_config

    pilot_path = out / "pilot.json"
    doc: dict = {"pilot": json.loads(pilot_path.read_text()) if pilot_path.exists() else None,
                 "preset": preset, "blocks": model_config(preset).depth}
    lines = [f"# Depth study at {doc['blocks']} blocks (`{preset}`; pre-registered: "
             "benchmarks/README.md, \"Depth study\")", "",
             "Regenerate (each run continues from the committed state; two single-thread "
             "runs at once): `python -m benchmarks.depth_study restore-state --preset all && "
             "OMP_NUM_THREADS=1 python -m benchmarks.depth_study run --jobs 2 && "
             "python -m benchmarks.depth_study analyze --preset all`.", ""]
    if doc["pilot"] is None:
        lines.append("The pilot has not finished: no decision yet. Its evaluations so far:")
        lines += ["", "| lr | step | FD | class acc | segment s |", "|---|---|---|---|---|"]
        done = [r for log in sorted(runs.glob("pilot-*-seed*/evals.jsonl"))
                for r in read_jsonl(log)]
        doc["pilot_partial"] = done
        lines += [f"| {r['lr']:g} | {r['step']} | {r['fd']:.2f} | {r['class_accuracy']:.3f} | "
                  f"{r['segment_train_seconds']:.0f} |" for r in done]
    else:
        d = doc["pilot"]["decision"]
        lines += [f"Pilot outcome: **{d['outcome']}**.", "",
                  "| lr | step | FD | class acc | last-octave slope | meets rule |",
                  "|---|---|---|---|---|---|"]
        for lr, v in d["per_lr"].items():
            lines += [f"| {lr} | {r['step']} | {r['fd']:.2f} | {r['class_accuracy']:.3f} | "
                      f"{r['octave_slope']:.3f} | {'yes' if r['meets_rule'] else 'no'} |"
                      for r in v["rows"]]
        if d.get("amended"):
            lines += ["", "The slope clause was not met by the cap, so B and lr come from the "
                      "protocol's amendment of 2026-12-07 (benchmarks/README.md): the FD "
                      "ratios below are measured on a residual curve that is still improving."]
        if "symptoms" in d:
            sy = d["symptoms"]
            from benchmarks.depth_study import SHALLOW

            verdict = "present" if sy["present"] else \
                "absent (the depth trend's shallow end: reported, its arms still run)" \
                if preset in SHALLOW else "absent: the arms do not run at this preset"
            lines += ["", "Residual symptoms at B (the protocol's check, at every t: mean "
                      "adjacent cosine > 0.9, and gradient RMS falling toward the output in "
                      f">= 80% of adjacent block pairs): **{verdict}**.",
                      "", "| t | mean adjacent cosine | share of pairs with falling gradient |",
                      "|---|---|---|"]
            lines += [f"| {t:g} | {c:.3f} | {g:.2f} |" for t, c, g in zip(
                sy["timesteps"], sy["mean_cosine_per_t"], sy["grad_fall_fraction_per_t"])]
    for name in ("x3-seed0", "x3-seed1"):
        final = _final_evals(runs, name)
        if not final:
            continue
        prim = {arm: paired(final, arm, "residual") for arm in sorted({a for a, _ in final})
                if arm != "residual"}
        svu = paired(final, "static_t c4", "uniform c4")
        doc[name] = {"vs_residual": prim, "static_t_vs_uniform": svu,
                     "decisions": decisions(prim, svu)}
        lines += ["", f"## Final FD ratios at B ({name})", "",
                  "| arm | seeds | FD ratio vs residual | 95% CI | sign-flip p |",
                  "|---|---|---|---|---|"]
        for arm, v in {**prim, "static_t c4 / uniform c4": svu}.items():
            if v["n"]:
                lines.append(f"| {arm} | {v['n']} | {v['ratio']:.3f} | "
                             f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | "
                             f"{v['p_sign_flip']:.3f} |")
        lines += [f"- {k}: **{v}**" for k, v in doc[name]["decisions"].items()]
    from benchmarks.depth_figures import arms_report, diagnostics, plot_trend
    from benchmarks.depth_study import ARMS

    forest = [(f"{arm} / residual ({name})", v) for name in ("x3-seed0", "x3-seed1")
              if name in doc for arm, v in doc[name]["vs_residual"].items()]
    forest += [(f"static_t c4 / uniform c4 ({name})", doc[name]["static_t_vs_uniform"])
               for name in ("x3-seed0", "x3-seed1") if name in doc]
    finals = [r for log in sorted(runs.glob("*-seed*/final-evals.jsonl"))
              for r in read_jsonl(log) if r["eval"] == "x3-seed0"]
    out.mkdir(parents=True, exist_ok=True)
    more, doc["arms"] = arms_report(runs, out, list(ARMS), finals, forest)
    lines += more
    diag_path = out / "pilot-diagnostics.json"
    more, doc["symptoms_at_B"] = diagnostics(
        runs, out, list(ARMS), json.loads(diag_path.read_text()) if diag_path.exists() else None)
    lines += more
    if shallow_path is not None and "x3-seed0" in doc:
        shallow = json.loads(shallow_path.read_text()) if shallow_path.exists() else {}
        sv = shallow.get("x3-seed0", {}).get("vs_residual")
        rule = depth_trend(doc["x3-seed0"]["vs_residual"], sv,
                           (doc["blocks"], shallow.get("blocks", 4)))
        doc["x3-seed0"]["decisions"]["the gain grows with depth"] = rule
        lines += ["", "## Depth trend", "", f"- the gain grows with depth: **{rule}**"]
        if sv:
            by_depth = {shallow["blocks"]: sv, doc["blocks"]: doc["x3-seed0"]["vs_residual"]}
            plot_trend(by_depth, out / "depth-trend.png")
            lines += ["", "`depth-trend.png`; at B, 60 per class, noise seed 0:", "",
                      "| arm | blocks | seeds | FD ratio vs residual | 95% CI |",
                      "|---|---|---|---|---|"]
            lines += [f"| {arm} | {blocks} | {v['n']} | {v['ratio']:.3f} | "
                      f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] |"
                      for blocks, ratios in sorted(by_depth.items())
                      for arm, v in ratios.items() if v.get("n", 0) >= 2]
    (out / "depth.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "depth.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'depth.md'}")
    return doc
