"""The learning-rate schedule every backend follows: linear warm-up, then constant or cosine.

This is the specification; each backend builds the same schedule from its framework's own
schedulers (``torch.optim.lr_scheduler``, optax schedules, ``mlx.optimizers`` schedules) and
the tests check those against ``lr_at`` step by step. Step ``k`` is 0-based: the update made
by step ``k`` uses ``lr_at(k)``.

* warm-up (``warmup_steps = W >= 2``): ``lr * (k + 1) / W`` for ``k < W``, so the first step
  already moves and step ``W - 1`` reaches ``lr``; ``W`` of 0 or 1 means no warm-up.
* ``constant``: ``lr`` after the warm-up.
* ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * (k - W) / (steps - W))) / 2`` for
  ``W <= k < steps``: ``lr`` at the end of the warm-up, approaching ``min_lr`` at the end.
"""

from __future__ import annotations

import math

from dar_core.errors import ConfigError

SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def check_schedule(lr: float, schedule: str, warmup_steps: int, min_lr: float,
                   steps: int) -> None:
    """Raise ConfigError naming the first bad schedule field."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"lr_schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if schedule == "cosine" and warmup_steps >= steps:
        raise ConfigError(f"warmup_steps={warmup_steps} leaves no steps of the cosine schedule "
                          f"(steps={steps}); use fewer warm-up steps")
    if not (isinstance(min_lr, (int, float)) and math.isfinite(min_lr) and 0 <= min_lr <= lr):
        raise ConfigError(f"min_lr must be a finite number in [0, lr={lr}], got {min_lr!r}")


def warmup_length(warmup_steps: int) -> int:
    """The effective warm-up: 0 and 1 both mean none (``lr * 1 / 1`` is ``lr``)."""
    return warmup_steps if warmup_steps >= 2 else 0


def lr_at(step: int, *, lr: float, schedule: str, warmup_steps: int, min_lr: float,
          steps: int) -> float:
    """The learning rate of the update made by 0-based ``step``."""
    W = warmup_length(warmup_steps)
    if step < W:
        return lr * (step + 1) / W
    if schedule == "constant":
        return float(lr)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - W) / (steps - W)))
