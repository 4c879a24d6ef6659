"""Does DAR help when it is added to a pretrained residual model? The pre-registered study of
``benchmarks/README.md`` ("Fine-tuning study"), in resumable phases:

    python -m benchmarks.finetune_study pretrain     # the residual model, to its plateau
    python -m benchmarks.finetune_study continue     # residual / dense DAR / c4 DAR, 3 seeds
    python -m benchmarks.finetune_study analyze      # paired FD ratios over steps
    python -m benchmarks.finetune_study save-state   # what continuing needs -> results

The continuation arms start from the pretrained checkpoint through ``dar train --init-from``
(the graft of ``dar_core.pretrained.graft``): residual (no routing), dense static_t DAR
(``--time-gain``, function-preserving at the start) and c4 static_t DAR (the closest
initialisation, uniform routing). Seed ``s`` of every arm sees the same data stream.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine
from benchmarks.convergence import eval_steps, segmented_run
from benchmarks.depth_analysis import paired
from benchmarks.depth_study import _write, octave_slope, restore_state, save_state
from benchmarks.study_pool import parallel
from dar_core.train.run import TrainConfig

PRETRAIN = TrainConfig(model="tiny", routing="residual", image_size=16, num_classes=24,
                       batch_size=64, lr=1e-3, ema_decay=0.999, ema_warmup=True, per_class=4,
                       sample_steps=16, keep_checkpoints=20, progress=False, device="cpu",
                       seed=100)
PRETRAIN_STEPS = eval_steps(6000, 9)  # 6000 / sqrt(2)^k, k = 0..8
PLATEAU_SLOPE = -0.1  # the pretrained model's last-octave FD slope must be flatter than this
MAX_PRETRAIN = 48000  # no plateau at 6000: double the pretraining (12000, 24000, ...) up to this
CONTINUE_STEPS = 3000
CONTINUE_EVALS = eval_steps(CONTINUE_STEPS, 7)
PROTOCOL = dict(n_per_class=20, sampler="heun", steps=25, cfg_scale=1.0, seed=0)
ARMS = {
    "residual": dict(routing="residual"),
    "dense static_t": dict(routing="dar", query="static_t", chunk_size=1, time_gain=True),
    "c4 static_t": dict(routing="dar", query="static_t", chunk_size=4, time_gain=True),
}
SEEDS = (0, 1, 2)
OUT = RESULTS / "finetune"
REGENERATE = ("Regenerate (each phase resumes): `python -m benchmarks.finetune_study "
              "restore-state` on a fresh clone, then `pretrain`, `continue --jobs 2`, `analyze`.")


def _pretrain_dir(runs: Path) -> Path:
    return runs / "pretrain-residual-seed100"


def pretrain_schedule(budget: int) -> list[int]:
    """The evaluation steps of a pretraining of ``budget`` steps: those of 6000 and, for each
    doubling up to ``budget``, the doubled run's two steps past the previous budget."""
    steps = list(PRETRAIN_STEPS)
    n = PRETRAIN_STEPS[-1]
    while n < budget:
        n *= 2
        steps += [round(n / math.sqrt(2)), n]
    return steps


def pretrain(args: argparse.Namespace) -> None:
    """Pretrain to 6000 steps, then double until the last-octave FD slope is flatter than
    ``PLATEAU_SLOPE`` (the protocol's "extended first"), at most to ``MAX_PRETRAIN``."""
    budget = PRETRAIN_STEPS[-1]
    while True:
        recs = segmented_run(PRETRAIN, _pretrain_dir(Path(args.runs)),
                             pretrain_schedule(budget), PROTOCOL, "torch",
                             dict(arm="pretrain", seed=PRETRAIN.seed))
        slope = octave_slope(recs, budget)
        plateau = slope > PLATEAU_SLOPE
        print(f"pretrained {budget} steps: FD {recs[-1]['fd']:.3f}, last-octave slope "
              f"{slope:.3f} ({'a plateau' if plateau else 'not yet a plateau'})")
        if plateau or budget >= MAX_PRETRAIN:
            break
        budget *= 2
    _write(OUT / "pretrain.json", {"records": recs, "last_octave_slope": slope,
                                   "plateau": plateau, "steps": budget, "machine": machine(),
                                   "command": "python -m benchmarks.finetune_study pretrain"})


def _continue_job(arm: str, seed: int, runs: str) -> list[dict]:
    steps = json.loads((OUT / "pretrain.json").read_text())["steps"]
    init = _pretrain_dir(Path(runs)) / "checkpoints" / f"ckpt-{steps:07d}.safetensors"
    tc = PRETRAIN.replace(**ARMS[arm], seed=seed, init_from=str(init))
    out = Path(runs) / f"continue-{arm.replace(' ', '-')}-seed{seed}"
    return segmented_run(tc, out, CONTINUE_EVALS, PROTOCOL, "torch", dict(arm=arm, seed=seed))


def continue_(args: argparse.Namespace) -> None:
    pre = json.loads((OUT / "pretrain.json").read_text())
    if not pre["plateau"] and pre["steps"] < MAX_PRETRAIN:  # the protocol's cap ends it too
        raise SystemExit(f"the pretrained model is not at a plateau (last-octave slope "
                         f"{pre['last_octave_slope']:.3f}) at {pre['steps']} of at most "
                         f"{MAX_PRETRAIN} steps: run the pretrain phase first")
    parallel([(a, s, args.runs) for s in SEEDS for a in ARMS], _continue_job, args.jobs)


def _finished(run: Path) -> bool:
    """A continuation evaluated at its last step (its checkpoint is no longer needed)."""
    log = run / "evals.jsonl"
    return run.name.startswith("continue-") and log.exists() and any(
        json.loads(x)["step"] == CONTINUE_STEPS for x in log.read_text().splitlines() if x)


def analyze(args: argparse.Namespace) -> None:
    recs = []
    for log in Path(args.runs).glob("continue-*-seed*/evals.jsonl"):
        recs += [json.loads(x) for x in log.read_text().splitlines()]
    steps = sorted({r["step"] for r in recs})
    table = {}
    for n in steps:
        fd = {(r["arm"], int(r["seed"])): float(r["fd"]) for r in recs if r["step"] == n}
        table[n] = {arm: paired(fd, arm, "residual") for arm in ARMS if arm != "residual"}
    lines = ["# Fine-tuning study (pre-registered: benchmarks/README.md, \"Fine-tuning study\")",
             "", REGENERATE, ""]
    pre_json = OUT / "pretrain.json"
    pre = json.loads(pre_json.read_text()) if pre_json.exists() else {}
    if "steps" in pre:  # written by the pretrain phase once it has ended
        end = pre["records"][-1]
        lines += [f"Pretrained residual `tiny`: {pre['steps']} steps, FD {end['fd']:.3f}, class "
                  f"accuracy {end['class_accuracy']:.3f}, last-octave FD slope "
                  f"{pre['last_octave_slope']:.3f}: "
                  + ("a plateau." if pre["plateau"] else
                     f"not a plateau; {MAX_PRETRAIN} is the protocol's cap, so the "
                     "continuations start there."), ""]
    lines += ["| step | arm | seeds | FD ratio vs residual | 95% CI | sign-flip p |",
             "|---|---|---|---|---|---|"]
    for n, arms in table.items():
        for arm, v in arms.items():
            if v["n"]:
                lines.append(f"| {n} | {arm} | {v['n']} | {v['ratio']:.3f} | "
                             f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | "
                             f"{v['p_sign_flip']:.3f} |")
    final = table.get(CONTINUE_STEPS, {})
    for arm, v in final.items():
        if v.get("n", 0) >= 2:
            verdict = "helps" if v["ci95"][1] < 1 else (
                "hurts" if v["ci95"][0] > 1 else "no difference shown")
            lines.append(f"- {arm} at {CONTINUE_STEPS} steps: **{verdict}** "
                         f"(ratio {v['ratio']:.3f}, 95% CI [{v['ci95'][0]:.3f}, "
                         f"{v['ci95'][1]:.3f}])")
    if not recs:
        lines.append("No continuation has been evaluated yet. The pretraining so far:")
        lines += ["", "| step | FD | class acc |", "|---|---|---|"]
        for log in sorted(Path(args.runs).glob("pretrain-*/evals.jsonl")):
            for r in map(json.loads, log.read_text().splitlines()):
                lines.append(f"| {r['step']} | {r['fd']:.2f} | {r['class_accuracy']:.3f} |")
    _write(OUT / "finetune.json", {"by_step": {str(k): v for k, v in table.items()},
                                   "records": recs})
    (OUT / "finetune.md").write_text("\n".join(lines) + "\n")
    _plot(recs, OUT / "finetune.png", pre)
    print(f"wrote {OUT / 'finetune.md'}")


def _plot(recs: list[dict], path: Path, pre: dict) -> None:
    if not recs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        by_step: dict[int, list[float]] = {}
        for r in recs:
            if r["arm"] == arm:
                by_step.setdefault(r["step"], []).append(math.log(r["fd"]))
        if not by_step:
            continue
        s = sorted(by_step)
        m = np.array([np.mean(by_step[k]) for k in s])
        lo = np.array([min(by_step[k]) for k in s])
        hi = np.array([max(by_step[k]) for k in s])
        ax.plot(s, np.exp(m), label=arm)
        ax.fill_between(s, np.exp(lo), np.exp(hi), alpha=0.2)
    if "steps" in pre:
        ax.axhline(pre["records"][-1]["fd"], color="k", ls="--", lw=1,
                   label=f"pretrained ({pre['steps']} steps)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("continuation step")
    ax.set_ylabel("FD (seed range shaded)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=("pretrain", "continue", "analyze", "save-state",
                                      "restore-state"))
    ap.add_argument("--runs", default="runs/finetune")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if args.phase == "save-state":
        save_state(args, OUT, finished=_finished)
        return
    if args.phase == "restore-state":
        restore_state(args, OUT)
        return
    {"pretrain": pretrain, "continue": continue_, "analyze": analyze}[args.phase](args)


if __name__ == "__main__":
    main()
