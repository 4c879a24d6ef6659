"""Does DAR pay off at depth, and is it the learned routing? The pre-registered study of
``benchmarks/README.md`` ("Depth study"), in resumable phases:

    python -m benchmarks.depth_study run              # all of it: pilots, then the arms
    python -m benchmarks.depth_study pilot            # residual lr 1e-3 / 2e-3 to the cap
    python -m benchmarks.depth_study arms             # the four arms at the pilot's lr and B
    python -m benchmarks.depth_study analyze          # tables, decision rules, plots
    python -m benchmarks.depth_study save-state       # copy what continuing needs into results

``--preset`` picks the study: ``deep24`` (24 blocks, the default: ``runs/depth-deep24``,
``results/depth/deep24``), ``tiny`` (the same protocol at 4 blocks, for the depth trend, which
the deep24 report reads), ``deep`` and ``deep16`` (12 and 16 blocks: their pilots did not pass
the symptom check), or ``all`` for analyze, save-state and restore-state.

Every phase continues where a killed one stopped (each run trains in segments from its own
checkpoint and logs its evaluations). ``save-state`` copies each run's logs and, while it is
not finished, its newest checkpoint to ``<results>/state/`` so a later session continues from
the commit (``restore-state`` puts them back under the runs folder). To continue the study:

    python -m benchmarks.depth_study restore-state --preset all
    OMP_NUM_THREADS=1 python -m benchmarks.depth_study run --jobs 2
    python -m benchmarks.depth_study save-state --preset all   # after stopping it (SIGTERM)
    python -m benchmarks.depth_study analyze --preset all
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine, read_jsonl
from benchmarks.convergence import eval_steps, segmented_run
from benchmarks.study_pool import parallel, run_pool
from dar_core.train.run import TrainConfig

BASE = TrainConfig(model="deep", image_size=16, num_classes=24, batch_size=64, lr=1e-3,
                   ema_decay=0.999, ema_warmup=True, per_class=4, sample_steps=16,
                   keep_checkpoints=20, progress=False, device="cpu")
PROTOCOL = dict(n_per_class=20, sampler="heun", steps=25, cfg_scale=1.0, seed=0)
FINAL_PROTOCOLS = {"x3-seed0": dict(PROTOCOL, n_per_class=60, seed=0),
                   "x3-seed1": dict(PROTOCOL, n_per_class=60, seed=1)}
PILOT_LRS = (1e-3, 2e-3)
CAP = 16_000
PILOT_STEPS = eval_steps(CAP, 13)  # 16000 / sqrt(2)^k, k = 0..12
MIN_B, MIN_ACC, MAX_SLOPE = 1000, 0.5, -0.25
ARMS = {  # name -> (TrainConfig fields, seeds)
    "residual": (dict(routing="residual"), (0, 1, 2, 3)),
    "static_t c4": (dict(routing="dar", query="static_t", chunk_size=4), (0, 1, 2, 3)),
    "uniform c4": (dict(routing="dar", query="static", chunk_size=4, freeze_routing=True),
                   (0, 1, 2, 3)),
    "dynamic c4": (dict(routing="dar", query="dynamic", chunk_size=4), (0, 1)),
}
OUT = RESULTS / "depth"
SHALLOW = ("tiny",)  # the depth trend's shallow end: no symptom gate
# preset -> (results folder, default runs folder): the 4-block rerun for the depth trend, the 12-
# and 16-block pilots that did not pass the symptom check, and the study at 24 blocks. In this
# order `--preset all` takes them: the 4-block report first, as the deeper ones read it.
PRESETS = {"tiny": (OUT / "tiny", "runs/depth-tiny"), "deep": (OUT, "runs/depth"),
           "deep16": (OUT / "deep16", "runs/depth-deep16"),
           "deep24": (OUT / "deep24", "runs/depth-deep24")}
DEFAULT = "deep24"


def run_dir(runs: Path, name: str, seed: int, lr: float | None = None) -> Path:
    tag = name.replace(" ", "-") + (f"-lr{lr:g}" if lr is not None else "")
    return runs / f"{tag}-seed{seed}"


# Pilot ----------------------------------------------------------------------------------------
def octave_slope(records: list[dict], n: int) -> float:
    """Least-squares slope of log FD on log step over the evaluations in ``[n/2, n]``."""
    pts = [(r["step"], r["fd"]) for r in records if n / 2 <= r["step"] <= n]
    if len(pts) < 2:
        return float("nan")
    s, f = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(s, f, 1)[0])


def pilot_budget(records: list[dict]) -> dict:
    """The pre-registered rule for one lr: the smallest evaluated ``n >= MIN_B`` with class
    accuracy >= MIN_ACC and a last-octave FD slope flatter than MAX_SLOPE (None if none)."""
    rows = []
    for r in sorted(records, key=lambda r: r["step"]):
        slope = octave_slope(records, r["step"])
        ok = r["step"] >= MIN_B and r["class_accuracy"] >= MIN_ACC and slope > MAX_SLOPE
        rows.append({"step": r["step"], "fd": r["fd"], "class_accuracy": r["class_accuracy"],
                     "octave_slope": slope, "meets_rule": bool(ok)})
    met = [row["step"] for row in rows if row["meets_rule"]]
    return {"B": met[0] if met else None, "rows": rows,
            "evaluated_to": rows[-1]["step"] if rows else 0}


def pilot_decision(by_lr: dict[float, list[dict]]) -> dict:
    """lr and B of the study: the lr with the smaller B (the lower lr on a tie)."""
    per_lr = {lr: pilot_budget(recs) for lr, recs in sorted(by_lr.items())}
    ok = [(v["B"], lr) for lr, v in per_lr.items() if v["B"] is not None]
    done = all(v["evaluated_to"] >= CAP for v in per_lr.values())
    amended = False
    if ok:
        B, lr = min(ok)
        outcome = f"lr {lr:g}, B = {B} steps"
    elif done:  # the amendment of 2026-12-07: B is the cap, lr the lower FD there
        at_cap = {lr: next(r for r in v["rows"] if r["step"] == CAP)
                  for lr, v in per_lr.items()}
        lr = min(at_cap, key=lambda k: (at_cap[k]["fd"], k))
        row, amended = at_cap[lr], True
        if row["class_accuracy"] >= MIN_ACC:
            B = CAP
            outcome = (f"no lr meets the slope clause by the cap; by the amendment lr {lr:g}, "
                       f"B = {CAP} steps (FD {row['fd']:.3f}, class accuracy "
                       f"{row['class_accuracy']:.3f}, last-octave slope "
                       f"{row['octave_slope']:.2f})")
        else:
            B, lr = None, None
            outcome = ("no lr meets the rule by the cap, and the lower FD there has class "
                       "accuracy below 0.5: the arms do not run at this preset")
    else:
        B, lr = None, None
        outcome = "pilot incomplete: no lr meets the rule yet"
    return {"lr": lr, "B": B, "complete": done or bool(ok), "outcome": outcome,
            "amended": amended, "per_lr": {f"{k:g}": v for k, v in per_lr.items()}}


def symptoms_present(diag: dict) -> dict:
    """The pre-registered symptom check on ``dar diagnose``'s result for the residual at B:
    mean adjacent cosine above 0.9, and the gradient RMS of the block states falling with the
    block index (the paper's decay toward the output; the erratum of 2026-12-07) in at least
    80% of adjacent pairs, at every t."""
    per_t = diag["models"][0]["per_t"]
    cos = [float(np.mean(p["cosine"])) for p in per_t]
    falls = []
    for p in per_t:
        g = p["grad_rms"]
        pairs = [b < a for a, b in zip(g, g[1:])]
        falls.append(sum(pairs) / len(pairs) if pairs else 0.0)
    ok = all(c > 0.9 for c in cos) and all(f >= 0.8 for f in falls)
    return {"timesteps": list(diag["timesteps"]), "mean_cosine_per_t": cos,
            "grad_fall_fraction_per_t": falls, "present": ok}


def _pilot_job(lr: float, runs: str, preset: str) -> list[dict]:
    return segmented_run(BASE.replace(model=preset, routing="residual", lr=lr, seed=0),
                         run_dir(Path(runs), "pilot-residual", 0, lr), PILOT_STEPS, PROTOCOL,
                         "torch", dict(arm="residual", seed=0, lr=lr))


def _evals(run: Path) -> list[dict]:
    return read_jsonl(run / "evals.jsonl")


def _final_done(run: Path) -> set[str]:
    """The final evaluations (``FINAL_PROTOCOLS`` names) ``run`` has logged."""
    return {r["eval"] for r in read_jsonl(run / "final-evals.jsonl")}


def _at_cap(run: Path) -> bool:
    return any(r["step"] == CAP for r in _evals(run))


def decide(preset: str, runs: Path, out: Path) -> dict:
    """The pilot's decision from its logged evaluations: lr and B, the symptom check on the
    residual at B (with ``dar diagnose``'s result kept), the adoption of the pilot's run as the
    residual arm's seed 0 when the arms may run; ``pilot.json``."""
    decision = pilot_decision({lr: _evals(run_dir(runs, "pilot-residual", 0, lr))
                               for lr in PILOT_LRS})
    if decision["B"] is not None:
        from dar_core.diagnostics.symptoms import diagnose

        ck = run_dir(runs, "pilot-residual", 0, decision["lr"]) / "checkpoints" / \
            f"ckpt-{decision['B']:07d}.safetensors"
        diag = diagnose([str(ck)], backend="torch")
        decision["symptoms"] = symptoms_present(diag)
        _write(out / "pilot-diagnostics.json", diag)
        if _arms_may_run(decision, preset) and adopt_pilot(runs, decision["lr"], decision["B"]):
            print(f"{preset}: the residual arm's seed 0 is the pilot's run (adopted)")
    _write(out / "pilot.json", {
        "decision": decision, "protocol": PROTOCOL, "cap": CAP, "lrs": PILOT_LRS,
        "preset": preset, "machine": machine(),
        "command": f"python -m benchmarks.depth_study pilot --preset {preset}"})
    print(f"{preset}: {decision['outcome']}")
    return decision


def pilot(args: argparse.Namespace) -> None:
    parallel([(lr, args.runs, args.preset) for lr in PILOT_LRS], _pilot_job, args.jobs,
             keys=PILOT_LRS)
    decide(args.preset, Path(args.runs), args.out)


# Arms -----------------------------------------------------------------------------------------
DIAGNOSTICS = "diagnostics.json"


def arm_steps(B: int) -> list[int]:
    return sorted({B // 2**k for k in range(6)})


def _arm_job(arm: str, seed: int, lr: float, B: int, runs: str, preset: str) -> list[dict]:
    fields, _ = ARMS[arm]
    tc = BASE.replace(**fields, model=preset, lr=lr, seed=seed)
    out = run_dir(Path(runs), arm, seed)
    records = segmented_run(tc, out, arm_steps(B), PROTOCOL, "torch", dict(arm=arm, seed=seed))
    from dar_core.evaluation.protocol import evaluate_checkpoint

    log, done = out / "final-evals.jsonl", _final_done(out)
    ck = out / "checkpoints" / f"ckpt-{B:07d}.safetensors"
    for name, proto in FINAL_PROTOCOLS.items():
        if name not in done:
            r = evaluate_checkpoint(ck, backend="torch", **proto, device="cpu")
            r.update(arm=arm, seed=seed, step=B, eval=name)
            with open(log, "a") as f:
                f.write(json.dumps(r) + "\n")
    if not (out / DIAGNOSTICS).exists():  # the paper's symptoms and the routing, per t, at B
        from dar_core.diagnostics.symptoms import diagnose, save_json

        save_json(diagnose([str(ck)], backend="torch"), out / DIAGNOSTICS)
    return records


def finished(run: Path, out: Path) -> bool:
    """Nothing continues from ``run``: an arm run with both final evaluations and its
    diagnostics, or a pilot run once the pilot's decision (and its symptom check) is written."""
    if run.name.startswith("pilot-"):
        d = _decision(out)
        return d is not None and (d["B"] is None or "symptoms" in d)
    return _final_done(run) >= set(FINAL_PROTOCOLS) and (run / DIAGNOSTICS).exists()


def adopt_pilot(runs: Path, lr: float, B: int) -> Path | None:
    """The residual arm's seed 0 is the pilot's run at the chosen lr (the same configuration,
    and a resumed run is bit-identical to an unbroken one): its checkpoint at ``B`` and its
    evaluations at the arm's steps, each with the training seconds since the previous one."""
    src, dst = run_dir(runs, "pilot-residual", 0, lr), run_dir(runs, "residual", 0)
    ck = src / "checkpoints" / f"ckpt-{B:07d}.safetensors"
    if dst.exists() or not ck.exists():
        return None
    steps = set(arm_steps(B))
    recs = sorted(_evals(src), key=lambda r: r["step"])
    if not steps <= {r["step"] for r in recs}:
        return None
    kept, acc = [], 0.0
    for r in recs:
        if r["step"] > B:
            break
        acc += r["segment_train_seconds"]
        if r["step"] in steps:
            kept.append(dict(r, arm="residual", segment_train_seconds=round(acc, 2),
                             adopted_from=src.name))
            acc = 0.0
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    shutil.copy2(src / "config.json", tmp / "config.json")
    shutil.copy2(ck, tmp / "checkpoints" / ck.name)
    with open(src / "metrics.jsonl") as f:
        rows = [x for x in f if x.strip() and json.loads(x)["step"] <= B]
    (tmp / "metrics.jsonl").write_text("".join(rows))
    (tmp / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.rename(dst)
    return dst


def _decision(out: Path) -> dict | None:
    path = out / "pilot.json"
    d = json.loads(path.read_text())["decision"] if path.exists() else None
    return d if d and d["complete"] else None


def _arms_may_run(d: dict | None, preset: str) -> bool:
    """A budget, and the residual's symptoms at it; the 4-block rerun is the depth trend's
    shallow end, where the symptoms are reported but do not gate (its budget only)."""
    if not d or d["B"] is None:
        return False
    return preset in SHALLOW or bool(d.get("symptoms", {}).get("present"))


def arm_jobs(preset: str, runs: Path, d: dict) -> list[tuple]:
    """Seed by seed, so that a study stopped part-way has whole paired seeds."""
    return [(a, s, d["lr"], d["B"], str(runs), preset)
            for s in sorted({s for _, seeds in ARMS.values() for s in seeds})
            for a, (_, seeds) in ARMS.items() if s in seeds]


def arms(args: argparse.Namespace) -> None:
    decision = _decision(args.out)
    if not _arms_may_run(decision, args.preset):
        sys.exit(f"the pilot does not let the arms run: "
                 f"{decision['outcome'] if decision else 'no decision yet'}; symptoms "
                 f"{(decision or {}).get('symptoms', 'not measured')}")
    parallel(arm_jobs(args.preset, Path(args.runs), decision), _arm_job, args.jobs)
    print("arms done; run `python -m benchmarks.depth_study analyze`")


# Every phase of every active preset -----------------------------------------------------------
ACTIVE = ("tiny", DEFAULT)  # the 4-block rerun for the depth trend (cheap), and the study


def next_job(busy: set) -> tuple | None:
    """The next job of the whole study not in ``busy``: the pilots first (their decisions let
    the arms start), then each preset's arms, seed by seed."""
    for preset in ACTIVE:
        out, runs = PRESETS[preset][0], Path(PRESETS[preset][1])
        if _decision(out) is None:
            for lr in PILOT_LRS:
                key = (preset, "pilot", lr)
                if key not in busy and not _at_cap(run_dir(runs, "pilot-residual", 0, lr)):
                    return key, _pilot_job, (lr, str(runs), preset)
    for preset in ACTIVE:
        out, runs = PRESETS[preset][0], Path(PRESETS[preset][1])
        d = _decision(out)
        if not _arms_may_run(d, preset):
            continue
        for job in arm_jobs(preset, runs, d):
            key = (preset, job[0], job[1])
            if key not in busy and not finished(run_dir(runs, job[0], job[1]), out):
                return key, _arm_job, job
    return None


def _decide_ready() -> None:
    """Each active preset whose pilot runs are all at the cap but has no decision: decide."""
    for preset in ACTIVE:
        out, runs = PRESETS[preset][0], Path(PRESETS[preset][1])
        if _decision(out) is None and all(_at_cap(run_dir(runs, "pilot-residual", 0, lr))
                                          for lr in PILOT_LRS):
            decide(preset, runs, out)


def run_all(args: argparse.Namespace) -> None:
    _decide_ready()
    run_pool(next_job, args.jobs, on_done=lambda key, result: _decide_ready())
    print("every active preset is done: run `python -m benchmarks.depth_study analyze`")


# State ----------------------------------------------------------------------------------------
def save_state(args: argparse.Namespace, out: Path = OUT, finished=lambda run: False) -> None:
    """Each run's logs and newest checkpoint -> ``out/state`` (what continuing needs); a run
    that ``finished(run_dir)`` says is done keeps its logs only (nothing continues from it)."""
    for run in sorted(Path(args.runs).glob("*-seed[0-9]")):
        dst = out / "state" / run.name
        (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
        for name in ("evals.jsonl", "final-evals.jsonl", "metrics.jsonl", "config.json",
                     "partial-seconds.json", DIAGNOSTICS):
            if (run / name).exists():
                shutil.copy2(run / name, dst / name)
        ckpts = sorted((run / "checkpoints").glob("ckpt-*.safetensors"))
        for old in (dst / "checkpoints").glob("ckpt-*.safetensors"):
            old.unlink()
        if finished(run):
            (dst / "checkpoints").rmdir()
            print(f"saved {run.name}: finished, logs only")
        elif ckpts:
            shutil.copy2(ckpts[-1], dst / "checkpoints" / ckpts[-1].name)
            print(f"saved {run.name}: {len(ckpts)} checkpoint(s) there, newest kept")


def restore_state(args: argparse.Namespace, out: Path = OUT) -> None:
    for src in sorted((out / "state").glob("*-seed*")):
        dst = Path(args.runs) / src.name
        if dst.exists():
            print(f"{dst} exists: left as it is")
            continue
        shutil.copytree(src, dst)
        print(f"restored {dst}")


# Helpers --------------------------------------------------------------------------------------

def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=("run", "pilot", "arms", "analyze", "save-state",
                                      "restore-state"),
                    help=f"run: every phase of every active preset ({', '.join(ACTIVE)}), "
                    "pilots first")
    ap.add_argument("--preset", choices=[*PRESETS, "all"], default=DEFAULT,
                    help="deep24: the study (24 blocks); deep, deep16: its 12- and 16-block "
                    "pilots, whose residual did not pass the symptom check; tiny: the 4-block "
                    "rerun (the depth trend); all: every preset (analyze, save-state, "
                    "restore-state)")
    ap.add_argument("--runs", help="runs folder of one preset (default: runs/depth-<preset>, "
                    "runs/depth for deep)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once (1 thread each)")
    args = ap.parse_args(argv)
    if args.phase == "run":
        run_all(args)
        return
    presets = tuple(PRESETS) if args.preset == "all" else (args.preset,)
    if args.preset == "all" and args.phase in ("pilot", "arms"):
        ap.error(f"--preset all is for analyze, save-state and restore-state, not {args.phase}")
    for preset in presets:
        one = argparse.Namespace(**{**vars(args), "preset": preset})
        one.out, default_runs = PRESETS[preset]
        one.runs = (args.runs if args.preset != "all" else None) or default_runs
        _phase(one)


def _phase(args: argparse.Namespace) -> None:
    if args.phase == "analyze":
        from benchmarks.depth_analysis import report

        shallow = None if args.preset == "tiny" else PRESETS["tiny"][0] / "depth.json"
        report(args.out, Path(args.runs), args.preset, shallow)
    elif args.phase == "save-state":
        save_state(args, args.out, lambda run: finished(run, args.out))
    elif args.phase == "restore-state":
        restore_state(args, args.out)
    else:
        {"pilot": pilot, "arms": arms}[args.phase](args)


if __name__ == "__main__":
    main()
