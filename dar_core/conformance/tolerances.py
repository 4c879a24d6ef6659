"""Every tolerance of the suite, in one table (mirrored in README.md with the reasons).

Errors are ``max |a - b| / max |b|`` (``dar_core.testing.rel_err``) unless named otherwise.

Drawn models can be ill-conditioned: with large weights and per-token (``dynamic``) queries
the routing logits are large, and a one-ulp change of the weights moves the output by 1e-4
where a typical draw moves by 1e-7. No float32 implementation can do better than that, so
whole-model forward checks allow ``CONDITION_FACTOR`` times the draw's measured float32
sensitivity (``sensitivity``) plus a floor of ``FLOOR_ULPS`` unit roundoffs (``forward_tol``):
the bound follows the draw's own conditioning, so it stays tight where the model is well
conditioned (it catches, e.g., exact GELU in place of DiT's tanh approximation: a relative
change of 2e-6 to 2e-4 of the output).
"""

import os
from collections.abc import Callable

import numpy as np

from dar_core.testing import rel_err

# The arithmetic each device kind does for each dtype, with the suite's precision flags set
# (``strict_float32``: TF32 off in torch's CUDA matmuls and cuDNN convolutions, XLA matmul
# precision ``highest``): its unit roundoff and why. ``TOL`` below is written for the CPU;
# ``tol`` scales it by this device's unit roundoff over the CPU's, so a device whose arithmetic
# is coarser gets proportionally wider bounds and one with the same arithmetic the same.
ARITHMETIC = {
    ("cpu", "float32"): (2.0**-24, "IEEE float32"),
    ("cpu", "bfloat16"): (2.0**-8, "bf16 operands, float32 accumulation (oneDNN / XLA CPU / MLX)"),
    ("cuda", "float32"): (2.0**-24, "IEEE float32: TF32 is switched off for matmuls "
                                    "(torch.backends.cuda.matmul.allow_tf32, float32 matmul "
                                    "precision 'highest') and cuDNN convolutions "
                                    "(torch.backends.cudnn.allow_tf32, on by default); JAX "
                                    "matmuls at precision 'highest'"),
    ("cuda", "bfloat16"): (2.0**-8, "bf16 tensor-core operands, float32 accumulation"),
    ("tpu", "float32"): (2.0**-24, "jax_default_matmul_precision='highest': float32 matmuls "
                                   "are not rounded through bf16 passes (XLA's TPU default "
                                   "would give ~2^-8 per product)"),
    ("tpu", "bfloat16"): (2.0**-8, "bf16 MXU operands, float32 accumulation"),
    ("gpu", "float32"): (2.0**-24, "Metal float32 (MLX, torch mps); no float64 on the device: "
                                   "the float64 oracle runs on the CPU"),
    ("gpu", "bfloat16"): (2.0**-8, "bf16 operands, float32 accumulation"),
}

TOL = {
    # float32 forward vs an independent float64 model with no sensitivity estimate (the
    # residual stream against a plain DiT): ~1e-7 per op, a few hundred ops deep.
    ("forward", "float32"): 1e-4,
    # the loss is one mean over outputs: tighter than the worst element.
    ("loss", "float32"): 1e-5,
    # gradients: per parameter, max|g - g64| <= rtol * max|g64| + atol * (largest gradient).
    ("grad_rtol", "float32"): 2e-3,
    ("grad_atol", "float32"): 2e-5,
    # the routing op alone: softmax of a handful of dot products.
    ("route", "float32"): 2e-6,
    ("route_grad", "float32"): 2e-5,
    # bf16 (8-bit mantissa): outputs to a few percent, gradients by direction.
    ("forward", "bfloat16"): 6e-2,
    ("grad_cosine", "bfloat16"): 0.99,
    # samplers compound the forward error over the steps (Heun: 2 evaluations per step).
    ("sample", "float32"): 1e-3,
    # checkpoints move float32 arrays bit for bit; the loaded model's output vs the writer's.
    ("checkpoint", "float32"): 2e-4,
    # weights after 3 AdamW steps (lr 1e-2) trained in two backends from the same init and
    # batches. Each step moves a weight by lr * m_hat / (sqrt(v_hat) + eps), ~lr * sign(g):
    # where a gradient entry is near zero the two backends' float32 gradients can give it
    # different step sizes, up to 2 lr per step apart. The bound asks for agreement well
    # inside that worst case (2 * 3 * lr / max|w| ~ 6e-2 for these weights).
    ("train_params", "float32"): 5e-3,
}


# float32 rounds every intermediate, the sensitivity perturbs only the weights and inputs:
# each of the ~100 rounding stages of a drawn model (a few blocks of LayerNorm, modulation,
# matmuls, softmax, routing) moves the output like one more such perturbation, and independent
# roundings add like a random walk, ~sqrt(100) = 10 times the sensitivity; 30 leaves 3x for
# the two-trial estimate of the sensitivity itself. (The thorough profile's largest ratio of
# error to sensitivity: 21 in JAX, 10 in MLX, 4 in torch; 200 draws each.)
CONDITION_FACTOR = 30.0
# The floor under it, in unit roundoffs of the dtype: the sensitivity of a non-degenerate model
# is at least ~1 unit roundoff, so 64 of them (3.8e-6 in float32) only guards the estimate's
# sampling (two random-sign trials can land on a cancellation).
FLOOR_ULPS = {"forward": 64, "forward_pair": 128}  # a pair: two float32 errors
# Draws below this sensitivity are also reported on their own (the errors of typical draws).
WELL_CONDITIONED = 1e-6


def device_kind() -> str:
    """The device kind the suite runs on (``DAR_CONFORMANCE_DEVICE``, default ``cpu``)."""
    return os.environ.get("DAR_CONFORMANCE_DEVICE", "cpu").strip() or "cpu"


def tol(kind: str, dtype: str = "float32", device: str | None = None) -> float:
    """The tolerance of check ``kind`` at ``dtype`` on ``device`` (default: the suite's)."""
    base = TOL[(kind, dtype)]
    if kind == "grad_cosine":  # a cosine bound: scale its distance from 1
        return 1.0 - (1.0 - base) * _scale(dtype, device)
    return base * _scale(dtype, device)


def _scale(dtype: str, device: str | None) -> float:
    dev = device or device_kind()
    u = ARITHMETIC[(dev, dtype)][0] if (dev, dtype) in ARITHMETIC else None
    if u is None:
        raise KeyError(f"no arithmetic stated for device {dev!r} at {dtype}")
    return u / ARITHMETIC[("cpu", dtype)][0]


def sensitivity(fn: Callable[[dict, np.ndarray], np.ndarray], params: dict, x: np.ndarray,
                dtype: str = "float32", trials: int = 2) -> float:
    """Relative change of ``fn(params, x)`` (a float64 forward) when every weight and input
    moves by one ulp of ``dtype`` with a random sign: the draw's condition at that dtype."""
    base = fn(params, x)
    ulp = ARITHMETIC[(device_kind(), dtype)][0]
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(trials):
        def nudge(a: np.ndarray) -> np.ndarray:
            a = np.asarray(a, np.float64)
            return a * (1 + ulp * rng.choice([-1.0, 1.0], a.shape))

        worst = max(worst, rel_err(fn({k: nudge(v) for k, v in params.items()}, nudge(x)),
                                   base))
    return worst


def forward_tol(kind: str, sens: float, dtype: str = "float32") -> float:
    """A whole-model forward tolerance from the draw's sensitivity (module docstring)."""
    return FLOOR_ULPS[kind] * ARITHMETIC[(device_kind(), dtype)][0] + CONDITION_FACTOR * sens


def route_grad_scales(v: np.ndarray, q: np.ndarray, w: np.ndarray, g: np.ndarray,
                      eps: float = 1e-6) -> dict[str, float]:
    """The scale float32 rounding in each routing gradient is relative to: the largest sum of
    the absolute values of its terms (float64).

    Where terms cancel, a gradient is far smaller than its terms, and no float32 computation
    gets it to ``tol`` relative to its own size. Two places cancel: the softmax backward
    ``beta_i = alpha_i (dalpha_i - sum_j alpha_j dalpha_j)`` when the softmax saturates (a
    weight of 6e-4 beside 0.9994 amplifies the rounding of ``dalpha`` 1500-fold), and the dot
    products ``dalpha_i = g . v_i`` of nearly orthogonal vectors. The scales replace each
    factor by a sum of absolute values, so they equal the gradients' own size when nothing
    cancels. ``v [N, ..., d]``, ``q`` broadcastable to ``[..., d]``, ``w [d]``,
    ``g [..., d]``.
    """
    v, q, w, g = (np.asarray(a, np.float64) for a in (v, q, w, g))
    d = v.shape[-1]
    r = 1.0 / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)  # [N, ..., 1]
    qt = q * w / np.sqrt(d)  # [..., d]
    logits = r[..., 0] * np.sum(v * qt, axis=-1)  # [N, ...]
    alpha = np.exp(logits - logits.max(0))
    alpha /= alpha.sum(0)  # [N, ...]
    dalpha_abs = np.sum(np.abs(v) * np.abs(g), axis=-1)  # [N, ...]
    beta_abs = alpha * (dalpha_abs + np.sum(alpha * dalpha_abs, axis=0))  # [N, ...]
    s_abs = np.sum(np.abs(v) * np.abs(qt), axis=-1)  # [N, ...]
    b = beta_abs[..., None]
    dv = (alpha[..., None] * np.abs(g) + b * r * np.abs(qt)
          + b * s_abs[..., None] * r**3 / d * np.abs(v))  # [N, ..., d]
    dqt = np.sum(b * r * np.abs(v), axis=0)  # [..., d]: the folded query's gradient
    dq = _sum_to(dqt * np.abs(w) / np.sqrt(d), q.shape)  # q's gradient sums what it broadcasts
    dw = (dqt * np.abs(q) / np.sqrt(d)).reshape(-1, d).sum(0)
    return {"dv": float(dv.max()), "dq": float(dq.max()), "dw": float(dw.max())}


def _sum_to(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``a`` over the axes that an array of ``shape`` was broadcast along."""
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a
