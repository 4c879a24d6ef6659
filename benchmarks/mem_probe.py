"""Run ``steps`` training steps of one config in a fresh process and print peak RSS (KB).

    python -m benchmarks.mem_probe torch '<ModelConfig JSON>' <batch> <steps>
"""

import importlib
import resource
import sys

from dar_core.config import ModelConfig

backend, cfg_json, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cases = importlib.import_module(f"benchmarks.{backend}_cases")
step = cases.train_step(ModelConfig.from_json(cfg_json), batch)
for _ in range(steps):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
