"""Where a run's scalars go besides ``metrics.jsonl``: TensorBoard event files, written by one
writer (tensorboardX) for every backend, so a torch, JAX or MLX run looks the same in
TensorBoard.

The events live in ``<run>/tensorboard``. A resumed run starts a new event file with
``purge_step`` at its first step, so TensorBoard drops what the interrupted run logged past
its last checkpoint: the curves show one run, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dar_core.errors import ConfigError

FOLDER = "tensorboard"


class TensorBoardWriter:
    """Scalars of each logged step under ``train/<name>``."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard=True needs tensorboardX (pip install 'dar-core[tools]'"
                              "), or pass --no-tensorboard") from None
        self.logdir = Path(run_dir) / FOLDER
        # steps are 1-based counts of optimizer steps done: the resumed run logs from start+1
        self._w = SummaryWriter(logdir=str(self.logdir),
                                purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        for name, v in values.items():
            self._w.add_scalar(f"train/{name}", float(v), global_step=step)

    def close(self) -> None:
        self._w.close()
