"""The conformance suite as users get it: ``dar conformance`` from a built wheel in a fresh
virtualenv (no repository on the path) passes and writes its report; with a deliberate
numerical change in a backend (exact GELU for DiT's tanh approximation) it fails and the
report names the check; a device no backend has here is a non-zero "nothing ran", never a
silent pass; bad arguments are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}


def _dar(*args: str, python: str = sys.executable, cwd: Path | None = None,
         timeout: int = 600) -> subprocess.CompletedProcess:
    """``dar conformance ...``: the console script next to ``python`` when there is one."""
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "DAR_BACKENDS")}
    script = Path(python).with_name("dar")
    command = [str(script)] if script.is_file() else [python, "-m", "dar_core.cli"]
    return subprocess.run([*command, "conformance", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def test_a_device_no_backend_has_is_nothing_ran_not_a_pass(tmp_path):
    res = _dar("--backends", "torch", "--device", "tpu", "--report", str(tmp_path / "r.json"),
               cwd=tmp_path)
    assert res.returncode == 5, res.stdout[-2000:]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["result"] == "nothing ran" and doc["tests"].get("passed", 0) == 0
    assert doc["skipped"]["torch"] == "backend 'torch' has no 'tpu' device"
    assert "NOTHING RAN" in res.stdout and "has no 'tpu' device" in res.stdout
    assert not (tmp_path / ".hypothesis").exists() and not (tmp_path / ".pytest_cache").exists()


@pytest.mark.parametrize("args, message", [
    (("--backends", "torch,cuda"), "--backends must name some of ['torch', 'jax', 'mlx']"),
    (("--profile", "nightly"), "invalid choice: 'nightly'"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    res = _dar(*args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and message in lines[-1], res.stderr  # after argparse's usage
    assert lines[-1].startswith("dar conformance: error: ")


def _source_copy(dest: Path) -> Path:
    """The files git knows (tracked, or untracked and not ignored): no stale build/ folder."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtualenv holding the wheel built from this checkout, with torch."""
    if shutil.which("git") is None:
        pytest.skip("building the wheel from a clean copy needs git")
    root = tmp_path_factory.mktemp("shipped")
    src = _source_copy(root / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w",
                    str(root / "dist")], check=True, timeout=600, env=ENV)
    wheel = next((root / "dist").glob("dar_core-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    python = str(root / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", f"{wheel}[torch,conformance]",
                    "-c", str(REPO / "constraints.txt")], check=True, timeout=900, env=ENV)
    where = subprocess.run([python, "-c", "import dar_core; print(dar_core.__file__)"],
                           capture_output=True, text=True, check=True, cwd=root).stdout
    assert where.startswith(str(root / "venv")), where  # the wheel, not this checkout
    return root, python


def test_the_wheel_passes_on_this_machine_and_reports(installed):
    root, python = installed
    work = root / "user-ci"
    work.mkdir()
    res = _dar("--profile", "ci", "--backends", "torch", "--report", "report.json",
               python=python, cwd=work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((work / "report.json").read_text())
    assert doc["result"] == "pass" and doc["tests"]["passed"] >= 10 and not doc["failed_checks"]
    assert doc["backends"]["torch"]["device"] == "cpu"
    assert doc["backends"]["torch"]["flags"]["torch.backends.cudnn.allow_tf32"] is False
    assert doc["skipped"] == {} and doc["versions"]["dar-core"] and doc["versions"]["torch"]
    checks = {(c["check"], c["backend"]): c for c in doc["checks"]}
    forward = checks[("model.forward", "torch")]
    assert forward["passed"] and 0 < forward["error"] <= forward["tolerance"]
    assert "dar conformance: PASS" in res.stdout
    assert sorted(p.name for p in work.iterdir()) == ["report.json"]  # nothing else left behind


def test_a_wrong_gelu_in_the_wheel_fails_and_the_report_names_the_check(installed):
    root, python = installed
    site = subprocess.run([python, "-c", "import dar_core.backends.torch.model as m; "
                           "print(m.__file__)"], capture_output=True, text=True, check=True,
                          cwd=root).stdout.strip()
    model = Path(site)
    text = model.read_text()
    assert text.count('approximate="tanh"') == 1
    model.write_text(text.replace('approximate="tanh"', 'approximate="none"'))  # exact GELU
    try:
        res = _dar("--backends", "torch", "--select", "forward_matches_reference", "--report",
                   str(root / "mutant.json"), python=python, cwd=root)
    finally:
        model.write_text(text)
    assert res.returncode == 1, res.stdout[-3000:]
    doc = json.loads((root / "mutant.json").read_text())
    assert doc["result"] == "fail" and doc["failed_checks"] == ["model.forward [torch]"]
    assert "failed checks: model.forward [torch]" in res.stdout
