"""Reading and writing PyTorch ``.pt`` files without ever running a full unpickle.

``read_pt`` is ``torch.load(weights_only=True)``: torch's restricted unpickler, which builds
tensors and plain containers (dict, list, tuple, str, numbers) and nothing else, plus one
allowlisted class, ``argparse.Namespace``, the ``args`` entry that DiT's and SiT's training
scripts store beside the weights (a Namespace is a bag of attributes: building one runs no
code of the file's choosing). A file that names any other global (``os.system`` in a
tampered pickle, a training script's own class) is refused with the name of that global; it
is never imported, let alone called.

torch is imported on first use, so ``dar_core`` keeps its no-framework-at-import rule.
"""

from __future__ import annotations

import argparse
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import CheckpointError
from dar_core.io.checkpoint import atomic_write_bytes

# The only classes a DiT/SiT checkpoint needs beyond what weights_only already allows.
SAFE_GLOBALS = (argparse.Namespace,)


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise CheckpointError("reading or writing .pt files needs torch: "
                              "pip install 'dar-core[torch]'") from None
    return torch


def read_pt(path: str | os.PathLike) -> Any:
    """The object stored in ``path``, loaded with ``weights_only=True`` on the CPU."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {str(path)!r} (expected a DiT/SiT .pt checkpoint)")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's restricted unpickler raises UnpicklingError and friends
        raise CheckpointError(f"{str(path)!r}: {_why(e)}") from None


def _why(e: Exception) -> str:
    """One line from torch's multi-paragraph weights_only error."""
    msg = str(e)
    g = re.search(r"GLOBAL ([\w.]+)", msg)
    if g:
        return (f"refused: the pickle needs the global {g.group(1)!r}, which is not a tensor, "
                "a plain container or argparse.Namespace (loading it would run code from the "
                "file; only weights_only loading is done)")
    w = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", msg, re.S)
    if w:
        return f"not a loadable torch checkpoint ({' '.join(w.group(1).split())})"
    detail = " ".join(msg.split())[:200]
    return f"not a torch checkpoint ({type(e).__name__}{': ' + detail if detail else ''})"


def write_pt(path: str | os.PathLike, state: dict[str, np.ndarray]) -> Path:
    """Atomically ``torch.save`` a plain ``name -> tensor`` state dict (float32 CPU tensors)."""
    torch = _torch()
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def to_numpy(name: str, v: Any) -> np.ndarray:
    """A stored tensor as a NumPy array (float16/bfloat16 widened to float32, no rounding)."""
    torch = _torch()
    if not isinstance(v, torch.Tensor):
        raise CheckpointError(f"state dict entry {name!r} is a {type(v).__name__}, "
                              "expected a tensor")
    if not v.is_floating_point():
        raise CheckpointError(f"state dict entry {name!r} has dtype {v.dtype}, "
                              "expected floating point weights")
    v = v.detach().cpu()
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()
    return v.numpy().copy()
