"""``dar fid``: the Fréchet distance against scipy's ``sqrtm`` and a closed form, IS and
precision/recall against independent computations, the offline InceptionV3 plumbing on a
weights file written here (random weights of the same architecture), and the errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dar_core.errors import InputError
from dar_core.evaluation.fid import (
    evaluate,
    inception_score,
    precision_recall,
)
from dar_core.evaluation.metrics import frechet_distance_from_stats, gaussian_stats

EPS64 = np.finfo(np.float64).eps
EPS32 = float(np.finfo(np.float32).eps)


def _fd_tolerance(c_a, c_b, mu_a, mu_b, fd):
    """Relative error bound of an FD computed in float64: the square roots lose about
    ``cond`` ulps of the covariance scale per entry, summed over D eigenvalues, and the result
    is a difference of terms of size ``scale`` (cancellation ``scale / fd``)."""
    d = len(mu_a)
    kappa = max(np.linalg.cond(c_a), np.linalg.cond(c_b))
    scale = np.trace(c_a) + np.trace(c_b) + float((mu_a - mu_b) @ (mu_a - mu_b))
    return 16 * d * EPS64 * kappa * scale / fd


def _scipy_fd(mu_a, c_a, mu_b, c_b):
    """ADM's / pytorch-fid's formula: ``sqrtm`` of the non-symmetric product."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(c_a @ c_b)
    assert np.abs(covmean.imag).max() < 1e-8 * np.abs(covmean.real).max()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(c_a) + np.trace(c_b) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("shift", [0.5, 0.05])  # a large and a small distance
def test_frechet_distance_matches_scipy_sqrtm(shift):
    rng = np.random.default_rng(0)
    d = 48
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    fa = rng.standard_normal((600, d))
    fb = (rng.standard_normal((500, d)) @ (np.eye(d) + shift * mix)) + shift
    (mu_a, c_a), (mu_b, c_b) = gaussian_stats(fa), gaussian_stats(fb)
    ours = frechet_distance_from_stats(mu_a, c_a, mu_b, c_b)
    ref = _scipy_fd(mu_a, c_a, mu_b, c_b)
    tol = _fd_tolerance(c_a, c_b, mu_a, mu_b, ref)
    assert tol < 1e-6  # well conditioned: the bound is inside the acceptance of 1e-6
    assert abs(ours - ref) <= tol * ref, (ours, ref, tol)
    # gaussian_stats is numpy's unbiased covariance
    np.testing.assert_allclose(c_a, np.cov(fa, rowvar=False), rtol=0, atol=1e-14)


def test_frechet_distance_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenvectors
    la, lb = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    c_a, c_b = (q * la) @ q.T, (q * lb) @ q.T
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    exact = float((mu_a - mu_b) @ (mu_a - mu_b) + np.sum((np.sqrt(la) - np.sqrt(lb)) ** 2))
    ours = frechet_distance_from_stats(mu_a, c_a, mu_b, c_b)
    assert abs(ours - exact) <= _fd_tolerance(c_a, c_b, mu_a, mu_b, exact) * exact


def test_inception_score_matches_entropy_form():
    special = pytest.importorskip("scipy.special")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((12, 10)) * 3
    p = special.softmax(logits, axis=1)
    # KL(p(y|x) || p(y)) averaged = H(p(y)) - mean H(p(y|x)); ADM splits in chunks of 5000,
    # here chunks of 5 (the last of 2) are averaged
    want = np.mean([np.exp(stats.entropy(c.mean(0)) - np.mean(stats.entropy(c, axis=1)))
                    for c in (p[:5], p[5:10], p[10:])])
    assert abs(inception_score(logits, split=5) - want) <= 1e3 * EPS64 * want
    assert inception_score(np.zeros((6, 10))) == pytest.approx(1.0, abs=1e-12)
    assert inception_score(np.eye(8) * 80) == pytest.approx(8.0, rel=1e-9)  # one class each


def _brute_pr(ref, samples, k=3):
    def dist2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_rad = np.sort(dist2(ref, ref), axis=1)[:, k]
    s_rad = np.sort(dist2(samples, samples), axis=1)[:, k]
    d = dist2(samples, ref)
    return (d <= r_rad[None]).any(1).mean(), (d <= s_rad[:, None]).any(0).mean()


def test_precision_recall_matches_brute_force_knn():
    pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((70, 8)).astype(np.float32)
    samples = (rng.standard_normal((55, 8)) * 0.7 + 0.4).astype(np.float32)
    got = precision_recall(ref, samples, block=16)  # several row blocks
    want = _brute_pr(ref.astype(np.float64), samples.astype(np.float64))
    assert 0 < want[0] < 1 and 0 < want[1] < 1  # neither trivial
    assert got == want
    assert precision_recall(ref, ref) == (1.0, 1.0)
    assert precision_recall(ref, samples + 100) == (0.0, 0.0)
    with pytest.raises(InputError, match="needs more than 3"):
        precision_recall(ref[:3], samples)


# ---------------------------------------------------------------------------- Inception
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random weights of the FID InceptionV3, He-initialized so that activations keep their
    scale through the 94 conv layers, saved as the state dict the loader reads."""
    torch = pytest.importorskip("torch")
    from dar_core.evaluation.inception import build_inception

    g = torch.Generator().manual_seed(0)
    state = build_inception().state_dict()
    for k, v in state.items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            v.copy_(torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif k == "fc.weight":
            v.copy_(torch.randn(v.shape, generator=g) / 2048 ** 0.5)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(state, path)
    return path


def _images(n, seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_tf1_bilinear_resize():
    torch = pytest.importorskip("torch")
    from dar_core.evaluation.inception import tf1_resize_bilinear

    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    out = tf1_resize_bilinear(x, 4)[0, 0]
    # TF1 (no half-pixel centres): output o samples input o * 2 / 4, the edge repeats
    row = [0.0, 5.0, 10.0, 10.0]
    want = torch.tensor([row, [10 + v for v in row], [20 + v for v in row],
                         [20 + v for v in row]])
    assert torch.equal(out, want)
    y = torch.rand(2, 3, 5, 7)
    assert torch.equal(tf1_resize_bilinear(y[..., :5], 5), y[..., :5])  # same size: identity


def test_inception_plumbing_on_local_weights(weights, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from dar_core.evaluation.inception import InceptionFeatures

    net = InceptionFeatures(weights, device="cpu", batch_size=2)
    assert not net.standard  # random weights are flagged as not the standard file
    x = _images(5, 0)
    f = net(x)
    assert {k: v.shape for k, v in f.items()} == {"pool": (5, 2048), "spatial": (5, 2023),
                                                 "logits": (5, 1008)}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in f.values())
    assert f["pool"].std(axis=0).mean() > 1e-3  # features differ between images
    # logits are pool_3 times the fc weight, without the bias (ADM's IS logits)
    w = torch.load(weights, weights_only=True)["fc.weight"].double().numpy()
    np.testing.assert_allclose(f["logits"], f["pool"].astype(np.float64) @ w.T,
                               rtol=0, atol=1e-4 * np.abs(f["logits"]).max())
    # spatial = the first 7 channels of Mixed_6d.branch1x1 (mixed_6/conv), in HWC order
    seen = []
    hook = net.model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    net(x[:1])
    hook.remove()
    want = seen[0][:, :7].permute(0, 2, 3, 1).reshape(1, -1).numpy()
    assert np.array_equal(net(x[:1])["spatial"], want)
    # batching does not change a row beyond float32 summation order
    g = InceptionFeatures(weights, device="cpu", batch_size=5)(x)
    for k in f:
        np.testing.assert_allclose(g[k], f[k], rtol=0,
                                   atol=1e3 * EPS32 * np.abs(f[k]).max())
    # the same tensors as safetensors give the same features
    st = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(weights, weights_only=True).items()},
              str(st))
    h = InceptionFeatures(st, device="cpu", batch_size=2)(x)
    assert all(np.array_equal(h[k], f[k]) for k in f)


def test_inception_missing_and_bad_files(tmp_path, weights):
    torch = pytest.importorskip("torch")
    from dar_core.evaluation.inception import WEIGHTS_FILE, InceptionFeatures

    with pytest.raises(InputError, match=WEIGHTS_FILE) as e:
        InceptionFeatures(tmp_path / "nope.pth")
    assert "nope.pth" in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(InputError, match="not an FID InceptionV3 state dict"):
        InceptionFeatures(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read InceptionV3 weights"):
        InceptionFeatures(junk)
    state = torch.load(weights, weights_only=True)
    state["fc.weight"] = state["fc.weight"][:10]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(InputError, match=r"'fc.weight' has shape \[10, 2048\]"):
        InceptionFeatures(tmp_path / "short.pth")


# ---------------------------------------------------------------------------- dar fid
def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_fid_against_images_adm_batch_and_cache(weights, tmp_path):
    pytest.importorskip("torch")
    from dar_core.evaluation.fid import image_features, reference_stats
    from dar_core.evaluation.inception import InceptionFeatures

    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=_images(5, 1))
    np.savez(ref, arr_0=_images(5, 2))
    r = evaluate(str(samples), str(ref), inception=str(weights), device="cpu")
    assert set(r) >= {"fid", "sfid", "inception_score", "precision", "recall"}
    assert r["fid"] > 0 and r["sfid"] > 0 and r["inception_score"] >= 1.0
    assert r["num_samples"] == 5 and r["ref_images"] == 5 and r["image_size"] == [8, 8]
    assert r["ref_source"] == {"fid": "computed here", "sfid": "computed here"}

    net = InceptionFeatures(weights)
    f_ref = image_features(ref, net)
    caches = list(tmp_path.glob("ref.npz.dar-inception-*.npz"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    again = reference_stats(ref, net)  # read from the cache, not recomputed
    assert caches[0].stat().st_mtime_ns == stamp
    assert np.array_equal(again["pool"], f_ref["pool"])
    mu, sigma = gaussian_stats(f_ref["pool"])
    assert np.array_equal(again["mu"], mu) and np.array_equal(again["sigma"], sigma)
    np.savez(ref, arr_0=_images(5, 3))  # another reference under the same name
    assert not np.array_equal(reference_stats(ref, net)["mu"], mu)  # the cache was refused

    # An ADM reference batch: its stored mu/sigma/mu_s/sigma_s are what FID and sFID use,
    # its images what precision/recall use
    rng = np.random.default_rng(0)
    stored = {"mu": rng.standard_normal(2048), "sigma": np.eye(2048),
              "mu_s": rng.standard_normal(2023), "sigma_s": np.eye(2023)}
    adm = tmp_path / "adm.npz"
    np.savez(adm, arr_0=_images(5, 2), **stored)
    a = reference_stats(adm, net)
    assert all(np.array_equal(a[k], v) for k, v in stored.items())
    assert np.array_equal(a["pool"], f_ref["pool"])  # the images of the first reference
    assert a["source"]["fid"].startswith("stored") and a["source"]["sfid"].startswith("stored")
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=stored["mu"], sigma=stored["sigma"])
    s = reference_stats(stats_only, net)
    assert s["pool"] is None and "mu_s" not in s and np.array_equal(s["mu"], stored["mu"])
    with pytest.raises(InputError, match="neither arr_0 images nor mu/sigma"):
        np.savez(tmp_path / "empty.npz", x=np.zeros(3))
        reference_stats(tmp_path / "empty.npz", net)


def test_reference_in_a_read_only_folder_is_cached_in_the_user_cache(weights, tmp_path,
                                                                      monkeypatch, capsys):
    pytest.importorskip("torch")
    import errno

    from dar_core.evaluation import fid
    from dar_core.evaluation.inception import InceptionFeatures

    ref_dir = tmp_path / "readonly"
    ref_dir.mkdir()
    ref = ref_dir / "ref.npz"
    np.savez(ref, arr_0=_images(5, 2))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write = fid.atomic_write_bytes

    def refuse_beside_ref(path, data):  # root ignores file modes: refuse the folder here
        if Path(path).parent == ref_dir:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return write(path, data)

    monkeypatch.setattr(fid, "atomic_write_bytes", refuse_beside_ref)
    net = InceptionFeatures(weights)
    first = fid.reference_stats(ref, net)
    cached = list((tmp_path / "home" / ".cache" / "dar" / "refstats").glob("*.npz"))
    assert len(cached) == 1 and first["cache"] == str(cached[0])
    assert not list(ref_dir.glob("*.dar-inception-*"))
    stamp = cached[0].stat().st_mtime_ns
    again = fid.reference_stats(ref, net)  # read back from the user cache
    assert again["cache"] == str(cached[0]) and cached[0].stat().st_mtime_ns == stamp
    assert np.array_equal(again["mu"], first["mu"])
    monkeypatch.setattr(fid, "atomic_write_bytes", lambda path, data: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    cached[0].unlink()
    fid.reference_stats(ref, net)  # nowhere to cache: said, and the numbers still come
    assert "could not cache the reference statistics" in capsys.readouterr().err


def test_dar_fid_cli_prints_protocol_notes_and_errors(weights, tmp_path):
    pytest.importorskip("torch")
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=_images(4, 1))
    np.savez(ref, arr_0=_images(4, 2))
    cmd = [sys.executable, "-m", "dar_core.cli", "fid", str(samples), "--ref", str(ref)]
    ok = subprocess.run([*cmd, "--inception", str(weights), "--out", str(tmp_path / "r.json")],
                        capture_output=True, text=True, env=_env(), timeout=120)
    assert ok.returncode == 0, ok.stderr
    for text in ("FID ", "sFID ", "IS ", "precision ", "recall ", "not the paper's 50,000",
                 "NOT the standard FID file", "TF1 bilinear", "carry no settings"):
        assert text in ok.stdout, (text, ok.stdout)
    missing = subprocess.run([*cmd, "--inception", str(tmp_path / "none.pth")],
                             capture_output=True, text=True, env=_env(), timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in missing.stderr
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    bad = subprocess.run([*cmd[:4], str(tmp_path / "float.npz"), "--ref", str(ref),
                          "--inception", str(weights)],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode == 2 and "expected uint8 [N, H, W, 3]" in bad.stderr
