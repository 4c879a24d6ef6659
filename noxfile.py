"""Sessions: tests, conformance, lint, demo (the README's main job), bench.

Environments are reused between runs (``reuse_venv``); every install goes through
``constraints.txt`` so CPU machines never pull CUDA wheels.
"""

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests", "conformance"]
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
    """Cross-backend numerical agreement (DAR_BACKENDS picks backends; default: installed)."""
    install(session, "all")
    session.run("pytest", "conformance", *session.posargs,
                env={"HYPOTHESIS_PROFILE": session.env.get("HYPOTHESIS_PROFILE", "ci")})


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


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory of DAR vs residual per backend; writes benchmarks/results/."""
    install(session, "all")
    session.run("python", "-m", "benchmarks.bench_routing", *session.posargs)
    session.run("python", "-m", "benchmarks.bench_overhead", *session.posargs)


@nox.session
def convergence(session: nox.Session) -> None:
    """The multi-seed DAR vs residual convergence study (CPU hours); writes
    benchmarks/results/convergence.*. ``-- --analyze-only`` redoes tables and plots."""
    install(session, "torch,test")
    session.run("python", "-m", "benchmarks.convergence", *session.posargs)
