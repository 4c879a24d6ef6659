"""Sample-quality metrics on the procedural dataset: Fréchet distance, KID, accuracies.

Features come from the shipped evaluator (:mod:`dar_core.evaluation.evaluator`), not Inception:
nothing can be downloaded, and an evaluator trained on the data the models learn sees exactly the
factors that matter here (shape and texture). Why the pieces look the way they do:

* **Fréchet distance** ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``.
  There is no SciPy, and a general ``sqrtm`` of the non-symmetric product ``C_a C_b`` is the
  usual source of complex parts and NaNs anyway. Both square roots here are of symmetric PSD
  matrices, taken through ``eigh`` with round-off negative eigenvalues clipped to zero; the
  trace term is the same quantity, computed stably.
* **KID** is the unbiased MMD² with the cubic polynomial kernel ``(x.y / d + 1)^3``, averaged
  over random subsets (mean and standard deviation reported). Every subset statistic is a
  quadratic form ``u^T K u`` with a 0/1 indicator ``u``, so the kernel is evaluated once per
  pair of rows (in row blocks, bounded memory) instead of once per subset.
* **Accuracies**: a sample generated for class ``c`` should be classified as ``c`` by the
  evaluator (over all of its 24 classes: drifting into a class the model never trained on is
  an error too), and per factor: right shape, right texture.
* **Baselines in the same report.** FD and KID are biased upwards at finite sample size, so a
  bare number says little. ``quality_report`` also scores *real* images drawn for exactly the
  sample labels, disjoint from the reference, against the same reference
  (``fd_real_floor``, ``kid_real_floor``, ``real_class_accuracy``): the value a perfect
  generator would get with this many samples. The real KID floor is slightly *negative*:
  the reference and the baseline are class-balanced rather than i.i.d. draws, so pairs inside
  one set are a little less often of the same class than the unbiased estimator assumes, and
  same-class pairs have much larger kernel values. Samples with the same labels share that
  offset, so compare ``kid`` with ``kid_real_floor``, not with zero.

The reference is the held-out split of ``ProceduralDataset(image_size, num_classes, seed=0)``;
its features are cached in memory, as are those of the real baseline set.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from dar_core.errors import ConfigError, InputError
from dar_core.evaluation.evaluator import Evaluator, EvaluatorOutputs
from dar_core.io.data.procedural import MAX_CLASSES, ProceduralDataset

REFERENCE_SEED = 0  # dataset seed of the reference (held-out) and real-baseline images
# Seed domain of the real-baseline images: the dataset itself uses (seed, 0, step) for
# training, (seed, 1, block) for held-out and (seed, 2) for picture grids.
_REAL_BASELINE_DOMAIN = 1001
_KID_BLOCK = 1024  # kernel rows evaluated at a time


class KID(NamedTuple):
    mean: float
    std: float


# ---------------------------------------------------------------------------- Fréchet
def _check_features(name: str, f: Any, min_rows: int = 2) -> np.ndarray:
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2:
        raise InputError(f"{name} must be a 2-D [N, D] feature array, got shape {list(a.shape)}")
    if a.shape[0] < min_rows:
        raise InputError(f"{name} needs at least {min_rows} rows, got shape {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains {int(np.sum(~np.isfinite(a)))} non-finite values")
    return a


def _check_pair(feat_a: Any, feat_b: Any, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a = _check_features("feat_a", feat_a, min_rows)
    b = _check_features("feat_b", feat_b, min_rows)
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"feature dimensions differ: feat_a {list(a.shape)} vs feat_b {list(b.shape)}")
    return a, b


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features [N, D]`` (float64)."""
    f = _check_features("features", features)
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; round-off negatives clipped."""
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray,
                                mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """FD between Gaussians N(mu_a, cov_a) and N(mu_b, cov_b)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    d = mu_a.shape[0]
    for name, v in (("mu_b", mu_b), ("cov_a", cov_a), ("cov_b", cov_b)):
        want = (d,) if name.startswith("mu") else (d, d)
        if v.shape != want:
            raise InputError(f"{name} has shape {list(v.shape)}, expected {list(want)}")
    s_a = _psd_sqrt(cov_a)
    m = s_a @ cov_b @ s_a  # symmetric PSD, same eigenvalues as cov_a cov_b
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu_a - mu_b
    fd = float(diff @ diff) + float(np.trace(cov_a)) + float(np.trace(cov_b)) - 2.0 * tr_sqrt
    return max(fd, 0.0)  # exact arithmetic gives >= 0; only round-off can go below


def frechet_distance(feat_a: Any, feat_b: Any) -> float:
    """Fréchet distance between Gaussian fits of two feature sets ``[N_a, D]``, ``[N_b, D]``."""
    a, b = _check_pair(feat_a, feat_b)
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


# ---------------------------------------------------------------------------- KID
def _kernel_forms(x: np.ndarray, y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``[S]``: ``u_s^T K(x, y) v_s`` for indicator columns ``u [Nx, S]``, ``v [Ny, S]``."""
    d = x.shape[1]
    out = np.zeros(u.shape[1])
    for s in range(0, x.shape[0], _KID_BLOCK):
        k = (x[s:s + _KID_BLOCK] @ y.T / d + 1.0) ** 3  # [rows, Ny]
        out += np.einsum("rs,rs->s", u[s:s + _KID_BLOCK], k @ v)
    return out


def kid(feat_a: Any, feat_b: Any, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> KID:
    """Kernel Inception Distance: unbiased MMD² with ``k(x, y) = (x.y / d + 1)^3``.

    Each of ``subsets`` rounds draws ``m = min(subset_size, N_a, N_b)`` rows of each set
    without replacement (NumPy ``default_rng(seed)``); returns the mean and the standard
    deviation of the per-round estimates. Unbiased, so it can be slightly negative.
    """
    a, b = _check_pair(feat_a, feat_b)
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ConfigError(f"subsets must be a positive int, got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ConfigError(f"subset_size must be an int >= 2, got {subset_size!r}")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    u = np.zeros((a.shape[0], subsets))
    v = np.zeros((b.shape[0], subsets))
    for s in range(subsets):
        u[rng.choice(a.shape[0], m, replace=False), s] = 1.0
        v[rng.choice(b.shape[0], m, replace=False), s] = 1.0
    d = a.shape[1]
    diag_a = (np.einsum("nd,nd->n", a, a) / d + 1.0) ** 3  # k(x_i, x_i)
    diag_b = (np.einsum("nd,nd->n", b, b) / d + 1.0) ** 3
    s_aa = _kernel_forms(a, a, u, u) - diag_a @ u
    s_bb = _kernel_forms(b, b, v, v) - diag_b @ v
    s_ab = _kernel_forms(a, b, u, v)
    mmd = (s_aa + s_bb) / (m * (m - 1)) - 2.0 * s_ab / (m * m)
    return KID(float(mmd.mean()), float(mmd.std()))


# ---------------------------------------------------------------------------- accuracies
def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"labels must have shape [{n}] (one per image), got {list(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels must be integers, got dtype {y.dtype}")
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise InputError(f"label {int(bad[0])} is out of the evaluator's range "
                         f"[0, {num_classes})")
    return y.astype(np.int64)


def _factor_table(evaluator: Evaluator, dataset: ProceduralDataset) -> None:
    if (list(dataset.factor_names) != list(evaluator.factor_values)
            or dataset.factor_values != evaluator.factor_values):
        raise ConfigError(
            f"the dataset's factors {dataset.factor_values} differ from the evaluator's "
            f"{evaluator.factor_values}")


def _class_accuracy(out: EvaluatorOutputs, y: np.ndarray) -> float:
    return float(np.mean(out.logits.argmax(axis=1) == y))


def _factor_accuracy(out: EvaluatorOutputs, y: np.ndarray, dataset: ProceduralDataset
                     ) -> dict[str, float]:
    factors = dataset.class_factors(y)  # [N, n_factors]
    return {name: float(np.mean(out.factor_logits[name].argmax(axis=1) == factors[:, i]))
            for i, name in enumerate(dataset.factor_names)}


def conditional_accuracy(evaluator: Evaluator, images: Any, labels: Any) -> float:
    """Fraction of ``images`` the evaluator assigns to the class they were generated for."""
    out = evaluator.outputs(images)
    return _class_accuracy(out, _check_labels(labels, out.logits.shape[0],
                                              evaluator.num_classes))


def factor_accuracy(evaluator: Evaluator, images: Any, labels: Any,
                    dataset: ProceduralDataset) -> dict[str, float]:
    """Factor name -> fraction of images whose factor value (e.g. the shape) is right."""
    _factor_table(evaluator, dataset)
    out = evaluator.outputs(images)
    y = _check_labels(labels, out.logits.shape[0], dataset.num_classes)
    return _factor_accuracy(out, y, dataset)


# ---------------------------------------------------------------------------- report
@lru_cache(maxsize=8)
def _reference_features(image_size: int, num_classes: int, n: int) -> np.ndarray:
    ds = ProceduralDataset(image_size=image_size, num_classes=num_classes, seed=REFERENCE_SEED)
    x, _ = ds.heldout(n)
    out = Evaluator.load(image_size).features(x)
    out.setflags(write=False)
    return out


def _real_images(image_size: int, num_classes: int, labels: np.ndarray) -> np.ndarray:
    ds = ProceduralDataset(image_size=image_size, num_classes=num_classes, seed=REFERENCE_SEED)
    rng = np.random.default_rng([REFERENCE_SEED, _REAL_BASELINE_DOMAIN, labels.shape[0]])
    return ds.sample(rng, labels)


@lru_cache(maxsize=8)
def _real_baseline(image_size: int, num_classes: int, labels_key: bytes
                   ) -> EvaluatorOutputs:
    labels = np.frombuffer(labels_key, dtype=np.int64)
    return Evaluator.load(image_size).outputs(_real_images(image_size, num_classes, labels))


def quality_report(
    images: Any,
    labels: Any,
    *,
    image_size: int,
    reference: Any = None,
    n_reference: int = 2000,
    num_classes: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric for generated ``images [N, 3, S, S]`` (in [-1, 1]) and their ``labels``.

    Args:
        image_size: 16 or 32; selects the evaluator.
        reference: real images ``[M, 3, S, S]`` to compare against; default: the first
            ``n_reference`` held-out images of ``ProceduralDataset(image_size, num_classes,
            seed=0)`` (balanced classes; features cached).
        num_classes: the generator's class count (<= 24). Default: ``max(labels) + 1``.
        kid_subsets, kid_subset_size, seed: KID subsampling.

    Returns a flat dict: ``fd``, ``kid``, ``kid_std``, ``class_accuracy``,
    ``<factor>_accuracy`` (shape, texture), the real-image baselines ``fd_real_floor``,
    ``kid_real_floor``, ``real_class_accuracy`` (real images drawn for the same labels,
    disjoint from the reference, scored the same way), and the sizes used.
    """
    if image_size not in (16, 32):
        raise ConfigError(f"image_size must be 16 or 32, got {image_size!r}")
    evaluator = Evaluator.load(image_size)
    out = evaluator.outputs(images)
    n = out.features.shape[0]
    if n < 2:
        raise InputError(f"quality_report needs at least 2 images, got {n}")
    y = _check_labels(labels, n, evaluator.num_classes)
    if num_classes is None:
        num_classes = max(2, int(y.max()) + 1)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or not 2 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes must be an int in [2, {MAX_CLASSES}], "
                          f"got {num_classes!r}")
    num_classes = int(num_classes)
    dataset = ProceduralDataset(image_size=image_size, num_classes=num_classes,
                                seed=REFERENCE_SEED)
    y = _check_labels(y, n, num_classes)
    _factor_table(evaluator, dataset)

    if reference is None:
        if isinstance(n_reference, bool) or not isinstance(n_reference, int) or n_reference < 2:
            raise ConfigError(f"n_reference must be an int >= 2, got {n_reference!r}")
        ref = _reference_features(image_size, num_classes, n_reference)
        ref_name = f"ProceduralDataset.heldout (seed {REFERENCE_SEED})"
    else:
        ref = evaluator.features(reference)
        ref_name = "given"
    real = _real_baseline(image_size, num_classes, y.tobytes())

    kid_args = dict(subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    k = kid(out.features, ref, **kid_args)
    k_real = kid(real.features, ref, **kid_args)
    report: dict[str, Any] = {
        "fd": frechet_distance(out.features, ref),
        "kid": k.mean,
        "kid_std": k.std,
        "class_accuracy": _class_accuracy(out, y),
    }
    for name, acc in _factor_accuracy(out, y, dataset).items():
        report[f"{name}_accuracy"] = acc
    report.update({
        "fd_real_floor": frechet_distance(real.features, ref),
        "kid_real_floor": k_real.mean,
        "real_class_accuracy": _class_accuracy(real, y),
        "n_samples": n,
        "n_reference": int(ref.shape[0]),
        "num_classes": num_classes,
        "image_size": image_size,
        "reference": ref_name,
        "kid_subsets": kid_subsets,
        "kid_subset_size": min(kid_subset_size, n, int(ref.shape[0])),
        "evaluator_sha256": evaluator.metadata.get("sha256", ""),
    })
    return report

