"""``dar conformance``: the suite run with pytest against the installed package, in-process.

The suite is this package's own test modules, so it checks exactly the installed ``dar_core``
and its backends, on the device kind asked for, with no repository on the path. Nothing of the
caller's pytest configuration is read (an empty ini file, the package folder as rootdir, no
cache folder, no Hypothesis database), and the result is the process's exit status: 0 when
every test that could run passed, non-zero otherwise, and non-zero (5) when nothing ran at
all (e.g. ``--device cuda`` on a machine without CUDA): a skip never passes silently.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from dar_core.backend import BACKENDS
from dar_core.errors import ConfigError

PROFILES = ("ci", "thorough")
NOTHING_RAN = 5  # pytest's own status for "no tests ran"
HERE = Path(__file__).resolve().parent


def run(backends: list[str] | None = None, device: str = "cpu", profile: str = "ci",
        report: str | None = None, select: str | None = None,
        pytest_args: tuple[str, ...] = ()) -> int:
    """Run the suite; returns pytest's exit status. ``backends`` defaults to every backend
    (those not installed are reported as skipped), ``select`` is a pytest ``-k`` expression."""
    from dar_core.conformance.adapters import DEVICES

    missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"dar conformance needs {' and '.join(missing)}: "
                          "pip install 'dar-core[conformance]'")
    names = list(backends) if backends else list(BACKENDS)
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise ConfigError(f"--backends must name some of {list(BACKENDS)}, got {names}")
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {list(DEVICES)}, got {device!r}")
    if profile not in PROFILES:
        raise ConfigError(f"--profile must be one of {list(PROFILES)}, got {profile!r}")
    os.environ.update(DAR_BACKENDS=",".join(names), DAR_CONFORMANCE_DEVICE=device,
                      HYPOTHESIS_PROFILE=profile)
    if report:
        os.environ["DAR_CONFORMANCE_REPORT"] = str(Path(report).resolve())
    else:
        os.environ.pop("DAR_CONFORMANCE_REPORT", None)
    import pytest

    args = [str(HERE), "-p", "no:cacheprovider", "--rootdir", str(HERE), "-c", os.devnull,
            "-rs", "-q", *pytest_args]
    if select:
        args += ["-k", select]
    with tempfile.TemporaryDirectory(prefix="dar-conformance-") as scratch:
        # Hypothesis keeps caches under ./.hypothesis unless told otherwise: not in the user's
        # working directory
        own = "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ
        if own:
            os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = scratch
        try:
            rc = int(pytest.main(args))
        finally:
            if own:
                del os.environ["HYPOTHESIS_STORAGE_DIRECTORY"]
    from dar_core.conformance import report

    if rc == 0 and report.document()["result"] != "pass":
        return NOTHING_RAN  # every test skipped: no backend ran on this device
    return rc


def headline() -> str:
    """One line: the result, the counts, where each backend ran, what was skipped and why."""
    from dar_core.conformance import report

    doc = report.document()
    ran = ", ".join(f"{b} on {e['device']}" for b, e in doc["backends"].items()) or "nothing"
    skipped = "; ".join(doc["skipped"].values())
    counts = ", ".join(f"{n} {k}" for k, n in sorted(doc["tests"].items()))
    line = f"dar conformance: {doc['result'].upper()} ({counts}) - {ran}"
    if doc["failed_checks"]:
        line += f"; failed checks: {', '.join(doc['failed_checks'])}"
    return line + (f"; skipped {skipped}" if skipped else "")
