"""Tests for the evaluator, the quality metrics and the checkpoint evaluation protocol."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dar_core.errors import CheckpointError, ConfigError, InputError
from dar_core.evaluation.evaluator import Evaluator, EvaluatorSpec, conv3x3, gelu_tanh, weights_path
from dar_core.evaluation.metrics import (
    conditional_accuracy,
    factor_accuracy,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    kid,
    quality_report,
)
from dar_core.evaluation.protocol import evaluate_checkpoint, protocol_inputs, sample_protocol
from dar_core.io.checkpoint import save_checkpoint
from dar_core.io.data import ProceduralDataset
from dar_core.spec.config import model_config
from dar_core.spec.schema import init_params, random_params
from dar_core.testing import ulp_tol

# --------------------------------------------------------------------------- helpers


def _with_moments(rng: np.random.Generator, n: int, mu: np.ndarray, cov: np.ndarray
                  ) -> np.ndarray:
    """``[n, d]`` samples whose *sample* mean and covariance are exactly ``mu`` and ``cov``."""
    z = rng.standard_normal((n, mu.shape[0]))
    z -= z.mean(axis=0)
    w, v = np.linalg.eigh(np.atleast_2d(np.cov(z, rowvar=False)))
    z = z @ (v / np.sqrt(w)) @ v.T  # sample covariance exactly I
    w, v = np.linalg.eigh(cov)
    return mu + z @ (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fd_roundoff(c_a: np.ndarray, c_b: np.ndarray, kappa: float = 1.0) -> float:
    """Float64 round-off bound of an FD computed from the eigenvalues of
    ``M = C_a^1/2 C_b C_a^1/2`` (``kappa = 1``) or of the product ``C_a C_b`` (``kappa`` = the
    condition number of its eigenvector matrix, ``sqrt(cond(C_a))``).

    A backward-stable eigensolver returns the eigenvalues to ``delta = kappa d eps ||C_a|| ||C_b||``
    (Bauer-Fike). ``tr M^1/2`` sums their square roots, and ``sqrt`` is only Hoelder-1/2 at 0:
    an eigenvalue ``lam`` moved by ``delta`` moves ``sqrt(lam)`` by at most
    ``min(sqrt(delta), delta / (2 sqrt(lam)))``. So with a rank-deficient covariance the FD is
    good to ``~sqrt(eps)``, not ``eps``, on any BLAS. The other terms (traces, ``|mu_a - mu_b|^2``)
    are ``d``-term sums, good to ``d eps`` of their size.
    """
    d = c_a.shape[0]
    eps = np.finfo(np.float64).eps
    delta = kappa * d * eps * np.linalg.norm(c_a, 2) * np.linalg.norm(c_b, 2)
    lam = np.clip(np.linalg.eigvals(c_a @ c_b).real, 0.0, None)
    with np.errstate(divide="ignore"):
        per_eig = np.minimum(np.sqrt(delta), delta / (2.0 * np.sqrt(lam)))
    return float(2.0 * per_eig.sum() + d * eps * (np.trace(c_a) + np.trace(c_b)))


def _blur(x: np.ndarray) -> np.ndarray:
    """3x3 box blur with edge replication (a generator that misses fine detail)."""
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[2:]
    return sum(p[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


@pytest.fixture(scope="module")
def heldout16():
    return ProceduralDataset(16, num_classes=24, seed=0).heldout(2000)


def test_modules_import_no_framework():
    code = ("import sys, dar_core.evaluation.evaluator, dar_core.evaluation.metrics, "
            "dar_core.evaluation.protocol; "
            "print(sorted(m for m in ('torch', 'jax', 'mlx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- Fréchet


def test_fd_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)) + 3.0
    assert frechet_distance(a, a) < 1e-6
    assert frechet_distance(a, a[::-1]) < 1e-6  # order does not matter


@pytest.mark.parametrize("d", [1, 5, 40])
def test_fd_matches_closed_form_for_diagonal_gaussians(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    want = float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2)))
    got = frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2))
    tol = _fd_roundoff(np.diag(s1), np.diag(s2)) + ulp_tol(3 * d) * (want + np.sum(s1 + s2))
    assert got == pytest.approx(want, rel=0, abs=tol)
    # the same through features whose sample moments are exactly those
    a = _with_moments(rng, 300, mu1, np.diag(s1))
    b = _with_moments(rng, 500, mu2, np.diag(s2))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-8)
    # a common rotation changes nothing
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert frechet_distance(a @ q.T, b @ q.T) == pytest.approx(want, rel=1e-8)


def test_fd_general_covariances_match_eigenvalue_form_and_are_symmetric():
    rng = np.random.default_rng(3)
    d = 12
    m1, m2 = rng.standard_normal((d, d)), rng.standard_normal((d, 3))  # cov2 rank 3
    c1, c2 = m1 @ m1.T / d, m2 @ m2.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # independent route: tr((C1 C2)^1/2) = sum of sqrt of the (real, >= 0) eigenvalues
    lam = np.clip(np.linalg.eigvals(c1 @ c2).real, 0, None)
    want = float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
                 - 2 * np.sum(np.sqrt(lam)))
    got = frechet_distance_from_stats(mu1, c1, mu2, c2)
    # the eigenvalue route works on the non-symmetric C1 C2 = C1^1/2 M C1^-1/2
    tol = _fd_roundoff(c1, c2) + _fd_roundoff(c1, c2, kappa=np.sqrt(np.linalg.cond(c1)))
    assert got == pytest.approx(want, rel=0, abs=tol)
    # swapping the sets swaps the roles of the two square roots: each side has its own error
    swapped = frechet_distance_from_stats(mu2, c2, mu1, c1)
    assert swapped == pytest.approx(got, rel=0, abs=_fd_roundoff(c1, c2) + _fd_roundoff(c2, c1))
    a, b = rng.standard_normal((50, d)), 2.0 * rng.standard_normal((80, d)) + 1.0
    (_, ca), (_, cb) = gaussian_stats(a), gaussian_stats(b)
    assert frechet_distance(a, b) == pytest.approx(
        frechet_distance(b, a), rel=0, abs=_fd_roundoff(ca, cb) + _fd_roundoff(cb, ca))


def test_fd_and_stats_validate_inputs():
    with pytest.raises(InputError, match=r"\[5\]"):
        frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(InputError, match=r"\[10, 3\].*\[10, 4\]"):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(InputError, match="at least 2 rows"):
        frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))
    with pytest.raises(InputError, match="1 non-finite"):
        frechet_distance(np.array([[0.0, np.nan], [1.0, 2.0]]), np.zeros((2, 2)))
    mu, cov = gaussian_stats(np.arange(12.0).reshape(6, 2))
    assert mu.shape == (2,) and cov.shape == (2, 2) and cov.dtype == np.float64


# --------------------------------------------------------------------------- KID


def _kid_direct(a, b, subsets, subset_size, seed):
    """Per-subset unbiased MMD^2, written out term by term (same subset draws)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    k = lambda x, y: (x @ y.T / x.shape[1] + 1.0) ** 3
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy = k(x, x), k(y, y)
        off = ~np.eye(m, dtype=bool)
        vals.append(kxx[off].mean() + kyy[off].mean() - 2 * k(x, y).mean())
    return np.mean(vals), np.std(vals)


def _kid_roundoff(a: np.ndarray, b: np.ndarray, m: int) -> float:
    """Float64 round-off bound of one subset's MMD^2 when computed in two different orders:
    three means of ~m^2 kernel values, each a d-term dot product then a cube (relative error
    ~(d + 4) eps), summed in m^2 terms, all bounded by Cauchy-Schwarz by
    ``(max|x| max|y| / d + 1)^3``."""
    d = a.shape[1]
    r = max(np.linalg.norm(a, axis=1).max(), np.linalg.norm(b, axis=1).max())
    kmax = (r * r / d + 1.0) ** 3
    return 4 * ulp_tol(m * m + d + 4) * kmax


def test_kid_matches_direct_formula_and_is_zero_for_same_distribution():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 8))
    b = rng.standard_normal((250, 8)) * 1.3 + 0.4
    got = kid(a, b, subsets=7, subset_size=100, seed=5)
    want = _kid_direct(a, b, 7, 100, 5)
    tol = _kid_roundoff(a, b, 100)
    assert got.mean == pytest.approx(want[0], rel=0, abs=tol)
    assert got.std == pytest.approx(want[1], rel=0, abs=2 * tol)
    assert got.mean > 0.1
    # identical sets / the same distribution: zero up to subset noise (and, for the very same
    # rows, a -2/N (E k(x, x) - E k(x, y)) bias from subsets sharing rows)
    big = rng.standard_normal((2000, 8))
    same = kid(big, big, subsets=20, subset_size=200, seed=1)
    fresh = kid(big, rng.standard_normal((2000, 8)), subsets=20, subset_size=200, seed=1)
    for k in (same, fresh):
        assert abs(k.mean) < 0.02 * got.mean and abs(k.mean) < 2 * k.std
    # subset_size larger than a set is clipped to the set size
    assert kid(a[:20], b, subsets=3, subset_size=1000).mean == pytest.approx(
        _kid_direct(a[:20], b, 3, 1000, 0)[0], rel=0, abs=_kid_roundoff(a[:20], b, 20))
    with pytest.raises(ConfigError, match="0"):
        kid(a, b, subsets=0)


# --------------------------------------------------------------------------- evaluator


def test_conv3x3_matches_direct_convolution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 3))  # [N, H, W, C]
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for stride in (1, 2):
        got = conv3x3(x, w, b, stride)
        ho, wo = math.ceil(5 / stride), math.ceil(6 / stride)
        assert got.shape == (2, ho, wo, 4)
        want = np.zeros_like(got)
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, stride * i:stride * i + 3, stride * j:stride * j + 3, :]
                want[:, i, j] = np.einsum("nhwc,ochw->no", patch, w) + b
        # 27 products and a bias summed in two orders, bounded by sum|w| max|x| + max|b|
        scale = np.abs(w).sum(axis=(1, 2, 3)).max() * np.abs(x).max() + np.abs(b).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=ulp_tol(2 * 28) * scale)


def test_gelu_matches_torch_tanh_gelu():
    torch = pytest.importorskip("torch")
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(gelu_tanh(x), want, rtol=1e-6, atol=1e-6)
    assert gelu_tanh(x).dtype == np.float32


@pytest.mark.parametrize("size", [16, 32])
def test_shipped_evaluator_metadata_and_size(size):
    path = weights_path(size)
    assert path.is_file() and path.stat().st_size < 1_000_000
    ev = Evaluator.load(size)
    md = ev.metadata
    assert ev.image_size == size and ev.num_classes == 24 and ev.feature_dim == 128
    assert md["dataset"] == "ProceduralDataset" and int(md["dataset_seed"]) == 0
    assert int(md["train_steps"]) > 0
    assert ev.spec == EvaluatorSpec.default(size)
    import json

    assert json.loads(md["heldout"])["accuracy"]["class"] >= 0.97
    assert ev.factor_values == ProceduralDataset(size).factor_values


@pytest.mark.parametrize("size", [16, 32])
def test_evaluator_classifies_heldout_real_images(size, heldout16):
    ds = ProceduralDataset(size, num_classes=24, seed=0)
    x, y = heldout16 if size == 16 else ds.heldout(1000)
    ev = Evaluator.load(size)
    out = ev.outputs(x)
    assert out.features.shape == (len(x), 128) and out.features.dtype == np.float64
    assert out.logits.shape == (len(x), 24)
    assert {k: v.shape for k, v in out.factor_logits.items()} == {
        "shape": (len(x), 6), "texture": (len(x), 4)}
    assert conditional_accuracy(ev, x, y) >= 0.95
    acc = factor_accuracy(ev, x, y, ds)
    assert set(acc) == {"shape", "texture"} and min(acc.values()) >= 0.95
    # a model trained on 10 classes: same class ids, same evaluator
    ds10 = ProceduralDataset(size, num_classes=10, seed=3)
    x10, y10 = ds10.heldout(240)
    assert conditional_accuracy(ev, x10, y10) >= 0.95


def test_shuffled_labels_drop_accuracy_to_chance(heldout16):
    x, y = heldout16
    ev = Evaluator.load(16)
    assert conditional_accuracy(ev, x, y) >= 0.97
    shuffled = np.random.default_rng(0).permutation(y)
    assert conditional_accuracy(ev, x, shuffled) < 0.15  # chance is 1/24


def test_evaluator_is_deterministic(heldout16):
    x = heldout16[0][:300]
    ev = Evaluator.load(16)
    a, b = ev.outputs(x), ev.outputs(x.copy())
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.logits, b.logits)
    fresh = Evaluator.from_file(weights_path(16))
    np.testing.assert_array_equal(fresh.features(x), a.features)
    np.testing.assert_array_equal(ev.logits(x), a.logits)
    np.testing.assert_array_equal(ev.factor_logits(x)["texture"], a.factor_logits["texture"])


def test_fd_orders_real_blurred_and_noise(heldout16):
    x, _ = heldout16
    ev = Evaluator.load(16)
    a, b = x[:1000], x[1000:]
    fa = ev.features(a)
    fd_real = frechet_distance(fa, ev.features(b))
    fd_blur = frechet_distance(fa, ev.features(_blur(b)))
    noise = np.random.default_rng(0).uniform(-1, 1, b.shape).astype(np.float32)
    fd_noise = frechet_distance(fa, ev.features(noise))
    assert fd_real < 1.0
    assert 10 * fd_real < fd_blur < fd_noise
    k_real = kid(fa, ev.features(b), subsets=20, subset_size=500)
    k_blur = kid(fa, ev.features(_blur(b)), subsets=20, subset_size=500)
    assert abs(k_real.mean) < 0.1 * k_blur.mean


def test_evaluator_input_errors_name_the_value(tmp_path):
    ev = Evaluator.load(16)
    with pytest.raises(InputError, match=r"\[4, 1, 16, 16\]"):
        ev.features(np.zeros((4, 1, 16, 16), np.float32))
    with pytest.raises(InputError, match=r"32x32.*image_size=32"):
        ev.features(np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="uint8"):
        ev.features(np.zeros((4, 3, 16, 16), np.uint8))
    with pytest.raises(InputError, match="2 non-finite"):
        ev.features(_nan_at_two())
    with pytest.raises(ConfigError, match="24"):
        Evaluator.load(24)
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        Evaluator.load(16, path=tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}" + b" " * 8)
    with pytest.raises(CheckpointError, match="not a dar evaluator"):
        Evaluator.load(16, path=bad)
    with pytest.raises(InputError, match=r"label 24"):
        conditional_accuracy(ev, np.zeros((2, 3, 16, 16), np.float32), [0, 24])


def _nan_at_two() -> np.ndarray:
    x = np.zeros((1, 3, 16, 16), np.float32)
    x[0, 0, 0, 0] = np.nan
    x[0, 2, 5, 7] = np.inf
    return x


# --------------------------------------------------------------------------- report


def test_quality_report_on_real_images_sits_at_the_floor():
    ds = ProceduralDataset(16, num_classes=10, seed=7)  # another seed: fresh real images
    x, y = ds.heldout(500)
    r = quality_report(x, y, image_size=16, n_reference=1000, kid_subsets=10,
                       kid_subset_size=300)
    for key in ("fd", "kid", "kid_std", "class_accuracy", "shape_accuracy", "texture_accuracy",
                "fd_real_floor", "kid_real_floor", "real_class_accuracy"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert (r["n_samples"], r["n_reference"], r["num_classes"]) == (500, 1000, 10)
    assert r["class_accuracy"] >= 0.95 and r["real_class_accuracy"] >= 0.95
    assert r["fd"] < 2.0 * r["fd_real_floor"] + 0.05
    blurred = quality_report(_blur(x), y, image_size=16, n_reference=1000, kid_subsets=10,
                             kid_subset_size=300)
    assert blurred["fd"] > 10 * r["fd"] and blurred["kid"] > 10 * abs(r["kid"])
    assert blurred["fd_real_floor"] == r["fd_real_floor"]  # same labels, cached baseline
    with pytest.raises(InputError, match=r"\[3\]"):
        quality_report(x, y[:3], image_size=16)


# --------------------------------------------------------------------------- protocol


def _tiny_checkpoint(path: Path, seed: int, *, zero_velocity: bool, depth: int = 2) -> Path:
    cfg = model_config("micro", input_size=16, num_classes=4, depth=depth)
    params = (init_params(cfg, seed=seed) if zero_velocity
              else random_params(cfg, seed=seed, dtype=np.float32))
    return save_checkpoint(path, cfg, params, meta={"step": seed})


def test_protocol_inputs_are_pure_and_balanced():
    y, z = protocol_inputs(seed=3, num_classes=5, n_per_class=4, image_shape=(3, 16, 16))
    y2, z2 = protocol_inputs(seed=3, num_classes=5, n_per_class=4, image_shape=(3, 16, 16))
    assert y.dtype == np.int64 and z.dtype == np.float32 and z.shape == (20, 3, 16, 16)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(z, z2)
    assert np.bincount(y[:5]).tolist() == [1] * 5 and np.bincount(y).tolist() == [4] * 5
    _, z3 = protocol_inputs(seed=4, num_classes=5, n_per_class=4, image_shape=(3, 16, 16))
    assert not np.array_equal(z, z3)
    with pytest.raises(ConfigError, match="n_per_class.*0"):
        protocol_inputs(seed=0, num_classes=5, n_per_class=0, image_shape=(3, 16, 16))


def test_evaluate_checkpoint_uses_the_same_noise_for_every_checkpoint(tmp_path):
    pytest.importorskip("torch")
    kw = dict(backend="torch", n_per_class=3, steps=2, seed=11)
    labels, noise = protocol_inputs(seed=11, num_classes=4, n_per_class=3,
                                    image_shape=(3, 16, 16))
    # adaLN-Zero initialisation: velocity is exactly 0, so each sample IS its starting noise
    for i, depth in enumerate((2, 3)):
        ck = _tiny_checkpoint(tmp_path / f"zero{i}.safetensors", i, zero_velocity=True,
                              depth=depth)
        images, y, proto = sample_protocol(ck, **kw)
        np.testing.assert_array_equal(y, labels)
        np.testing.assert_array_equal(images, noise)
    # trained-looking (dense random) weights: different samples, same protocol
    r1 = evaluate_checkpoint(_tiny_checkpoint(tmp_path / "a.safetensors", 1, zero_velocity=False),
                             kid_subsets=5, n_reference=200, **kw)
    r2 = evaluate_checkpoint(_tiny_checkpoint(tmp_path / "b.safetensors", 2, zero_velocity=False),
                             kid_subsets=5, n_reference=200, **kw)
    for key in ("fd", "kid", "kid_std", "class_accuracy", "shape_accuracy", "texture_accuracy",
                "fd_real_floor", "kid_real_floor", "real_class_accuracy", "protocol_id",
                "seed", "n_per_class", "sampler", "steps", "cfg_scale", "weights", "backend",
                "checkpoint", "step", "n_samples", "sample_seconds", "eval_seconds"):
        assert key in r1, key
    assert r1["protocol_id"] == r2["protocol_id"] and r1["fd"] != r2["fd"]
    assert (r1["n_samples"], r1["num_classes"], r1["sampler"], r1["steps"]) == (12, 4, "heun", 2)
    assert r1["fd_real_floor"] == r2["fd_real_floor"]
    assert r1["fd"] > r1["fd_real_floor"]  # random weights do not draw shapes
    again = evaluate_checkpoint(tmp_path / "a.safetensors", kid_subsets=5, n_reference=200,
                                **kw)
    assert {k: v for k, v in again.items() if not k.endswith("_seconds")} == {
        k: v for k, v in r1.items() if not k.endswith("_seconds")}


def test_evaluate_checkpoint_rejects_non_procedural_models(tmp_path):
    cfg = model_config("micro", input_size=8)
    ck = save_checkpoint(tmp_path / "c.safetensors", cfg, init_params(cfg))
    with pytest.raises(ConfigError, match="input_size=8"):
        evaluate_checkpoint(ck, backend="torch")


def test_dar_eval_cli(tmp_path):
    pytest.importorskip("torch")
    import json

    from dar_core.cli import main
    from dar_core.spec.schema import init_params

    cfg = model_config("micro", input_size=16)
    ck = save_checkpoint(tmp_path / "c.safetensors", cfg, init_params(cfg), meta={"step": 0})
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ck), "--backend", "torch", "--n-per-class", "3",
                 "--steps", "2", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["n_per_class"] == 3 and r["steps"] == 2 and r["fd"] > r["fd_real_floor"]
