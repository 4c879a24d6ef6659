"""Tests for dar_core.io.data: the procedural dataset and the folder-of-shards loader."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dar_core.errors import ConfigError, InputError
from dar_core.io.data import FolderDataset, ProceduralDataset, make_dataset
from dar_core.io.data.procedural import MAX_CLASSES, SHAPES, TEXTURES, save_class_grid

# --------------------------------------------------------------------------- procedural


@pytest.mark.parametrize("size", [16, 32])
def test_batch_shapes_dtypes_range(size):
    ds = ProceduralDataset(image_size=size, num_classes=10, seed=0)
    x, y = ds.train_batch(0, 256)
    assert x.shape == (256, 3, size, size) and x.dtype == np.float32
    assert y.shape == (256,) and y.dtype == np.int64
    assert np.all(np.isfinite(x))
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.5 and x.max() > 0.5  # uses the range, not a grey mush
    assert y.min() >= 0 and y.max() < 10
    assert (ds.image_size, ds.channels, ds.num_classes, ds.seed) == (size, 3, 10, 0)


def test_config_validation_names_value():
    with pytest.raises(ConfigError, match="24"):
        ProceduralDataset(image_size=24)
    with pytest.raises(ConfigError, match="64"):
        ProceduralDataset(image_size=64)
    with pytest.raises(ConfigError, match="1"):
        ProceduralDataset(num_classes=1)
    with pytest.raises(ConfigError, match=str(MAX_CLASSES + 1)):
        ProceduralDataset(num_classes=MAX_CLASSES + 1)
    with pytest.raises(ConfigError, match="-3"):
        ProceduralDataset(seed=-3)
    ProceduralDataset(num_classes=MAX_CLASSES)  # the largest supported set is fine
    assert MAX_CLASSES >= 10


def test_train_batch_deterministic_and_step_dependent():
    a = ProceduralDataset(16, 10, seed=5)
    b = ProceduralDataset(16, 10, seed=5)
    b.train_batch(3, 64)  # draws before must not matter
    xa, ya = a.train_batch(7, 64)
    xb, yb = b.train_batch(7, 64)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    x8, _ = a.train_batch(8, 64)
    assert not np.array_equal(xa, x8)
    xs, _ = ProceduralDataset(16, 10, seed=6).train_batch(7, 64)
    assert not np.array_equal(xa, xs)


@settings(max_examples=20, deadline=None)
@given(step=st.integers(0, 2**40), batch=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_train_batch_is_pure_function(step, batch, seed):
    ds = ProceduralDataset(16, 12, seed=seed)
    x1, y1 = ds.train_batch(step, batch)
    x2, y2 = ProceduralDataset(16, 12, seed=seed).train_batch(step, batch)
    assert x1.shape == (batch, 3, 16, 16)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert np.all((y1 >= 0) & (y1 < 12))


def test_train_labels_roughly_uniform():
    ds = ProceduralDataset(16, 10)
    y = np.concatenate([ds.train_batch(k, 500)[1] for k in range(10)])
    counts = np.bincount(y, minlength=10)
    assert counts.min() > 380 and counts.max() < 620


def test_heldout_fixed_balanced_and_disjoint():
    ds = ProceduralDataset(16, 10, seed=1)
    x, y = ds.heldout(300)
    assert x.shape == (300, 3, 16, 16) and y.dtype == np.int64
    np.testing.assert_array_equal(y, np.arange(300) % 10)
    x2, y2 = ProceduralDataset(16, 10, seed=1).heldout(300)
    np.testing.assert_array_equal(x, x2)
    # a prefix of a larger split, and the cache hands out copies
    x3, _ = ds.heldout(600)
    np.testing.assert_array_equal(x3[:300], x)
    x[:] = 0
    assert not np.array_equal(ds.heldout(300)[0], x)
    assert ds.heldout(0)[0].shape == (0, 3, 16, 16)
    # no held-out image appears in the first training batches
    held = {img.tobytes() for img in x2}
    for step in range(5):
        xt, _ = ds.train_batch(step, 128)
        assert not held & {img.tobytes() for img in xt}


def test_nuisance_variation_within_class():
    ds = ProceduralDataset(16, 10)
    x = ds.sample(np.random.default_rng(0), np.zeros(32, np.int64))
    flat = x.reshape(32, -1)
    assert len({row.tobytes() for row in flat}) == 32
    assert np.std(flat, axis=0).mean() > 0.1


def test_class_factors_and_coverage():
    ds = ProceduralDataset(16, MAX_CLASSES)
    assert ds.factor_names == ("shape", "texture")
    assert ds.factor_values == {"shape": list(SHAPES), "texture": list(TEXTURES)}
    f = ds.class_factors(np.arange(MAX_CLASSES))
    assert f.shape == (MAX_CLASSES, 2) and f.dtype == np.int64
    # every (shape, texture) pair exactly once, names agree with the factor indices
    assert len({tuple(r) for r in f}) == len(SHAPES) * len(TEXTURES)
    for name, (s, t) in zip(ds.class_names, f, strict=True):
        assert name == f"{SHAPES[s]}/{TEXTURES[t]}"
    # the first 10 classes cover every shape and every texture
    first = ProceduralDataset(16, 10).class_factors(np.arange(10))
    assert set(first[:, 0]) == set(range(len(SHAPES)))
    assert set(first[:, 1]) == set(range(len(TEXTURES)))
    # a smaller dataset is a prefix of the class table
    np.testing.assert_array_equal(first, f[:10])
    assert ProceduralDataset(16, 10).class_names == ds.class_names[:10]


@pytest.mark.parametrize("bad", [10, -1, 99])
def test_label_validation_names_value(bad):
    ds = ProceduralDataset(16, 10)
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match=f"label {bad}"):
        ds.sample(rng, [0, 1, bad])
    with pytest.raises(InputError, match=f"label {bad}"):
        ds.class_factors([bad])


def test_label_and_argument_type_errors():
    ds = ProceduralDataset(16, 10)
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="float"):
        ds.sample(rng, np.array([0.5, 1.0]))
    with pytest.raises(InputError, match=r"\(2, 2\)"):
        ds.sample(rng, np.zeros((2, 2), np.int64))
    with pytest.raises(InputError, match="Generator"):
        ds.sample(np.random.RandomState(0), [0])
    with pytest.raises(InputError, match="-1"):
        ds.train_batch(-1, 4)
    with pytest.raises(InputError, match="0"):
        ds.train_batch(0, 0)
    with pytest.raises(InputError, match="-2"):
        ds.heldout(-2)
    assert ds.sample(rng, []).shape == (0, 3, 16, 16)


# Features for the separability checks: translation-invariant log-magnitude spectra of the
# grey image, normalised for contrast, so position/colour/polarity nuisance drops out.
def _spectrum(g):
    g = g - g.mean(axis=(1, 2), keepdims=True)
    g = g / (g.std(axis=(1, 2), keepdims=True) + 1e-6)
    return np.log1p(np.abs(np.fft.rfft2(g)))


def _unit(f):
    f = f.reshape(len(f), -1)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _full_features(x):
    return _unit(_spectrum(x.mean(1)))


def _coarse_features(x):  # 4x4 average pooling first: only large-scale structure survives
    g = x.mean(1)
    n, h, w = g.shape
    return _unit(_spectrum(g.reshape(n, h // 4, 4, w // 4, 4).mean(axis=(2, 4))))


def _fine_features(x):  # only the upper half of the frequency band
    s = _spectrum(x.mean(1))
    h = s.shape[1]
    return _unit(s[:, h // 4: 3 * h // 4 + 1, h // 4:])


def _ncm_accuracy(feat, x, y, xh, yh, k):
    f, fh = feat(x), feat(xh)
    means = np.stack([f[y == c].mean(0) for c in range(k)])
    pred = np.argmin(((fh[:, None] - means[None]) ** 2).sum(-1), axis=1)
    return float((pred == yh).mean())


def _split(ds):
    parts = [ds.train_batch(k, 250) for k in range(8)]  # 2000 training samples
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    xh, yh = ds.heldout(500)
    return x, y, xh, yh


@pytest.mark.parametrize("size,num_classes", [(16, 10), (32, 10), (16, MAX_CLASSES)])
def test_classes_are_separable(size, num_classes):
    ds = ProceduralDataset(size, num_classes, seed=2)
    x, y, xh, yh = _split(ds)
    acc = _ncm_accuracy(_full_features, x, y, xh, yh, num_classes)
    assert acc > 0.8, acc


@pytest.mark.parametrize("size", [16, 32])
def test_two_scales(size):
    """Shape survives 4x pooling, texture does not; texture lives in the high frequencies."""
    ds = ProceduralDataset(size, MAX_CLASSES, seed=4)
    x, y, xh, yh = _split(ds)
    f, fh = ds.class_factors(y), ds.class_factors(yh)
    n_s, n_t = len(SHAPES), len(TEXTURES)
    shape_coarse = _ncm_accuracy(_coarse_features, x, f[:, 0], xh, fh[:, 0], n_s)
    texture_coarse = _ncm_accuracy(_coarse_features, x, f[:, 1], xh, fh[:, 1], n_t)
    texture_fine = _ncm_accuracy(_fine_features, x, f[:, 1], xh, fh[:, 1], n_t)
    assert shape_coarse > 0.5, shape_coarse  # chance is 1/6
    assert texture_coarse < 0.45, texture_coarse  # chance is 1/4
    assert texture_fine > 0.65, texture_fine


def test_save_class_grid(tmp_path):
    from PIL import Image

    ds = ProceduralDataset(16, 10)
    path = tmp_path / "grid.png"
    save_class_grid(ds, path, per_class=3)
    img = Image.open(path)
    assert img.size == ((3 * 17 + 1) * 4, (10 * 17 + 1) * 4)


# --------------------------------------------------------------------------- folder


def _npz(path, x, y, **extra):
    np.savez(path, x=x, y=y, **extra)


def _st(path, **tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def _pixels(n, c=3, s=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, s, s), dtype=np.uint8)


def test_folder_npz_and_safetensors(tmp_path):
    x1, y1 = _pixels(30, seed=1), np.arange(30) % 5
    x2 = (np.random.default_rng(2).random((20, 3, 8, 8)) * 2 - 1).astype(np.float32)
    y2 = (np.arange(20) % 3).astype(np.int32)
    _npz(tmp_path / "a.npz", x1, y1)
    _st(tmp_path / "b.safetensors", x=x2, y=y2)
    (tmp_path / "notes.txt").write_text("ignored")
    expected = np.concatenate([x1.astype(np.float32) / 127.5 - 1, x2])
    everything = FolderDataset(tmp_path, seed=3)  # no hold-out unless asked
    assert everything.num_heldout == 0 and everything.num_train == 50
    assert everything.heldout(100)[0].shape == (0, 3, 8, 8)
    xa = everything.train_batch(0, 50)[0]
    order = [int(np.flatnonzero((expected == img).all(axis=(1, 2, 3)))[0]) for img in xa]
    assert sorted(order) == list(range(50))  # one epoch visits every example once
    ds = FolderDataset(tmp_path, seed=3, holdout=5)
    assert (ds.image_size, ds.channels, ds.num_classes, ds.seed, len(ds)) == (8, 3, 5, 3, 50)
    assert [p.name for p in ds.files] == ["a.npz", "b.safetensors"]
    assert ds.num_heldout == 5 and ds.num_train == 45
    xh, yh = ds.heldout(100)
    assert xh.shape == (5, 3, 8, 8) and xh.dtype == np.float32 and yh.dtype == np.int64
    # every example comes back exactly once per epoch; uint8 -> [-1, 1], float unchanged
    xt, yt = ds.train_batch(0, 45)
    labels = np.concatenate([y1, y2])
    both = np.concatenate([xt, xh])
    order = [int(np.flatnonzero((expected == img).all(axis=(1, 2, 3)))[0]) for img in both]
    assert sorted(order) == list(range(50))
    np.testing.assert_array_equal(np.concatenate([yt, yh]), labels[order])
    assert xt.min() >= -1 and xt.max() <= 1


def test_folder_latents_pass_through(tmp_path):
    x = np.random.default_rng(0).normal(0, 3, size=(12, 4, 4, 4)).astype(np.float32)
    _st(tmp_path / "lat.safetensors", x=x, y=np.zeros(12, np.int64))
    ds = FolderDataset(tmp_path, num_classes=7, holdout=2)
    assert (ds.channels, ds.image_size, ds.num_classes) == (4, 4, 7)
    xt, _ = ds.train_batch(0, ds.num_train)
    xh, _ = ds.heldout(ds.num_heldout)
    got = np.concatenate([xt, xh])
    np.testing.assert_array_equal(np.sort(got.ravel()), np.sort(x.ravel()))


def test_folder_single_file(tmp_path):
    _npz(tmp_path / "one.npz", _pixels(10), np.arange(10))
    ds = FolderDataset(tmp_path / "one.npz")
    assert len(ds) == 10 and ds.num_classes == 10


def test_folder_stream_deterministic_and_wraps(tmp_path):
    n = 23
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)
    _npz(tmp_path / "s.npz", x, np.arange(n) % 4)
    ds = FolderDataset(tmp_path, seed=1, holdout=2)
    nt = ds.num_train
    held = set(ds.heldout(10)[0][:, 0, 0, 0].astype(int).tolist())
    assert len(held) == ds.num_heldout == 2 and nt == 21
    # walk the stream in batches of 8 (not a divisor of 21): batches cross epoch boundaries
    stream = np.concatenate([ds.train_batch(k, 8)[0][:, 0, 0, 0] for k in range(8)])
    ids = stream.astype(int)
    for e in range(3):
        epoch = ids[e * nt:(e + 1) * nt]
        assert sorted(epoch.tolist()) == sorted(set(range(n)) - held)  # a permutation
    assert not np.array_equal(ids[:nt], ids[nt:2 * nt])  # a fresh order each epoch
    # the same positions, addressed with another batch size, give the same examples
    again = np.concatenate([ds.train_batch(k, 21)[0][:, 0, 0, 0] for k in range(3)])
    np.testing.assert_array_equal(again.astype(int), ids[:63])
    # a batch larger than an epoch spans several epochs
    big = FolderDataset(tmp_path, seed=1, holdout=2).train_batch(0, 64)[0][:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(big[:63], ids[:63])
    # fresh instance, later step first: identical
    x5, y5 = FolderDataset(tmp_path, seed=1, holdout=2).train_batch(5, 8)
    np.testing.assert_array_equal(x5, ds.train_batch(5, 8)[0])
    np.testing.assert_array_equal(y5, ds.train_batch(5, 8)[1])


@settings(max_examples=25, deadline=None)
@given(step=st.integers(0, 10**6), batch=st.integers(1, 50))
def test_folder_batch_matches_stream_positions(tmp_path_factory, step, batch):
    root = tmp_path_factory.mktemp("stream")
    n = 17
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 1, 1), np.float32)
    _npz(root / "s.npz", x, np.zeros(n, np.int64))
    ds = FolderDataset(root, seed=2, holdout=3)
    got = ds.train_batch(step, batch)[0][:, 0, 0, 0].astype(int)
    one = [int(ds.train_batch(step * batch + j, 1)[0][0, 0, 0, 0]) for j in range(batch)]
    assert got.tolist() == one
    assert not set(got.tolist()) & set(ds.heldout(n)[0][:, 0, 0, 0].astype(int).tolist())


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"no shards found in folder .*empty.*\*\.npz"):
        FolderDataset(empty)
    with pytest.raises(InputError, match="does-not-exist"):
        FolderDataset(tmp_path / "does-not-exist")

    def bad(name, match, write):
        d = tmp_path / name
        d.mkdir()
        write(d)
        with pytest.raises(InputError, match=match):
            FolderDataset(d)

    bad("nokey", r"s\.npz.*'y'.*found keys \['images', 'x'\]",
        lambda d: np.savez(d / "s.npz", x=_pixels(4), images=np.zeros(3)))
    bad("nokey_st", r"s\.safetensors.*'x'.*found keys \['y'\]",
        lambda d: _st(d / "s.safetensors", y=np.zeros(4, np.int64)))
    bad("nmismatch", r"N=4 .* 5 labels", lambda d: _npz(d / "s.npz", _pixels(4), np.zeros(5, int)))
    bad("ndim", r"ndim 4.*\(4, 8, 8\)",
        lambda d: _npz(d / "s.npz", _pixels(4)[:, 0], np.zeros(4, int)))
    bad("nonsquare", r"square.*H=8 W=6",
        lambda d: _npz(d / "s.npz", _pixels(4)[..., :6], np.zeros(4, int)))
    bad("neglabel", r"s\.npz.*label -2",
        lambda d: _npz(d / "s.npz", _pixels(4), np.array([0, 1, -2, 3])))
    bad("floatlabel", r"integer.*float64",
        lambda d: _npz(d / "s.npz", _pixels(4), np.zeros(4)))
    bad("dtype", r"uint8 or floating.*int32",
        lambda d: _npz(d / "s.npz", _pixels(4).astype(np.int32), np.zeros(4, int)))
    bad("nan", r"non-finite",
        lambda d: _npz(d / "s.npz", np.full((4, 1, 2, 2), np.nan, np.float32), np.zeros(4, int)))
    _npz(tmp_path / "one.npz", _pixels(1), np.zeros(1, int))
    assert FolderDataset(tmp_path / "one.npz").num_train == 1
    for holdout in (1, -1, 0.5):
        with pytest.raises(InputError, match=rf"holdout must be an int in \[0, 1\) .*{holdout}"):
            FolderDataset(tmp_path / "one.npz", holdout=holdout)
    bad("corrupt", r"s\.npz.*could not read", lambda d: (d / "s.npz").write_bytes(b"junk"))

    def inconsistent(d):
        _npz(d / "a.npz", _pixels(4, s=8), np.zeros(4, int))
        _st(d / "b.safetensors", x=_pixels(4, s=16), y=np.zeros(4, np.int64))

    bad("shapes", r"b\.safetensors.*\[3, 16, 16\].*\[3, 8, 8\].*a\.npz", inconsistent)

    _npz(tmp_path / "labels.npz", _pixels(4), np.array([0, 1, 2, 9]))
    with pytest.raises(InputError, match=r"label 9 .*num_classes=5"):
        FolderDataset(tmp_path / "labels.npz", num_classes=5)
    with pytest.raises(InputError, match="-1"):
        FolderDataset(tmp_path / "labels.npz", seed=-1)


def test_rank_slices_concatenate_to_the_global_batch(tmp_path):
    _npz(tmp_path / "s.npz", _pixels(30), np.arange(30) % 3)
    datasets = [ProceduralDataset(16, 10, seed=1), FolderDataset(tmp_path, seed=1),
                FolderDataset(tmp_path, seed=1, flip=True)]
    for ds in datasets:
        gx, gy = ds.train_batch(4, 12)
        for world in (2, 4):
            parts = [ds.train_batch(4, 12, rank=r, world=world) for r in range(world)]
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), gx)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), gy)
        with pytest.raises(InputError, match="batch_size=12 is not divisible by the world size 5"):
            ds.train_batch(0, 12, rank=0, world=5)
        with pytest.raises(InputError, match="rank=3 world=2"):
            ds.train_batch(0, 12, rank=3, world=2)


def test_folder_flip_mirrors_some_positions(tmp_path):
    x = _pixels(40)
    _npz(tmp_path / "s.npz", x, np.zeros(40, int))
    plain, flipped = FolderDataset(tmp_path, seed=2), FolderDataset(tmp_path, seed=2, flip=True)
    xp, xf = plain.train_batch(1, 40)[0], flipped.train_batch(1, 40)[0]
    mirrored = (xf == xp[..., ::-1]).all(axis=(1, 2, 3)) & ~(xf == xp).all(axis=(1, 2, 3))
    same = (xf == xp).all(axis=(1, 2, 3))
    assert (mirrored | same).all() and 8 < mirrored.sum() < 32
    again = FolderDataset(tmp_path, seed=2, flip=True).train_batch(1, 40)[0]
    np.testing.assert_array_equal(xf, again)


def test_make_dataset(tmp_path):
    ds = make_dataset("procedural", image_size=32, num_classes=12, seed=4)
    assert isinstance(ds, ProceduralDataset)
    assert (ds.image_size, ds.num_classes, ds.seed) == (32, 12, 4)
    assert make_dataset("procedural").image_size == 16
    _npz(tmp_path / "s.npz", _pixels(10), np.arange(10) % 3)
    fd = make_dataset(str(tmp_path), seed=1)
    assert isinstance(fd, FolderDataset) and fd.num_classes == 3 and fd.seed == 1
    assert make_dataset(tmp_path, image_size=8, num_classes=4).num_classes == 4
    with pytest.raises(InputError, match="image_size=16.*8x8"):
        make_dataset(str(tmp_path), image_size=16)
    with pytest.raises(InputError, match="nowhere-to-be-found"):
        make_dataset(str(tmp_path / "nowhere-to-be-found"))
