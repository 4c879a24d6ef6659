"""Peak memory of one config's training step in a fresh process, printed in MB.

    python -m benchmarks.mem_probe <backend> '<ModelConfig JSON>' <batch>

Each backend's cases module measures it (``peak_memory_mb``): XLA's buffer assignment for
JAX, the allocator's statistics for MLX and CUDA, the reset peak-RSS mark for PyTorch on CPU.
A fresh process keeps one measurement's allocator state and settings out of the next.
"""

import importlib
import sys

from dar_core.spec.config import ModelConfig

backend, cfg_json, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
cases = importlib.import_module(f"benchmarks.{backend}_cases")
print(cases.peak_memory_mb(ModelConfig.from_json(cfg_json), batch))
