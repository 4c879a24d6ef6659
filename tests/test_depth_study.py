"""The depth study's pre-registered rules and statistics, on numbers whose answer is known."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.depth_analysis import decisions, paired, sign_flip_p, t_interval
from benchmarks.depth_study import (
    CAP,
    PILOT_STEPS,
    octave_slope,
    pilot_budget,
    pilot_decision,
    symptoms_present,
)


def _curve(slope_until: int, acc_at: int, steps=PILOT_STEPS) -> list[dict]:
    """FD falling as step^-1 up to ``slope_until``, flat after; accuracy 0.6 from ``acc_at``."""
    return [{"step": n, "fd": 100.0 * min(n, slope_until) ** -1.0,
             "class_accuracy": 0.6 if n >= acc_at else 0.3} for n in steps]


def test_octave_slope_is_the_log_log_fit_over_the_last_octave():
    recs = [{"step": n, "fd": 5.0 * n ** -0.4} for n in (500, 707, 1000, 1414, 2000)]
    assert octave_slope(recs, 2000) == pytest.approx(-0.4)
    assert math.isnan(octave_slope(recs[:1], 500))


def test_the_pilot_rule_picks_the_first_step_that_meets_it():
    # steep until 4000 (slope -1), flat after: the first n whose octave is flat enough
    recs = _curve(slope_until=4000, acc_at=2000)
    got = pilot_budget(recs)
    flat = [r["step"] for r in got["rows"] if r["octave_slope"] > -0.25 and r["step"] >= 2000]
    assert got["B"] == min(flat) and got["B"] > 4000
    assert pilot_budget(_curve(slope_until=10**9, acc_at=0))["B"] is None  # never flattens


def test_the_pilot_decision_prefers_the_smaller_budget_then_the_lower_lr():
    fast, slow = _curve(2000, 1000), _curve(8000, 1000)
    d = pilot_decision({1e-3: slow, 2e-3: fast})
    assert d["lr"] == 2e-3 and d["B"] == pilot_budget(fast)["B"]
    tie = pilot_decision({1e-3: fast, 2e-3: fast})
    assert tie["lr"] == 1e-3
    part = [r for r in _curve(10**9, 0) if r["step"] < CAP]
    assert pilot_decision({1e-3: part, 2e-3: part})["B"] is None  # not at the cap yet


def test_the_amendment_takes_the_cap_and_the_lower_fd_there_when_no_lr_flattens():
    steep = _curve(10**9, 0)  # FD 100/n: never flat enough
    lower = [dict(r, fd=r["fd"] * 0.8) for r in steep]
    d = pilot_decision({1e-3: steep, 2e-3: lower})
    assert (d["lr"], d["B"], d["amended"]) == (2e-3, CAP, True)
    assert "slope clause" in d["outcome"] and "-1.00" in d["outcome"]
    assert pilot_decision({1e-3: steep, 2e-3: steep})["lr"] == 1e-3  # a tie: the lower lr
    weak = [dict(r, class_accuracy=0.4) for r in lower]
    d = pilot_decision({1e-3: steep, 2e-3: weak})  # the lower FD is below 0.5 accuracy
    assert d["B"] is None and "do not run" in d["outcome"]
    assert not pilot_decision({1e-3: _curve(2000, 1000), 2e-3: steep})["amended"]


def test_symptom_check():
    """The paper's symptoms: adjacent cosine above 0.9 and the gradient falling toward the
    output (one rising pair in ten is allowed, three are not), at every t."""
    def diag(cos, grads, t=(0.0, 0.5, 1.0)):
        return {"timesteps": list(t), "models": [{"per_t": [{"cosine": cos,
                                                             "grad_rms": grads}] * len(t)}]}
    falling = [12.0, 11, 10, 9, 8, 9, 6, 5, 4, 3, 2]  # one rising pair in ten
    got = symptoms_present(diag([0.95] * 10, falling))
    assert got["present"] and got["grad_fall_fraction_per_t"] == [0.9] * 3
    assert got["timesteps"] == [0.0, 0.5, 1.0]
    assert not symptoms_present(diag([0.95] * 10, falling[::-1]))["present"]  # rising
    bumpy = [12.0, 11, 12, 10, 11, 9, 10, 8, 7, 6, 5]  # three rising pairs in ten
    assert not symptoms_present(diag([0.95] * 10, bumpy))["present"]
    assert not symptoms_present(diag([0.94] * 9 + [0.5], falling))["present"]  # mean 0.896
    assert symptoms_present(diag([0.96] * 9 + [0.5], falling))["present"]  # mean 0.914


def test_t_interval_and_exact_sign_flip_p():
    x = np.array([-0.2, -0.1, -0.15, -0.05])
    m, lo, hi = t_interval(x)
    half = 3.182446305284263 * x.std(ddof=1) / 2  # t_{0.975, 3}
    assert (m, lo, hi) == pytest.approx((-0.125, -0.125 - half, -0.125 + half))
    assert sign_flip_p(x) == pytest.approx(2 / 16)  # only all-negative and all-positive
    assert sign_flip_p(np.array([0.1, -0.1])) == 1.0


def test_paired_ratios_and_the_decision_rules():
    final = {("residual", s): 10.0 for s in range(4)}
    final |= {("static_t c4", s): 10.0 * f for s, f in enumerate([0.8, 0.82, 0.79, 0.81])}
    final |= {("uniform c4", s): 10.0 * f for s, f in enumerate([0.9, 0.93, 0.88, 0.91])}
    st = paired(final, "static_t c4", "residual")
    assert st["n"] == 4 and st["ratio"] == pytest.approx(math.exp(np.mean(np.log(
        [0.8, 0.82, 0.79, 0.81]))))
    svu = paired(final, "static_t c4", "uniform c4")
    d = decisions({"static_t c4": st}, svu)
    assert d == {"DAR is better at depth": "yes", "learned routing matters": "yes"}
    worse = {**final, ("static_t c4", 0): 12.0}
    d2 = decisions({"static_t c4": paired(worse, "static_t c4", "residual")}, svu)
    assert d2["DAR is better at depth"].startswith("not shown")


JOB = '''
import os, signal, sys, time
from pathlib import Path


def job(folder, i):
    folder = Path(folder)
    signal.signal(signal.SIGTERM, lambda *a: (folder.joinpath(f"job{i}.stopped").touch(),
                                              sys.exit(0)))
    folder.joinpath(f"job{i}.pid").write_text(str(os.getpid()))
    time.sleep(120)
'''
MAIN = '''
import sys
from benchmarks.study_pool import parallel
from studyjob import job

if __name__ == "__main__":
    parallel([(sys.argv[1], i) for i in range(4)], job, 2)
'''


def test_a_stopped_study_stops_its_workers_and_starts_no_more_jobs(tmp_path):
    """SIGTERM to the study passes on to the running jobs (a trainer saves its step there)
    and cancels the queued ones: no worker outlives the study."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from dar_core.train.run import process_running

    (tmp_path / "studyjob.py").write_text(JOB)
    (tmp_path / "main.py").write_text(MAIN)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path)])}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "main.py"), str(tmp_path)],
                            env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("job*.pid"))) < 2:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the jobs did not start"
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in tmp_path.glob("job*.pid")]
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:  # a failure above: leave nothing running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 1 and "the same command continues" in err, err
    assert sorted(p.name for p in tmp_path.glob("job*.stopped")) == ["job0.stopped",
                                                                     "job1.stopped"]
    assert len(list(tmp_path.glob("job*.pid"))) == 2  # jobs 2 and 3 never started
    for pid in pids:
        assert not process_running(pid), pid



def test_arms_report_recovers_known_speedups_and_draws_every_figure(tmp_path):
    """Arms whose FD curves are the residual's, ``k`` times faster: the report's paired
    iterations-to-the-residual's-final-FD are ``k`` per seed, the FD ratio at B is
    ``k^-1/2``, the wall-clock ratio the segment times', and every figure is a PNG."""
    import json

    from benchmarks.depth_analysis import report

    B = 3200
    steps = sorted({B // 2**k for k in range(6)})
    speed = {"residual": 1.0, "static_t c4": 2.0, "uniform c4": 1.5, "dynamic c4": 1.2}
    seeds = {"residual": 4, "static_t c4": 4, "uniform c4": 4, "dynamic c4": 2}
    seconds = {"residual": 10.0, "static_t c4": 13.0, "uniform c4": 12.0, "dynamic c4": 15.0}
    runs = tmp_path / "runs"
    for arm, k in speed.items():
        for s in range(seeds[arm]):
            d = runs / f"{arm.replace(' ', '-')}-seed{s}"
            d.mkdir(parents=True)
            a = 50.0 * (1 + 0.1 * s)
            extra = dict(kid=0.01 * k, class_accuracy=0.5, shape_accuracy=0.6,
                         texture_accuracy=0.7, fd_real_floor=0.3, arm=arm, seed=s)
            # the residual's seed 0 adopted from the pilot: timed elsewhere, not in wall-clock
            adopted = dict(adopted_from="pilot", segment_train_seconds=99.0) \
                if (arm, s) == ("residual", 0) else {}
            d.joinpath("evals.jsonl").write_text("".join(
                json.dumps({**extra, "fd": a * (k * n) ** -0.5, "step": n,
                            "segment_train_seconds": seconds[arm], **adopted}) + "\n"
                for n in steps))
            d.joinpath("final-evals.jsonl").write_text("".join(
                json.dumps(dict(extra, fd=a * (k * B) ** -0.5, step=B, eval=e)) + "\n"
                for e in ("x3-seed0", "x3-seed1")))
    out = tmp_path / "out"
    doc = report(out, runs, "deep16")
    arms = doc["arms"]["curves"]["arms"]
    for arm, k in speed.items():
        if arm == "residual":
            continue
        per = [v["speedup"] for v in arms[arm]["paired"]["per_seed"].values()]
        np.testing.assert_allclose(per, [k] * seeds[arm], rtol=1e-9)
        ratio = doc["x3-seed0"]["vs_residual"][arm]["ratio"]
        assert ratio == pytest.approx(k ** -0.5, rel=1e-9)
        assert doc["arms"]["wall_clock"][arm]["ratio"] == pytest.approx(
            seconds[arm] / seconds["residual"], rel=1e-9)
        assert doc["arms"]["wall_clock"][arm]["seeds"] == list(range(1, seeds[arm]))
        assert doc["arms"]["secondary_at_B"][arm]["kid"][0] == pytest.approx(0.01 * k)
    assert doc["x3-seed0"]["decisions"]["DAR is better at depth"] == "yes"
    for name in ("depth-quality.png", "depth-speedup.png", "depth-forest.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "depth.md").read_text()
    assert "## Secondary metrics" in md and "static_t c4: 2.000×" in md


def test_the_depth_trend_rule():
    from benchmarks.depth_analysis import depth_trend

    deep = {"static_t c4": {"n": 4, "ratio": 0.8, "ci95": [0.7, 0.9]}}
    assert depth_trend(deep, {"static_t c4": {"n": 4, "ratio": 0.95}}, (24, 4)) == "yes"
    assert depth_trend(deep, {"static_t c4": {"n": 4, "ratio": 0.85}}, (24, 4)) == \
        "not shown (24-block interval reaches the 4-block ratio 0.850)"
    assert depth_trend(deep, None, (24, 4)).startswith("not tested")


def _diag_from_real_checkpoint(tmp_path, routing, name):
    from dar_core.diagnostics.symptoms import diagnose
    from dar_core.io.checkpoint import save_checkpoint
    from dar_core.spec.config import model_config
    from dar_core.spec.schema import random_params

    cfg = model_config("micro", routing=routing, input_size=16)
    ck = save_checkpoint(tmp_path / f"{name}.safetensors", cfg,
                         random_params(cfg, 0, dtype=np.float32), meta={"step": 3})
    return diagnose([str(ck)], (0.2, 0.8), n=4, backend="torch")


def test_the_report_draws_the_symptoms_per_t_and_the_depth_trend(tmp_path):
    """Arm runs that carry ``dar diagnose``'s result at B: the report's per-t table is their
    mean over seeds and ``diagnostics/`` has the plots; with the 4-block rerun's ratios beside
    the deep ones, the depth-trend rule and figure."""
    import json

    from benchmarks.depth_analysis import report

    runs, out = tmp_path / "runs", tmp_path / "out"
    diags = {"residual": _diag_from_real_checkpoint(tmp_path, "residual", "r"),
             "static_t c4": _diag_from_real_checkpoint(tmp_path, "dar", "d")}
    for arm, diag in diags.items():
        for s in (0, 1):
            d = runs / f"{arm.replace(' ', '-')}-seed{s}"
            d.mkdir(parents=True)
            ratio = 0.8 if arm != "residual" else 1.0
            d.joinpath("final-evals.jsonl").write_text("".join(
                json.dumps(dict(arm=arm, seed=s, step=100, eval=e, fd=(1 + s) * ratio)) + "\n"
                for e in ("x3-seed0", "x3-seed1")))
            d.joinpath("diagnostics.json").write_text(json.dumps(diag))
    (out / "tiny").mkdir(parents=True)
    (out / "tiny" / "depth.json").write_text(json.dumps({"blocks": 4, "x3-seed0": {
        "vs_residual": {"static_t c4": {"n": 4, "ratio": 0.9, "ci95": [0.85, 0.95]}}}}))
    doc = report(out, runs, "deep16", out / "tiny" / "depth.json")
    res = diags["residual"]["models"][0]["per_t"]
    got = doc["symptoms_at_B"]["residual"]
    assert [r["t"] for r in got] == [0.2, 0.8] and got[0]["seeds"] == 2
    assert got[1]["cosine"] == pytest.approx(np.mean(res[1]["cosine"]))
    assert got[0]["state_growth"] == pytest.approx(res[0]["state_rms"][-1] / res[0]["state_rms"][0])
    assert got[0]["grad_decay"] == pytest.approx(res[0]["grad_rms"][-1] / res[0]["grad_rms"][0])
    for name in ("diagnostics/symptoms.png", "diagnostics/routing-1.png", "depth-trend.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert doc["x3-seed0"]["decisions"]["the gain grows with depth"] == "yes"  # 0.8 < 0.9
    md = (out / "depth.md").read_text()
    assert "## Symptoms per t at B" in md and "## Depth trend" in md


def test_the_residual_arm_adopts_the_pilot_run_and_finished_runs_keep_logs_only(tmp_path):
    import json

    from benchmarks.depth_study import adopt_pilot, arm_steps, finished, run_dir, save_state

    runs, out, B = tmp_path / "runs", tmp_path / "out", 1600
    src = run_dir(runs, "pilot-residual", 0, 2e-3)
    (src / "checkpoints").mkdir(parents=True)
    grid = [50, 71, 100, 141, 200, 283, 400, 566, 800, 1131, 1600, 2263]
    src.joinpath("evals.jsonl").write_text("".join(
        json.dumps(dict(step=n, fd=1.0, arm="residual", seed=0, lr=2e-3,
                        segment_train_seconds=1.0)) + "\n" for n in grid))
    src.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"step": n}) + "\n" for n in range(10, 2300, 10)))
    src.joinpath("config.json").write_text("{}")
    for n in grid:
        src.joinpath("checkpoints", f"ckpt-{n:07d}.safetensors").write_bytes(b"x")
    dst = adopt_pilot(runs, 2e-3, B)
    assert dst == run_dir(runs, "residual", 0)
    recs = [json.loads(x) for x in (dst / "evals.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == arm_steps(B) == [50, 100, 200, 400, 800, 1600]
    # every pilot segment up to B is counted once: 1 + 2 + 2 + 2 + 2 + 2 = 11 segments
    assert [r["segment_train_seconds"] for r in recs] == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert [p.name for p in (dst / "checkpoints").iterdir()] == ["ckpt-0001600.safetensors"]
    assert json.loads((dst / "metrics.jsonl").read_text().splitlines()[-1])["step"] == B
    assert adopt_pilot(runs, 2e-3, B) is None  # already there: left as it is
    assert not finished(dst, out)
    dst.joinpath("final-evals.jsonl").write_text("".join(
        json.dumps({"eval": e}) + "\n" for e in ("x3-seed0", "x3-seed1")))
    assert not finished(dst, out)  # its diagnostics are still missing
    dst.joinpath("diagnostics.json").write_text("{}")
    assert finished(dst, out) and not finished(src, out)  # the pilot has no decision yet
    out.mkdir()
    out.joinpath("pilot.json").write_text(json.dumps({"decision": {
        "complete": True, "B": B, "symptoms": {"present": True}}}))
    assert finished(src, out)
    save_state(type("A", (), {"runs": str(runs)})(), out, lambda r: finished(r, out))
    assert not (out / "state" / src.name / "checkpoints").exists()
    assert (out / "state" / dst.name / "diagnostics.json").exists()


def test_the_pool_starts_jobs_that_earlier_results_made_available():
    from benchmarks.study_pool import run_pool

    queue = [("a", pow, (2, 3))]

    def next_job(busy):
        return queue.pop(0) if queue else None

    def on_done(key, result):  # "a" done: its result is "b"'s input
        if key == "a":
            queue.append(("b", pow, (result, 2)))

    assert run_pool(next_job, 2, on_done) == {"a": 8, "b": 64}


def test_the_whole_study_runs_pilots_first_then_each_presets_arms(tmp_path, monkeypatch):
    import json

    import benchmarks.depth_study as ds

    first, second = "deepA", "deepB"  # two presets the symptom check gates
    monkeypatch.setattr(ds, "ACTIVE", (first, second))
    presets = {p: (tmp_path / "out" / p, str(tmp_path / "runs" / p)) for p in ds.ACTIVE}
    monkeypatch.setattr(ds, "PRESETS", presets)
    assert ds.next_job(set())[0] == (first, "pilot", 1e-3)
    assert ds.next_job({(first, "pilot", 1e-3)})[0] == (first, "pilot", 2e-3)
    busy = {(first, "pilot", 1e-3), (first, "pilot", 2e-3)}
    assert ds.next_job(busy)[0] == (second, "pilot", 1e-3)

    def at_cap(preset, lr):
        run = ds.run_dir(Path(presets[preset][1]), "pilot-residual", 0, lr)
        run.mkdir(parents=True)
        run.joinpath("evals.jsonl").write_text(json.dumps({"step": ds.CAP, "fd": 1.0}) + "\n")

    for lr in ds.PILOT_LRS:
        at_cap(first, lr)
    assert ds.next_job(set())[0] == (second, "pilot", 1e-3)  # the first waits for its decision
    out = presets[first][0]
    out.mkdir(parents=True)
    out.joinpath("pilot.json").write_text(json.dumps({"decision": {
        "complete": True, "lr": 2e-3, "B": 800, "symptoms": {"present": True}}}))
    key, fn, job = ds.next_job({(second, "pilot", 1e-3), (second, "pilot", 2e-3)})
    assert key == (first, "residual", 0) and fn is ds._arm_job
    assert job == ("residual", 0, 2e-3, 800, presets[first][1], first)
    done = ds.run_dir(Path(presets[first][1]), "residual", 0)  # finished: skipped
    done.mkdir(parents=True)
    done.joinpath("final-evals.jsonl").write_text("".join(
        json.dumps({"eval": e}) + "\n" for e in ds.FINAL_PROTOCOLS))
    done.joinpath(ds.DIAGNOSTICS).write_text("{}")
    assert ds.next_job({(second, "pilot", 1e-3), (second, "pilot", 2e-3)})[0] == (
        first, "static_t c4", 0)
    out.joinpath("pilot.json").write_text(json.dumps({"decision": {
        "complete": True, "lr": 2e-3, "B": 800, "symptoms": {"present": False}}}))
    assert ds.next_job({(second, "pilot", 1e-3), (second, "pilot", 2e-3)}) is None
    # the 4-block rerun's arms run without the symptoms (its budget only)
    shallow = tmp_path / "out" / "shallow"
    monkeypatch.setattr(ds, "PRESETS", {**presets, "tiny": (shallow, str(tmp_path / "s"))})
    monkeypatch.setattr(ds, "ACTIVE", ("tiny",))
    shallow.mkdir()
    shallow.joinpath("pilot.json").write_text(json.dumps({"decision": {
        "complete": True, "lr": 1e-3, "B": 800, "symptoms": {"present": False}}}))
    assert ds.next_job(set())[0] == ("tiny", "residual", 0)


def test_study_logs_are_read_past_blank_and_torn_lines(tmp_path, capsys):
    """A study's JSONL log: blank lines skipped; a line torn by a kill dropped with a
    warning naming it, the records around it kept; a log not written yet is empty."""
    from benchmarks.common import read_jsonl

    log = tmp_path / "evals.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2, "fd": 0.5\n{"step": 4}\n')
    assert read_jsonl(log) == [{"step": 1}, {"step": 4}]
    assert f"dropping unreadable line 3 of {log}" in capsys.readouterr().err
    assert read_jsonl(tmp_path / "none.jsonl") == []
