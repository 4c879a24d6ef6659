"""The convergence study's curve fitting, threshold crossing and bootstrapped speedups."""

import dataclasses

import numpy as np
import pytest

from benchmarks.convergence import ARMS, PRESETS, eval_steps
from benchmarks.convergence_analysis import (
    analyze,
    isotonic_nonincreasing,
    iters_to_reach,
    paired_speedup,
    report,
)
from dar_core.testing import ulp_tol


def test_isotonic_fit_is_the_pooled_nonincreasing_curve():
    y = np.array([5.0, 4.0, 4.5, 3.0, 3.2, 3.4, 1.0])
    fit = isotonic_nonincreasing(y)
    np.testing.assert_allclose(fit, [5.0, 4.25, 4.25, 3.2, 3.2, 3.2, 1.0])
    assert np.all(np.diff(fit) <= 0)
    already = np.array([3.0, 2.0, 2.0, 1.0])
    np.testing.assert_array_equal(isotonic_nonincreasing(already), already)
    assert isotonic_nonincreasing(y).sum() == pytest.approx(y.sum())  # pooling keeps the mass


def test_iters_to_reach_interpolates_in_log_log():
    steps = [100, 200, 400, 800]
    fd = 50.0 * np.asarray(steps, float) ** -0.5  # a power law is a line in log-log
    for n in (130.0, 250.0, 777.0):
        got, lower = iters_to_reach(steps, np.log(fd), 50.0 * n**-0.5)
        # a line in log-log: log n = log s0 + (y - y0) / (y1 - y0) * (log s1 - log s0); each
        # log is good to eps of its size, and the difference quotient loses |y| / |y1 - y0|
        y, y0, y1 = np.log(50.0 * n**-0.5), np.log(fd[0]), np.log(fd[-1])
        cancel = (abs(y) + abs(y0)) / (abs(y1 - y0) / (len(steps) - 1))
        rel = ulp_tol(8 * (1 + cancel) * np.log(steps[-1]))
        assert got == pytest.approx(n, rel=rel) and lower == "interpolated"
    assert iters_to_reach(steps, np.log(fd), 100.0) == (100.0, "lower_bound")
    n, how = iters_to_reach(steps, np.log(fd), 50.0 * 1600**-0.5)  # past the budget
    assert n == pytest.approx(1600, rel=1e-6) and how == "extrapolated"
    assert iters_to_reach(steps, np.log(fd), 0.1) == (float("inf"), "never")  # too far
    flat = np.log([9.0, 8.0, 8.0, 8.0])
    assert iters_to_reach(steps, flat, 7.9) == (float("inf"), "never")  # not improving


def _raw(factor: float, seeds: int = 3, noise: float = 0.02) -> dict:
    """A study where every DAR arm needs ``1/factor`` of residual's iterations."""
    steps = eval_steps(4000, 9)
    rng = np.random.default_rng(0)
    records = []
    for arm in ARMS:
        f = 1.0 if arm == "residual" else factor
        for seed in range(seeds):
            jitter = 1 + noise * rng.standard_normal(len(steps))
            for s, j in zip(steps, jitter):
                records.append({"arm": arm, "seed": seed, "step": s, "fd": 2 + 400 *
                                (f * s) ** -0.7 * j, "class_accuracy": 0.5,
                                "fd_real_floor": 0.4})
    tc = dataclasses.asdict(PRESETS["cpu"]["train"].replace(steps=4000))
    return {"eval_steps": steps, "records": records, "arms": {a: ARMS[a] for a in ARMS},
            "seeds": seeds, "train": tc, "protocol": PRESETS["cpu"]["protocol"],
            "backend": "torch", "machine": {"cpus": 2}, "study_wall_seconds": 60,
            "step_time": {a: (1.0 if a == "residual" else 1.25) for a in ARMS}}


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_known_speedup_is_recovered_with_an_interval(factor):
    result = analyze(_raw(factor), n_boot=300)
    for arm, p in result["arms"].items():
        assert p["speedup_at_q_star"] == pytest.approx(factor, rel=0.15), arm
        lo, hi = p["speedup_at_q_star_ci"]
        assert lo <= p["speedup_at_q_star"] <= hi
        assert p["wall_speedup_at_q_star"] == pytest.approx(p["speedup_at_q_star"] / 1.25)
        mid = np.array(p["speedup"])[len(p["speedup"]) // 2]
        assert mid == pytest.approx(factor, rel=0.15), arm
    if factor == 2.0:
        assert all(p["speedup_at_q_star_ci"][0] > 1 for p in result["arms"].values())


def test_a_slower_arm_that_never_gets_there_reads_never(tmp_path):
    raw = _raw(1.0, noise=0.0)
    for r in raw["records"]:
        if r["arm"] == "static c4":
            r["fd"] *= 3.0  # far worse than residual: not within four budgets
        if r["arm"] == "dynamic c4":
            r["fd"] *= 1.05  # a little worse: gets there a little past the budget
    result = analyze(raw, n_boot=100)
    never, late = result["arms"]["static c4"], result["arms"]["dynamic c4"]
    assert never["speedup_at_q_star"] == 0.0 and never["how"] == "never"
    assert never["iters_at_q_star"] == float("inf")
    assert late["how"] == "extrapolated" and 0.5 < late["speedup_at_q_star"] < 1.0
    out = report(raw, tmp_path)
    md = (tmp_path / "convergence.md").read_text()
    assert "static c4: reaches" in md and "slower than residual" in md
    assert "not reached" in md and "≈ " in md
    for png in ("convergence-quality.png", "convergence-speedup.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(out["arms"]) == set(ARMS) - {"residual"}


def test_eval_steps_are_log_spaced_and_end_at_the_budget():
    steps = eval_steps(3000, 9)
    assert steps[-1] == 3000 and steps[0] == 188 and len(steps) == 9
    ratios = np.diff(np.log(steps))
    np.testing.assert_allclose(ratios, np.log(2) / 2, atol=0.01)


def test_paired_speedup_reads_each_seed_against_its_own_residual():
    steps = [100, 200, 400, 800]
    ls = np.log(np.asarray(steps, float))
    # seed s: the residual is the power law 50 (1 + s) n^-0.5; the arm reaches the same seed's
    # final residual FD at 800 / k_s steps exactly (the same curve, k_s times faster)
    k = {0: 2.0, 1: 4.0, 2: 2.0 * np.sqrt(2.0)}
    res = {s: np.log(50.0 * (1 + s)) - 0.5 * ls for s in k}
    arm = {s: np.log(50.0 * (1 + s)) - 0.5 * (ls + np.log(k[s])) for s in k}
    out = paired_speedup(res, arm, steps)
    got = [out["per_seed"][str(s)]["speedup"] for s in k]
    np.testing.assert_allclose(got, list(k.values()), rtol=1e-12)
    logs = np.log(list(k.values()))
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * logs.std(ddof=1) / np.sqrt(3)
    assert out["speedup"] == pytest.approx(np.exp(logs.mean()), rel=1e-12)
    np.testing.assert_allclose(out["ci95"], np.exp([logs.mean() - half, logs.mean() + half]),
                               rtol=1e-12)
    arm[1] = res[1] + 0.0  # never better than its residual: no faster crossing than the budget
    arm[2] = np.full(4, np.log(1e3))  # flat far above: never reaches it, no interval
    out = paired_speedup(res, arm, steps)
    assert out["per_seed"]["1"]["speedup"] == pytest.approx(1.0)
    assert out["per_seed"]["2"]["how"] == "never" and "ci95" not in out


def test_a_stopped_segments_training_time_counts_toward_it(tmp_path, monkeypatch):
    """The resume after a stop times only the rest of the segment; the stopped attempt's
    seconds are kept beside the run and added, so wall-clock ratios stay whole."""
    import time
    from types import SimpleNamespace

    import dar_core.backend
    import dar_core.evaluation.protocol
    from benchmarks.convergence import PARTIAL, segmented_run
    from dar_core.errors import TrainingInterrupted

    attempts = []

    def train(cfg):
        attempts.append(cfg.steps)
        time.sleep(0.3 if len(attempts) == 1 else 0.05)
        if len(attempts) == 1:
            raise TrainingInterrupted("stopped by SIGTERM")

    monkeypatch.setattr(dar_core.backend, "load_backend", lambda name: SimpleNamespace(
        train=train))
    monkeypatch.setattr(dar_core.evaluation.protocol, "evaluate_checkpoint",
                        lambda *a, **k: {"fd": 1.0, "class_accuracy": 0.5})
    tc = PRESETS["cpu"]["train"]
    with pytest.raises(TrainingInterrupted):
        segmented_run(tc, tmp_path, [10], {}, "torch", {"arm": "residual", "seed": 0})
    assert (tmp_path / PARTIAL).exists()
    recs = segmented_run(tc, tmp_path, [10], {}, "torch", {"arm": "residual", "seed": 0})
    assert attempts == [10, 10] and not (tmp_path / PARTIAL).exists()
    assert 0.35 <= recs[0]["segment_train_seconds"] < 0.35 + 5.0  # both attempts, no other
