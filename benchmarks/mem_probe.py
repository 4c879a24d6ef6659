"""Peak memory of one config's training step in a fresh process, printed in MB.

    python -m benchmarks.mem_probe <backend> '<ModelConfig JSON>' <batch>
        [--device cuda] [--precision bf16] [--compile] [--routing-impl fused]

Each backend's cases module measures it (``peak_memory_mb``): XLA's buffer assignment for
JAX, the allocator's statistics for MLX and CUDA, the reset peak-RSS mark for PyTorch on CPU.
A fresh process keeps one measurement's allocator state and settings out of the next. The
options (PyTorch's) pass through to ``peak_memory_mb`` only when given, so a backend whose
cases take none is called as ``peak_memory_mb(cfg, batch)``.
"""

import argparse
import importlib

from dar_core.spec.config import ModelConfig

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("backend")
ap.add_argument("config", help="ModelConfig JSON")
ap.add_argument("batch", type=int)
ap.add_argument("--device")
ap.add_argument("--precision")
ap.add_argument("--compile", action="store_true", default=None)
ap.add_argument("--routing-impl")
args = ap.parse_args()
options = {k: v for k, v in vars(args).items()
           if k not in ("backend", "config", "batch") and v is not None}
cases = importlib.import_module(f"benchmarks.{args.backend}_cases")
print(cases.peak_memory_mb(ModelConfig.from_json(args.config), args.batch, **options))
