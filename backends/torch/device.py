"""Device and precision names of the contract mapped onto PyTorch."""

from __future__ import annotations

import contextlib

import torch

from dar_core.backend import check_precision
from dar_core.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto", *, local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA device ``local_rank`` when present, else the CPU), or a torch device
    name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) that is available here."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else \
            torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must be 'auto' or a torch device name, got {device!r}") from e
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}.get(dev.type, False)
    if not available or (dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r} is not available to torch on this machine "
                          f"({_why_not(dev)}); available: {', '.join(_available())}")
    return dev


def _available() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names + (["mps"] if torch.backends.mps.is_available() else [])


def _why_not(dev: torch.device) -> str:
    if dev.type == "cuda" and torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA; install a CUDA wheel"
    if dev.type == "cuda":
        return f"torch sees {torch.cuda.device_count()} CUDA device(s)"
    return f"no {dev.type} device"


def compute_dtype(precision: str) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` -> the autocast dtype (``ConfigError`` otherwise)."""
    return DTYPES[check_precision(precision)]


def autocast(device: torch.device, precision: str):
    if compute_dtype(precision) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
