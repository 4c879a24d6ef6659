import subprocess
import sys

import pytest


def test_import_loads_no_framework():
    code = ("import sys, dar_core, dar_core.train.run, dar_core.cli, dar_core.spec.reference; "
            "import dar_core.sampling.samplers, dar_core.io.checkpoint, dar_core.io.data; "
            "print(sorted(m for m in ('torch', 'jax', 'mlx', 'mlx.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


FRAMEWORKS = {"torch": "torch", "jax": "jax", "mlx": "mlx"}


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_each_backend_imports_on_its_own(name):
    """``import dar_core.backends.<name>`` loads its own framework and no other, from the
    repository's ``backends/`` folder mapped to the ``dar_core.backends`` package."""
    pytest.importorskip(FRAMEWORKS[name])
    code = (f"import sys, dar_core.backends.{name} as b; print(b.__file__); "
            "print(sorted(m for m in ('torch', 'jax', 'mlx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0].endswith(f"backends/{name}/__init__.py"), out[0]
    assert out[1] == str([name]), f"dar_core.backends.{name} loaded the frameworks {out[1]}"
