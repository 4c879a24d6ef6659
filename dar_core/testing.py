"""Numerical comparison helpers shared by the tests, the conformance suite and benchmarks."""

from __future__ import annotations

from typing import Any

import numpy as np

from dar_core.spec.config import ModelConfig, RoutingConfig

# The routing variants every backend's forward is checked on against the reference: the
# baseline, dense, chunked, without the final aggregator, and chunk sizes that do not divide
# L (with the tiny preset's L = 8).
PARITY_VARIANTS: dict[str, RoutingConfig] = {
    "residual": RoutingConfig(mode="residual"),
    "dense_dynamic": RoutingConfig(query="dynamic", chunk_size=1),
    "c4_static_t": RoutingConfig(query="static_t", chunk_size=4),
    "c4_static_no_final": RoutingConfig(query="static", chunk_size=4, final_aggregator=False),
    "c3_static_t": RoutingConfig(query="static_t", chunk_size=3),
    "c3_dynamic_no_final": RoutingConfig(query="dynamic", chunk_size=3, final_aggregator=False),
}


def parity_inputs(cfg: ModelConfig, b: int = 3, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 ``(x, t, y)`` for parity tests: times at both ends and inside, the null label."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, cfg.input_size, cfg.input_size))
    t = np.array([0.0, 1.0, 0.37])[:b]
    y = np.array([cfg.num_classes, 0, 7])[:b]
    return x, t, y


def rel_err(a: Any, b: Any) -> float:
    """``max |a - b| / max |b|`` (0 when both are all zero), computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(a: Any, b: Any, rtol: float, what: str = "value") -> float:
    """Assert ``rel_err(a, b) <= rtol``; the message names what was compared and the error."""
    err = rel_err(a, b)
    if not err <= rtol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds {rtol:.1e}")
    return err


def ulp_tol(ops: float, dtype: Any = np.float64) -> float:
    """Round-off bound of ``ops`` rounded operations in ``dtype``: ``ops * eps`` — the standard
    first-order bound for a chain or a recursive sum of ``ops`` operations (each rounding
    contributes at most one unit roundoff ``eps / 2``; the factor 2 covers the two sides of a
    comparison computed in different orders). Multiply by the magnitude of the terms."""
    return float(ops) * float(np.finfo(dtype).eps)


def cosine(a: Any, b: Any) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))
