"""Where a run's scalars go besides ``metrics.jsonl``: TensorBoard event files, written by one
writer (tensorboardX) for every backend, so a torch, JAX or MLX run looks the same in
TensorBoard; and Weights & Biases when asked for (``wandb = "project"``) and installed.

The events live in ``<run>/tensorboard``. A resumed run starts a new event file with
``purge_step`` at its first step, so TensorBoard drops what the interrupted run logged past
its last checkpoint: the curves show one run, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from dar_core.errors import ConfigError

FOLDER = "tensorboard"
WANDB_ID = "wandb-id"  # the W&B run of this folder, so a resumed run continues it


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
        # event files are named by the second they open in: a segment's own suffix keeps a
        # resumed segment that opens within the same second from overwriting the previous one
        self._w = SummaryWriter(logdir=str(self.logdir),
                                purge_step=start_step + 1 if start_step else None,
                                filename_suffix=f".{os.getpid()}.step{start_step}")

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        for name, v in values.items():
            self._w.add_scalar(f"train/{name}", float(v), global_step=step)

    def close(self) -> None:
        self._w.close()


class WandbWriter:
    """The run's config and scalars in a W&B run of ``project``; ``WANDB_MODE`` and the other
    W&B environment variables apply (``offline`` on a machine without network). The W&B run
    id lives in the run folder, so a resumed run logs into the same W&B run."""

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any], start_step: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"wandb={project!r} needs the wandb package (pip install wandb), "
                              "or leave --wandb empty") from None
        id_file = Path(run_dir) / WANDB_ID
        fresh = not (start_step and id_file.exists())
        run_id = secrets.token_hex(6) if fresh else id_file.read_text().strip()
        try:
            self._run = wandb.init(project=project, dir=str(run_dir), config=config, id=run_id,
                                   resume="allow", name=Path(run_dir).name)
        except Exception as e:  # wandb raises its own UsageError, CommError, ...
            msg = str(e).replace("\n", " ")[:200]
            raise ConfigError(f"wandb could not start a run in project {project!r} "
                              f"({type(e).__name__}: {msg}); log in (wandb login, "
                              "WANDB_API_KEY), set WANDB_MODE=offline, or leave --wandb "
                              "empty") from None
        if fresh:  # W&B ids: lower-case letters and digits
            id_file.write_text(run_id + "\n")

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        self._run.log({f"train/{k}": float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        self._run.finish()
