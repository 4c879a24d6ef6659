"""Sessions: tests, conformance, lint, fidelity, demo (the README's main job), bench, minimum.

Environments are reused between runs (``reuse_venv``); every install goes through
``constraints.txt`` so CPU machines never pull CUDA wheels — except ``minimum``, which
installs the lowest versions ``pyproject.toml`` declares (for torch, a CUDA build from the
package index: a few GB on first use, cached by pip afterwards).
"""

from __future__ import annotations

from pathlib import Path

import nox
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: nox itself depends on tomli there
    import tomli as tomllib

nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests", "conformance", "fidelity"]
CONSTRAINTS = ("-c", "constraints.txt")


def install(session: nox.Session, extras: str) -> None:
    session.install("-e", f".[{extras}]", *CONSTRAINTS)


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests of the core and of every installed backend."""
    install(session, "all")
    session.run("pytest", "tests", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"})


@nox.session
def conformance(session: nox.Session) -> None:
    """Cross-backend numerical agreement: ``dar conformance``, the suite the package ships
    (DAR_BACKENDS picks backends; posargs go to the command, e.g. ``-- --report r.json``)."""
    install(session, "all")
    session.run("dar", "conformance", "--profile", session.env.get("HYPOTHESIS_PROFILE", "ci"),
                *session.posargs)


# torch-fidelity needs torchvision, which does not import beside the CPU torch of
# constraints.txt: this session takes torch and torchvision of one release (a CUDA build on
# x86_64, run on the CPU) and the torch-fidelity release the test was written against.
FIDELITY = ("torch==2.14.1", "torchvision==0.29.1", "torch-fidelity==0.4.0")


@nox.session
def fidelity(session: nox.Session) -> None:
    """The FID pipeline against torch-fidelity (tests/test_fid_torch_fidelity.py)."""
    session.install(*FIDELITY)
    session.install("-e", ".[test]", *CONSTRAINTS)  # no torch there: the pins above stay
    session.run("python", "-c", "import torch, torchvision, torch_fidelity; "
                "print('torch', torch.__version__, 'torchvision', torchvision.__version__, "
                "'torch-fidelity', torch_fidelity.__version__)")
    session.run("pytest", "tests/test_fid_torch_fidelity.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """Train a tiny DAR model on the procedural data on CPU; write samples and plots."""
    install(session, "torch")
    session.run("python", "examples/torch_cuda.py", "--device", "cpu", "--out", "runs/demo",
                *session.posargs)


def lower_bounds(pyproject: Path = Path("pyproject.toml")) -> list[str]:
    """``name==X`` for every ``name>=X`` that pyproject.toml declares (its markers kept), so
    that installing against them tests the lowest direct versions the project admits."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    pins: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == ">=":
                marker = f"; {req.marker}" if req.marker else ""
                pins[f"{req.name}{marker}"] = f"{req.name}=={spec.version}{marker}"
    return sorted(pins.values())


@nox.session
def minimum(session: nox.Session) -> None:
    """Unit tests with the lowest direct dependency versions pyproject.toml declares."""
    pins = Path(session.create_tmp()) / "lower-bounds.txt"
    pins.write_text("\n".join(lower_bounds()) + "\n")
    session.log("lower bounds:\n" + pins.read_text())
    session.install("-e", ".[all]", "-c", str(pins))
    session.run("python", "-m", "pip", "list")
    session.run("pytest", "tests", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"})


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory of DAR vs residual per backend; writes benchmarks/results/.
    ``-- --device cuda``: PyTorch on a CUDA GPU instead (``*_cuda.{json,md}``)."""
    install(session, "all")
    session.run("python", "-m", "benchmarks.bench_routing", *session.posargs)
    session.run("python", "-m", "benchmarks.bench_overhead", *session.posargs)


@nox.session
def convergence(session: nox.Session) -> None:
    """The multi-seed DAR vs residual convergence study (CPU hours); writes
    benchmarks/results/convergence.*. ``-- --analyze-only`` redoes tables and plots."""
    install(session, "torch,test")
    session.run("python", "-m", "benchmarks.convergence", *session.posargs)
