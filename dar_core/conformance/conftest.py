"""Backend and device selection, Hypothesis profiles and the report of the conformance suite.

``DAR_BACKENDS=torch,jax`` restricts the backends (default: all three) and
``DAR_CONFORMANCE_DEVICE`` picks the device kind (``cpu``, ``cuda``, ``tpu``, ``gpu``); a
requested backend that is not installed, or has no such device here, makes its tests *skip*
with the reason, never pass. ``HYPOTHESIS_PROFILE=ci`` (bounded examples, no deadline) or
``thorough``. ``DAR_CONFORMANCE_REPORT=path.json`` writes the report (``dar conformance``
sets it).
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, settings

from dar_core.conformance import adapters
from dar_core.conformance import report as results

# No example database: the suite runs inside users' checkouts and CI jobs, where a
# .hypothesis folder in the working directory would be litter.
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None, database=None,
                          print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_cache: dict[tuple[str, str], adapters.Adapter | adapters.Unavailable] = {}


def adapter_or_reason(name: str, kind: str | None = None):
    """The adapter of backend ``name`` on the requested device kind, or why there is none."""
    key = (name, kind or adapters.requested_device())
    if key not in _cache:
        _cache[key] = adapters.load(*key)
        a = _cache[key]
        if isinstance(a, adapters.Adapter):
            results.ENVIRONMENT["backends"][a.name] = {"device": a.resolved, "flags": a.flags}
        else:
            results.ENVIRONMENT["skipped"][name] = str(a)
    return _cache[key]


def get_adapter(name: str, kind: str | None = None) -> adapters.Adapter:
    a = adapter_or_reason(name, kind)
    if isinstance(a, adapters.Unavailable):
        pytest.skip(str(a))
    return a


def available() -> list[adapters.Adapter]:
    """The requested backends that run here."""
    out = [adapter_or_reason(n) for n in adapters.requested_backends()]
    return [a for a in out if isinstance(a, adapters.Adapter)]


def pytest_generate_tests(metafunc):
    names = adapters.requested_backends()
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", names, scope="session")
    if "pair" in metafunc.fixturenames:
        metafunc.parametrize("pair", list(itertools.combinations(names, 2)),
                             ids=lambda p: f"{p[0]}-{p[1]}", scope="session")


@pytest.fixture(scope="session")
def adapter(backend):
    return get_adapter(backend)


@pytest.fixture(scope="session")
def oracle():
    """float64 gradient oracle: the torch backend in float64 on the CPU (validated against the
    float64 reference forward and autograd's gradcheck in the unit tests)."""
    a = adapter_or_reason("torch", "cpu")
    if isinstance(a, adapters.Unavailable):
        pytest.skip(f"the float64 gradient oracle needs torch: {a}")
    return a


@pytest.fixture(scope="session")
def adapters_pair(pair):
    return get_adapter(pair[0]), get_adapter(pair[1])


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if results.CHECKS:
        tr.section("conformance: worst case per check and backend (largest error / tolerance)")
        for line in results.summary_lines():
            tr.write_line(line)
    path = os.environ.get("DAR_CONFORMANCE_REPORT")
    if path:
        results.write(path)


def pytest_runtest_logreport(report):
    """Every test's outcome, with the reason of each skip and the message of each failure."""
    if report.when == "call" or report.outcome != "passed":
        results.outcome(report.nodeid, report.outcome, report.longrepr)
