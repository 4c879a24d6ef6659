"""ShardDataset: the streaming loader of ``dar prepare``'s shards, and its building blocks."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dar_core.errors import InputError
from dar_core.io.data import FolderDataset, ShardDataset, make_dataset
from dar_core.io.data.shards import write_shards
from dar_core.io.data.shuffle import Permutation, coin_flips, keys
from dar_core.io.data.st_format import read_header, write_safetensors


def _ids(n, shape=(2, 3, 3), dtype=np.float16):
    """Example i has value i in row 0 of channel 0 (mirror-symmetric) and a left-to-right
    ramp in row 0 of channel 1."""
    x = np.zeros((n, *shape), dtype)
    x[:, 0, 0, :] = np.arange(n)[:, None]
    x[:, 1, 0, :] = np.arange(shape[2])
    return x


def _write(root, n=53, per_shard=10, classes=("a", "b", "c"), **fields):
    x = _ids(n)
    y = np.arange(n) % len(classes)
    chunks = [(x[i:i + per_shard], y[i:i + per_shard]) for i in range(0, n, per_shard)]
    write_shards(root, chunks, list(classes), **fields)
    return x, y


def _id(x):
    return x[:, 0, 0, 0].astype(int)


def test_shape_labels_and_every_example_once_per_epoch(tmp_path):
    x, y = _write(tmp_path, kind="latents", latent_scale=0.18215, vae={"path": "v"})
    ds = ShardDataset(tmp_path, seed=3)
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (53, 2, 3, 3)
    assert (ds.num_train, ds.num_heldout, ds.kind, ds.latent_scale) == (53, 0, "latents", 0.18215)
    assert ds.vae == {"path": "v"} and ds.class_names == ["a", "b", "c"]
    assert len(ds.files) == 6
    xb, yb = ds.train_batch(0, 53)
    assert xb.dtype == np.float32 and yb.dtype == np.int64 and xb.shape == (53, 2, 3, 3)
    assert sorted(_id(xb).tolist()) == list(range(53))  # a permutation of all examples
    np.testing.assert_array_equal(yb, y[_id(xb)])
    np.testing.assert_array_equal(xb, x[_id(xb)].astype(np.float32))
    assert not np.array_equal(_id(xb), np.arange(53))  # shuffled
    e1 = _id(ds.train_batch(1, 53)[0])
    assert sorted(e1.tolist()) == list(range(53)) and not np.array_equal(e1, _id(xb))
    assert ds.heldout(10)[0].shape == (0, 2, 3, 3)  # no hold-out unless asked


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    _write(tmp_path)
    a = ShardDataset(tmp_path, seed=1)
    walk = np.concatenate([_id(a.train_batch(k, 8)[0]) for k in range(20)])  # crosses epochs
    b = ShardDataset(tmp_path, seed=1)  # a fresh instance, later steps first
    np.testing.assert_array_equal(_id(b.train_batch(13, 8)[0]), walk[104:112])
    again = np.concatenate([_id(b.train_batch(k, 32)[0]) for k in range(5)])
    np.testing.assert_array_equal(again, walk[:160])  # same positions, another batch size
    assert not np.array_equal(_id(ShardDataset(tmp_path, seed=2).train_batch(0, 53)[0]),
                              _id(a.train_batch(0, 53)[0]))


@pytest.mark.parametrize("flip", [False, True])
def test_rank_parts_concatenate_to_the_global_batch(tmp_path, flip):
    _write(tmp_path)
    ds = ShardDataset(tmp_path, seed=5, flip=flip)
    for step in (0, 7):
        gx, gy = ds.train_batch(step, 24)
        for world in (2, 3, 4):
            parts = [ds.train_batch(step, 24, rank=r, world=world) for r in range(world)]
            assert all(p[0].shape[0] == 24 // world for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), gx)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), gy)


def test_a_rank_reads_only_its_rows(tmp_path, monkeypatch):
    _write(tmp_path)
    ds = ShardDataset(tmp_path)
    reads = []
    real = ds._read
    monkeypatch.setattr(ds, "_read", lambda idx, flips: reads.append(idx.size) or real(idx, flips))
    ds.train_batch(3, 16, rank=1, world=4)
    assert reads == [4]


def test_flip_mirrors_half_the_positions_as_a_pure_function(tmp_path):
    _write(tmp_path)
    plain, flipped = ShardDataset(tmp_path, seed=4), ShardDataset(tmp_path, seed=4, flip=True)
    assert flipped.flip_mode == "mirror" and plain.flip_mode is None
    xp, _ = plain.train_batch(2, 200)
    xf, _ = flipped.train_batch(2, 200)
    np.testing.assert_array_equal(_id(xp), _id(xf))  # flips never change the order
    mirrored = (xf[:, 1, 0] == xp[:, 1, 0, ::-1]).all(axis=1)
    same = (xf == xp).all(axis=(1, 2, 3))
    assert (mirrored ^ same).all() and 60 < mirrored.sum() < 140
    np.testing.assert_array_equal(xf[mirrored], xp[mirrored][..., ::-1])
    again = ShardDataset(tmp_path, seed=4, flip=True).train_batch(2, 200)[0]
    np.testing.assert_array_equal(xf, again)
    np.testing.assert_array_equal(coin_flips(flipped._flip_key, 400 + np.arange(200)), mirrored)


def test_stored_flips_are_used_when_the_shards_have_them(tmp_path):
    x = _ids(12)
    xf = x + np.float16(1000)  # stands for the encoding of the mirrored image
    write_safetensors(tmp_path / "s.safetensors",
                      {"x": x, "x_flip": xf, "y": np.zeros(12, np.int64)}, {})
    m = {"format": "dar-shards", "version": 1, "count": 12, "shape": [2, 3, 3],
         "dtype": "float16", "classes": ["only"], "flip_stored": True,
         "shards": [{"file": "s.safetensors", "count": 12}]}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    ds = ShardDataset(tmp_path, flip=True)
    assert ds.flip_mode == "stored"
    ids = _id(ds.train_batch(0, 60)[0])
    assert (ids >= 1000).sum() > 15 and (ids < 1000).sum() > 15
    assert set((ids % 1000).tolist()) == set(range(12))


def test_holdout_is_fixed_disjoint_and_opt_in(tmp_path):
    _write(tmp_path)
    ds = ShardDataset(tmp_path, seed=2, holdout=7)
    assert (ds.num_train, ds.num_heldout) == (46, 7)
    held = _id(ds.heldout(100)[0])
    assert len(set(held.tolist())) == 7
    np.testing.assert_array_equal(_id(ds.heldout(3)[0]), held[:3])
    stream = np.concatenate([_id(ds.train_batch(k, 23)[0]) for k in range(4)])
    assert not set(stream.tolist()) & set(held.tolist())
    assert sorted(stream[:46].tolist()) == sorted(set(range(53)) - set(held.tolist()))
    np.testing.assert_array_equal(_id(ShardDataset(tmp_path, seed=2, holdout=7).heldout(7)[0]),
                                  held)
    assert set(_id(ShardDataset(tmp_path, seed=3, holdout=7).heldout(7)[0])) != set(held)
    for bad in (-1, 53, 1.5):
        with pytest.raises(InputError, match=rf"holdout must be an int in \[0, 53\).*{bad}"):
            ShardDataset(tmp_path, holdout=bad)


def test_examples_reads_manifest_order(tmp_path):
    x, y = _write(tmp_path)
    ds = ShardDataset(tmp_path)
    got, labels = ds.examples(np.array([52, 0, 9, 10, 31]))
    np.testing.assert_array_equal(_id(got), [52, 0, 9, 10, 31])
    np.testing.assert_array_equal(labels, y[[52, 0, 9, 10, 31]])
    with pytest.raises(InputError, match="example index 53 is out of range"):
        ds.examples(np.array([53]))


def test_uint8_pixels_map_to_minus_one_one(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(9, 3, 4, 4), dtype=np.uint8)
    write_shards(tmp_path, [(x, np.arange(9) % 2)], ["p", "q"])
    ds = ShardDataset(tmp_path)
    got, _ = ds.examples(np.arange(9))
    np.testing.assert_allclose(got, x / 127.5 - 1, atol=1e-6)
    assert ds.kind == "pixels" and ds.latent_scale is None and ds.vae is None


def _rss_kb():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_memory_does_not_grow_with_what_is_read(tmp_path):
    n, per = 24000, 4000  # 24000 x 4x16x16 float16 = 49 MB on disk
    for k in range(n // per):
        x = np.full((per, 4, 16, 16), k, np.float16)
        write_safetensors(tmp_path / f"s{k}.safetensors",
                          {"x": x, "y": np.zeros(per, np.int64)}, {})
    m = {"format": "dar-shards", "version": 1, "count": n, "shape": [4, 16, 16],
         "dtype": "float16", "classes": ["c"],
         "shards": [{"file": f"s{k}.safetensors", "count": per} for k in range(n // per)]}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    ds = ShardDataset(tmp_path)
    ds.train_batch(0, 256)
    before = _rss_kb()
    seen = 0
    for step in range(1, 1 + n // 256):  # one whole epoch
        seen += float(ds.train_batch(step, 256)[0][:, 0, 0, 0].sum())
    grown_mb = (_rss_kb() - before) / 1024
    assert seen > 0 and grown_mb < 8, f"RSS grew by {grown_mb:.1f} MB reading a 49 MB dataset"


def test_make_dataset_dispatches_on_the_manifest(tmp_path):
    _write(tmp_path / "sh", kind="latents")
    ds = make_dataset(str(tmp_path / "sh"), image_size=3, num_classes=3, seed=1, holdout=2,
                      flip=True)
    assert isinstance(ds, ShardDataset) and (ds.seed, ds.num_heldout, ds.flip) == (1, 2, True)
    assert isinstance(make_dataset(tmp_path / "sh" / "manifest.json"), ShardDataset)
    with pytest.raises(InputError, match=r"image_size=32 .* 3x3 images \(latents\)"):
        make_dataset(str(tmp_path / "sh"), image_size=32)
    with pytest.raises(InputError, match="procedural dataset has a fixed held-out split"):
        make_dataset("procedural", holdout=5)
    np.savez(tmp_path / "old.npz", x=_ids(6), y=np.arange(6) % 2)
    assert isinstance(make_dataset(tmp_path / "old.npz"), FolderDataset)


def test_errors_name_the_file_and_value(tmp_path):
    def folder(name, manifest=None, **kw):
        d = tmp_path / name
        _write(d, n=20, per_shard=10, **kw)
        if manifest is not None:
            m = json.loads((d / "manifest.json").read_text())
            manifest(m)
            (d / "manifest.json").write_text(json.dumps(m))
        return d

    def bad(d, match, **kw):
        with pytest.raises(InputError, match=match) as e:
            ShardDataset(d, **kw)
        assert "\n" not in str(e.value)

    bad(tmp_path / "nothing", r"nothing' does not exist")
    (tmp_path / "empty").mkdir()
    bad(tmp_path / "empty", r"empty/manifest\.json: not a readable shard manifest")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{")
    bad(tmp_path / "junk", r"junk.*manifest\.json: not a readable shard manifest")
    bad(folder("fmt", lambda m: m.update(format="other")), r"not a 'dar-shards' manifest.*'other'")
    bad(folder("ver", lambda m: m.update(version=9)), r"version 9 is not supported")
    bad(folder("nokey", lambda m: m.pop("classes")), r"no 'classes' field")
    bad(folder("shape", lambda m: m.update(shape=[2, 3, 4])), r"square.*\[2, 3, 4\]")
    bad(folder("dtype", lambda m: m.update(dtype="int32")), r"dtype must be one of.*'int32'")
    bad(folder("count", lambda m: m.update(count=21)), r"shards hold 20 examples but count is 21")
    bad(folder("wrongdt", lambda m: m.update(dtype="uint8")),
        r"shard-00000\.safetensors: x is float16 \[10, 2, 3, 3\], the manifest says uint8")
    d = folder("missing")
    (d / "shard-00001.safetensors").unlink()
    bad(d, r"shard .*shard-00001\.safetensors.* is missing")
    d = folder("trunc")
    p = d / "shard-00001.safetensors"
    p.write_bytes(p.read_bytes()[:-7])
    bad(d, r"shard-00001\.safetensors: tensor 'y' .*\(truncated\?\)")
    d = folder("labels")
    bad(d, r"shard-00000\.safetensors: label 2 is out of range for num_classes=2", num_classes=2)
    bad(d, "seed must be a non-negative int, got -1", seed=-1)
    bad(d, "flip must be a bool, got 1", flip=1)
    ds = ShardDataset(d)
    for kw, match in (({"rank": 2, "world": 2}, "rank=2 world=2"),
                      ({"rank": 0, "world": 3}, "batch_size=8 is not divisible by the world "
                                                "size 3")):
        with pytest.raises(InputError, match=match):
            ds.train_batch(0, 8, **kw)
    with pytest.raises(InputError, match="step must be a non-negative int"):
        ds.train_batch(-1, 8)


def test_safetensors_files_round_trip_with_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    x = _ids(5)
    write_safetensors(tmp_path / "ours.safetensors", {"x": x, "y": np.arange(5)}, {"k": "v"})
    with safe_open(str(tmp_path / "ours.safetensors"), "np") as f:
        np.testing.assert_array_equal(f.get_tensor("x"), x)
        np.testing.assert_array_equal(f.get_tensor("y"), np.arange(5))
        assert f.metadata() == {"k": "v"}
    save_file({"y": np.arange(3, dtype=np.int32), "x": x}, str(tmp_path / "lib.safetensors"),
              metadata={"a": "b"})
    h = read_header(tmp_path / "lib.safetensors")
    assert h.metadata == {"a": "b"} and h.tensors["x"].shape == (5, 2, 3, 3)
    raw = (tmp_path / "lib.safetensors").read_bytes()
    t = h.tensors["x"]
    np.testing.assert_array_equal(
        np.frombuffer(raw[t.offset:t.offset + t.nbytes], np.float16).reshape(5, 2, 3, 3), x)
    assert not list(tmp_path.glob("*.tmp"))


@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32))
def test_permutation_is_a_bijection(n, seed):
    p = Permutation(n, keys([seed, 0, 0]))
    out = p(np.arange(n))
    assert out.dtype == np.int64 and np.array_equal(np.sort(out), np.arange(n))
    np.testing.assert_array_equal(p(np.arange(n)[::-1]), out[::-1])


def test_coin_flips_are_fair_and_keyed():
    pos = np.arange(20000)
    a, b = coin_flips(keys([0, 2], 1)[0], pos), coin_flips(keys([1, 2], 1)[0], pos)
    assert 0.48 < a.mean() < 0.52 and 0.4 < (a == b).mean() < 0.6
    assert 0.45 < (a[1:] == a[:-1]).mean() < 0.55  # neighbouring positions independent
