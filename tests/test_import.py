import subprocess
import sys


def test_import_loads_no_framework():
    code = ("import sys, dar_core, dar_core.train.run, dar_core.cli, dar_core.spec.reference; "
            "import dar_core.sampling.samplers, dar_core.io.checkpoint, dar_core.io.data; "
            "print(sorted(m for m in ('torch', 'jax', 'mlx', 'mlx.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_backends_are_a_subpackage():
    import dar_core.backends

    assert dar_core.backends.__name__ == "dar_core.backends"
