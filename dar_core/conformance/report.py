"""What a conformance run measured, kept while it runs and written as one JSON report.

Every check calls :func:`check` with its error and its tolerance: the worst case per
``(check, backend)`` is kept (largest ratio of error to tolerance) with the number of cases and
failures, and the check fails the test at once when the error exceeds its tolerance.
:func:`record` keeps a measurement that has no tolerance (e.g. a draw's sensitivity).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any


@dataclass
class Worst:
    """The worst case of one ``(check, backend)``: ``error`` and its ``tolerance``."""

    error: float = 0.0
    tolerance: float | None = None
    ratio: float = 0.0
    cases: int = 0
    failures: int = 0


CHECKS: dict[tuple[str, str], Worst] = {}
# What ran where: per backend the resolved device and the precision flags the suite set;
# per skipped backend the reason.
ENVIRONMENT: dict[str, dict] = {"backends": {}, "skipped": {}}
TESTS: dict[str, dict[str, Any]] = {}


def record(name: str, backend: str, err: float, limit: float | None = None) -> float:
    """Keep ``err`` (and, when given, how it compares with ``limit``); returns ``err``."""
    err = float(err)
    w = CHECKS.setdefault((name, backend), Worst())
    w.cases += 1
    if limit is None:
        w.error = max(w.error, err)
        return err
    limit = float(limit)
    ratio = err / limit if limit > 0 else float("inf")
    if err != err or ratio > 1:  # NaN fails too
        w.failures += 1
    if ratio >= w.ratio or err != err:
        w.error, w.tolerance, w.ratio = err, limit, ratio
    return err


def check(name: str, backend: str, err: float, limit: float, detail: str = "") -> None:
    """Record ``err`` against ``limit`` and fail when it is above (or NaN)."""
    record(name, backend, err, limit)
    assert float(err) <= float(limit), (f"{name} [{backend}]: error {float(err):.3e} above "
                                        f"tolerance {float(limit):.3e} {detail}".rstrip())


def rows() -> list[dict]:
    """Every check, worst case first within a check name: name, backend and :class:`Worst`."""
    return [{"check": c, "backend": b, **asdict(w), "passed": w.failures == 0}
            for (c, b), w in sorted(CHECKS.items())]


def summary_lines() -> list[str]:
    """The table printed after a run: per check and backend its worst case (the largest
    error relative to its tolerance; for a measurement without one, the largest value)."""
    out = [f"{'check':<36} {'backend':<12} {'error':>10} {'tolerance':>10} {'cases':>6}  "]
    for r in rows():
        tol = f"{r['tolerance']:.3e}" if r["tolerance"] is not None else "-"
        flag = "" if r["tolerance"] is None else ("ok" if r["passed"] else
                                                   f"FAILED x{r['failures']}")
        out.append(f"{r['check']:<36} {r['backend']:<12} {r['error']:>10.3e} {tol:>10} "
                   f"{r['cases']:>6}  {flag}")
    return out


def outcome(nodeid: str, result: str, longrepr: Any) -> None:
    """A test's result (``passed``, ``failed``, ``skipped``) and, unless it passed, why."""
    entry: dict[str, Any] = {"outcome": result}
    if result == "skipped" and isinstance(longrepr, tuple):
        entry["reason"] = str(longrepr[2]).removeprefix("Skipped: ")
    elif result != "passed":
        entry["message"] = str(getattr(longrepr, "reprcrash", None) and
                               longrepr.reprcrash.message or longrepr)[-2000:]
    if TESTS.get(nodeid, {}).get("outcome") != "failed":  # a failed setup or call stays failed
        TESTS[nodeid] = entry


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def document() -> dict[str, Any]:
    """The whole report: versions, devices and flags, every check, every test's outcome."""
    from dar_core.conformance.adapters import requested_backends, requested_device
    from dar_core.conformance.tolerances import ARITHMETIC

    counts: dict[str, int] = {}
    for t in TESTS.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    checks = rows()
    failed = counts.get("failed", 0) > 0 or any(not r["passed"] for r in checks)
    return {
        "result": "fail" if failed else ("pass" if counts.get("passed") else "nothing ran"),
        "device_kind": requested_device(),
        "arithmetic": {dt: {"unit_roundoff": u, "why": why}
                       for (dev, dt), (u, why) in ARITHMETIC.items() if dev == requested_device()},
        "requested_backends": requested_backends(),
        "hypothesis_profile": os.environ.get("HYPOTHESIS_PROFILE", "ci"),
        "versions": {"python": sys.version.split()[0], "platform": platform.platform(),
                     **{d: _version(d) for d in ("dar-core", "numpy", "torch", "jax", "jaxlib",
                                                 "optax", "mlx", "hypothesis", "pytest")}},
        **ENVIRONMENT,
        "tests": counts,
        "failed_checks": [f"{r['check']} [{r['backend']}]" for r in checks if not r["passed"]],
        "checks": checks,
        "test_outcomes": dict(sorted(TESTS.items())),
    }


def write(path: str) -> None:
    """Write :func:`document` to ``path`` atomically (a temporary file renamed into place)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".report-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document(), f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
