"""The check a fused routing kernel passes on its device before ``routing_impl="auto"``
selects it (docs/spec.md §8.2).

A backend's fused kernel (torch: Triton, JAX: Pallas) is compiled for the device it first
meets; on a GPU or TPU that compilation, and the numbers, can differ from what its tests
checked under an interpreter on the CPU. So ``"auto"`` runs one small aggregation per query
shape through the kernel and through the backend's per-source path (``"history"``), forward
and backward, and takes the kernel only when they agree. The backend supplies
``run(impl, v, q, w, g, dtype) -> [h, alpha, dv, dq, dw]`` (float64 NumPy): one read of all
``N`` sources ``v [N, B, T, d]`` with the raw query ``q``, the RMSNorm weight ``w [d]`` and
the loss ``sum(h * g)``, its sources in ``dtype``.

Bounds: both sides are float32 computations of the routing op, so each may be ``tol("route")``
/ ``tol("route_grad")`` from the exact value and they may differ by twice that; bf16 sources
compare as the kernel tests do (outputs within 5e-2, gradients by cosine).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from dar_core.testing import rel_err

from .tolerances import route_grad_scales, tol

__all__ = ["check_cases", "disagreement", "grad_err", "passes"]

N, B, T, D = 7, 2, 16, 96  # d not a power of two: the kernels' masked columns are exercised

Run = Callable[[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str], list]


def check_cases(seed: int = 0) -> list[tuple[str, str, tuple[np.ndarray, ...]]]:
    """``(query shape, source dtype, (v, q, w, g))`` for the shared ``[d]``, per-sample
    ``[B, 1, d]`` and per-token ``[B, T, d]`` queries in float32, and bf16 sources with a
    per-sample query (``static_t``, the default, under bf16 autocast)."""
    rng = np.random.default_rng(seed)
    shapes = {"static": (D,), "per_sample": (B, 1, D), "per_token": (B, T, D)}
    out = []
    for query, dtype in (("static", "float32"), ("per_sample", "float32"),
                         ("per_token", "float32"), ("per_sample", "bfloat16")):
        scale = rng.choice([0.1, 1.0, 4.0], (N, 1, 1, 1))  # sources of unequal size
        v = rng.standard_normal((N, B, T, D)) * scale
        q = 2.0 * rng.standard_normal(shapes[query])
        w = 1.0 + 0.3 * rng.standard_normal(D)
        g = rng.standard_normal((B, T, D))
        out.append((query, dtype, tuple(a.astype(np.float32) for a in (v, q, w, g))))
    return out


def grad_err(got: np.ndarray, ref: np.ndarray, scale: float) -> float:
    """A routing gradient's error as the conformance suite measures it: relative to the
    gradient's size or, where its terms cancel, to theirs (``route_grad_scales``)."""
    return float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), scale, 1e-30)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def _compare(query: str, dtype: str, inputs: tuple, got: list, ref: list,
             device: str) -> str | None:
    names = ("h", "alpha", "dv", "dq", "dw")
    for name, x in zip(names, got, strict=True):
        if not np.all(np.isfinite(x)):
            return f"{query} {dtype}: the kernel's {name} is not finite"
    if dtype != "float32":
        for name, x, r in zip(names[:2], got[:2], ref[:2], strict=True):
            if not np.allclose(x, r, rtol=5e-2, atol=5e-2):
                return f"{query} {dtype}: {name} differs by {float(np.abs(x - r).max()):.3g}"
        bound = tol("grad_cosine", "bfloat16", device)
        for name, x, r in zip(names[2:], got[2:], ref[2:], strict=True):
            if _cosine(x, r) < bound:
                return f"{query} {dtype}: {name} cosine {_cosine(x, r):.4f} < {bound}"
        return None
    for name, x, r in zip(names[:2], got[:2], ref[:2], strict=True):
        err, bound = rel_err(x, r), 2 * tol("route", "float32", device)
        if x.shape != r.shape or err > bound:
            return f"{query} {dtype}: {name} off by {err:.3g} (bound {bound:.3g})"
    scales = route_grad_scales(*inputs)
    for name, x, r in zip(names[2:], got[2:], ref[2:], strict=True):
        err, bound = grad_err(x, r, scales[name]), 2 * tol("route_grad", "float32", device)
        if x.shape != r.shape or err > bound:
            return f"{query} {dtype}: {name} off by {err:.3g} (bound {bound:.3g})"
    return None


def disagreement(run: Run, device: str = "cpu") -> str | None:
    """``None`` when ``run("fused", ...)`` agrees with ``run("history", ...)`` on every
    ``check_cases`` input; otherwise the first failure in one line (an exception the kernel
    raised, a non-finite value, or an error over its bound). ``device``: the tolerance
    table's device kind (``cpu``, ``cuda``, ``tpu``, ``gpu``)."""
    for query, dtype, inputs in check_cases():
        try:
            got = [np.asarray(a, np.float64) for a in run("fused", *inputs, dtype)]
        except Exception as e:  # noqa: BLE001 - any failure to compile or run is the answer
            return f"{query} {dtype}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ref = [np.asarray(a, np.float64) for a in run("history", *inputs, dtype)]
        why = _compare(query, dtype, inputs, got, ref, device)
        if why:
            return why
    return None


def passes(run: Run, device: str, where: str) -> bool:
    """``disagreement`` as the backends' ``routing_impl="auto"`` uses it: True when the kernel
    agrees; otherwise one ``RuntimeWarning`` naming the failure on ``where`` (the device or
    platform) and False, so the caller routes with ``"history"``."""
    why = disagreement(run, device)
    if why:
        warnings.warn(f"routing_impl='auto': the fused routing kernel failed its check on "
                      f"{where} ({why}); routing with the per-source path ('history')",
                      RuntimeWarning, stacklevel=3)
    return why is None
