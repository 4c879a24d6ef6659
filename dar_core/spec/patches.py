"""Images to patch tokens and back (docs/spec.md §2.3), one definition for the reference and
every backend. Written against the array API (NumPy, torch, JAX; MLX through ``dar_core.xp``).

Tokens run row-major over the ``h x w`` grid of ``p x p`` patches. ``patchify`` orders a token's
features ``(c, i, j)``, the layout of a stride-``p`` convolution's weight ``[d, C, p, p]``, so
the patch embedding is one matmul with that weight reshaped to ``[d, C*p*p]``. ``unpatchify``
reads the final layer's features in DiT's ``(i, j, c)`` order.
"""

from __future__ import annotations

import math
from typing import Any

from dar_core.xp import namespace


def patchify(x: Any, p: int) -> Any:
    """``[B, C, H, W] -> [B, T, C*p*p]``, features in ``(c, i, j)`` order."""
    xp = namespace(x)
    B, C, H, W = x.shape
    x = xp.reshape(x, (B, C, H // p, p, W // p, p))  # [B, C, h, i, w, j]
    x = xp.permute_dims(x, (0, 2, 4, 1, 3, 5))  # [B, h, w, C, i, j]
    return xp.reshape(x, (B, (H // p) * (W // p), C * p * p))  # [B, T, C*p*p]


def unpatchify(x: Any, p: int, c: int) -> Any:
    """``[B, T, p*p*c] -> [B, c, H, W]``, per-token features in ``(i, j, c)`` order."""
    xp = namespace(x)
    B, T, _ = x.shape
    g = math.isqrt(T)
    x = xp.reshape(x, (B, g, g, p, p, c))  # [B, h, w, i, j, c]
    x = xp.permute_dims(x, (0, 5, 1, 3, 2, 4))  # [B, c, h, i, w, j]
    return xp.reshape(x, (B, c, g * p, g * p))  # [B, c, H, W]
