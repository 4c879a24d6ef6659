"""Peak memory of one config's training step in a fresh process, printed in MB.

    python -m benchmarks.mem_probe <backend> '<ModelConfig JSON>' <batch> <steps>

A backend's cases module may measure it itself (``peak_memory_mb``: XLA's buffer assignment
for JAX, the allocator's statistics for MLX); otherwise the process runs ``steps`` training
steps and prints its peak resident memory, and the caller subtracts a 0-step run.
"""

import importlib
import resource
import sys

from dar_core.config import ModelConfig

backend, cfg_json, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cases = importlib.import_module(f"benchmarks.{backend}_cases")
cfg = ModelConfig.from_json(cfg_json)
if hasattr(cases, "peak_memory_mb"):
    print(cases.peak_memory_mb(cfg, batch))
else:
    step = cases.train_step(cfg, batch)
    for _ in range(steps):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
