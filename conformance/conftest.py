"""Backend selection and Hypothesis profiles for the conformance suite.

``DAR_BACKENDS=torch,jax`` restricts the backends (default: all three); a requested backend
that is not installed makes its tests *skip* with the reason, never pass.
``HYPOTHESIS_PROFILE=ci`` (bounded examples, no deadline) or ``thorough``.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, settings

from conformance import adapters

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_cache: dict[str, object] = {}


def get_adapter(name: str):
    if name not in _cache:
        _cache[name] = adapters.load(name)
    a = _cache[name]
    if a is None:
        pytest.skip(f"backend {name!r} is not installed")
    return a


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
    """float64 gradient oracle: the torch backend in float64 (validated against the float64
    reference forward and autograd's gradcheck in the unit tests)."""
    a = adapters.load("torch")
    if a is None:
        pytest.skip("the float64 gradient oracle needs torch")
    return a


@pytest.fixture(scope="session")
def adapters_pair(pair):
    return get_adapter(pair[0]), get_adapter(pair[1])


# Largest observed error per (check, backend), printed at the end and written to
# $DAR_CONFORMANCE_REPORT (JSON) when set.
OBSERVED: dict[tuple[str, str], float] = {}


def record(check: str, backend: str, err: float) -> float:
    key = (check, backend)
    OBSERVED[key] = max(OBSERVED.get(key, 0.0), float(err))
    return err


def pytest_terminal_summary(terminalreporter):
    if not OBSERVED:
        return
    tr = terminalreporter
    tr.section("largest observed errors")
    for (check, backend), err in sorted(OBSERVED.items()):
        tr.write_line(f"{check:<28} {backend:<14} {err:.3e}")
    path = os.environ.get("DAR_CONFORMANCE_REPORT")
    if path:
        import json

        with open(path, "w") as f:
            json.dump({f"{c}/{b}": e for (c, b), e in sorted(OBSERVED.items())}, f, indent=1)
