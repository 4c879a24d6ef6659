"""``dar prepare``: an ImageFolder of real photographs -> shards of pixels or VAE latents.

The photographs are tiles of matplotlib's sample image ``grace_hopper.jpg`` (matplotlib is
a dependency of the tools extra), saved as JPEG, PNG and WebP of many sizes, plus a
grayscale, a CMYK and an RGBA image, an unreadable file, a too-small image and files that
are not images. The VAE is a randomly initialised diffusers ``AutoencoderKL`` with tiny
blocks, saved with ``save_pretrained`` (no download).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from photos import make_image_tree, save_tiny_vae
from photos import photo as sample_photo
from PIL import Image

from dar_core.cli import main
from dar_core.io.data import ShardDataset, make_dataset
from dar_core.io.data import prepare as prep
from dar_core.io.data.transforms import center_crop_arr

SIZE = 16
COMMON = ["--image-size", str(SIZE), "--min-size", "8", "--shard-size", "8", "--batch-size",
          "3", "--workers", "2", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("images"))


def _run(*args: str) -> int:
    return main(["prepare", *args])


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def pixels(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pixels")
    assert _run("--images", str(tree), "--out", str(out), *COMMON) == 0
    return out


def test_center_crop_is_adms_recipe():
    photo = Image.fromarray(sample_photo())  # 512 x 600 (w x h)
    got = center_crop_arr(photo, 60)
    # the recipe, step by step: halve with BOX while the short side >= 120, BICUBIC to a
    # short side of 60 (70.3 -> 70 rows), then the middle rows
    ref = photo.resize((256, 300), Image.BOX).resize((128, 150), Image.BOX)
    ref = ref.resize((64, 75), Image.BOX)
    ref = np.asarray(ref.resize((60, 70), Image.BICUBIC))[5:65]
    assert got.shape == (60, 60, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    wide = Image.fromarray(np.tile(np.arange(90, dtype=np.uint8)[None, :, None], (30, 1, 3)))
    out = center_crop_arr(wide, 30)  # no resize: the middle 30 columns of a ramp
    np.testing.assert_array_equal(out[0, :, 0], np.arange(30, 60))


def test_pixels_manifest_counts_and_messages(tree, pixels, tmp_path, capsys):
    out = tmp_path / "again"
    assert _run("--images", str(tree), "--out", str(out), *COMMON) == 0
    captured = capsys.readouterr()
    assert "warning: skipping cat/broken.jpg: unreadable" in captured.err
    assert "warning: skipping dog/tiny.png: too small (7x5 px" in captured.err
    line = captured.out.strip()
    assert line.startswith("33 examples of 3 classes, pixels uint8 [3, 16, 16], in 5 shard(s)")
    assert "converted to RGB: 3 (1 CMYK, 1 L, 1 RGBA)" in line
    assert "skipped 1 unreadable (cat/broken.jpg)" in line and "skipped 1 too small" in line
    m = json.loads((pixels / "manifest.json").read_text())
    assert (m["format"], m["version"], m["kind"], m["dtype"]) == ("dar-shards", 1, "pixels",
                                                                   "uint8")
    assert (m["count"], m["shape"], m["num_classes"]) == (33, [3, 16, 16], 3)
    assert m["classes"] == ["cat", "dog", "eel"]
    assert m["label_map"] == {"cat": 0, "dog": 1, "eel": 2}
    assert m["source"]["files"] == 35 and len(m["source"]["sha256"]) == 64
    assert m["converted_to_rgb"] == {"count": 3, "by_mode": {"CMYK": 1, "L": 1, "RGBA": 1}}
    assert m["skipped"]["unreadable"] == {"count": 1, "first": ["cat/broken.jpg"]}
    assert m["skipped"]["too_small"] == {"count": 1, "first": ["dog/tiny.png"]}
    assert set(m["ignored"]["first"]) == {".cache", "README.txt", "eel/notes.txt"}
    # 8 files a shard; cat/broken.jpg is file 0, dog/tiny.png file 18 (cat has 12 files)
    assert [s["count"] for s in m["shards"]] == [7, 8, 7, 8, 3]
    assert [s["files"] for s in m["shards"]] == [8, 8, 8, 8, 3]
    assert m["latent_scale"] is None and m["vae"] is None
    assert _shards(out) == _shards(pixels)  # deterministic
    assert not list(pixels.glob(".*.tmp"))


def test_pixels_are_the_center_crops_with_folder_labels(tree, pixels):
    files = prep.list_source(tree).files
    ds = ShardDataset(pixels)
    x, y = ds.examples(np.arange(len(ds)))
    usable = [(rel, lab) for rel, lab in files if rel not in ("cat/broken.jpg", "dog/tiny.png")]
    assert len(usable) == len(ds) == 33
    np.testing.assert_array_equal(y, [lab for _, lab in usable])
    for i in (0, 5, 17, 31):
        rel = usable[i][0]
        want = center_crop_arr(Image.open(tree / rel).convert("RGB"), SIZE).transpose(2, 0, 1)
        np.testing.assert_allclose(x[i], want / 127.5 - 1, atol=1e-6, err_msg=rel)
    assert rel.startswith("eel/")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), SIZE)


@pytest.fixture(scope="module")
def latents(tree, vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    assert _run("--images", str(tree), "--out", str(out), "--vae", str(vae_dir), "--flip",
                "--device", "cpu", *COMMON) == 0
    return out


def test_latents_are_the_scaled_posterior_mean(pixels, vae_dir, latents):
    import torch
    from diffusers import AutoencoderKL

    m = json.loads((latents / "manifest.json").read_text())
    assert (m["kind"], m["dtype"], m["shape"], m["count"]) == ("latents", "float16",
                                                               [4, 8, 8], 33)
    assert m["latent_scale"] == 0.18215 and m["latent_shift"] is None and m["flip_stored"]
    assert m["vae"]["path"] == str(vae_dir.resolve()) and m["vae"]["posterior"] == "mean"
    assert len(m["vae"]["config_sha256"]) == 64 and len(m["vae"]["weights_sha256"]) == 64
    ds = make_dataset(str(latents), flip=True)
    assert (ds.latent_scale, ds.vae["path"], ds.flip_mode) == (0.18215, m["vae"]["path"],
                                                               "stored")
    px = ShardDataset(pixels).examples(np.arange(4))[0]  # the same 4 images as pixels
    vae = AutoencoderKL.from_pretrained(vae_dir)
    img = torch.from_numpy(px)
    with torch.no_grad():
        mean = vae.encode(img).latent_dist.mean * 0.18215
        mirrored = vae.encode(img.flip(-1)).latent_dist.mean * 0.18215
    x, _ = ds.examples(np.arange(4))
    np.testing.assert_allclose(x, mean.half().float().numpy(), rtol=0, atol=2e-4)
    from safetensors import safe_open

    with safe_open(str(latents / "shard-00000.safetensors"), "np") as f:
        np.testing.assert_allclose(f.get_tensor("x_flip")[:4].astype(np.float32),
                                   mirrored.numpy(), rtol=0, atol=2e-4)


def test_resume_after_a_failure_gives_identical_shards(tree, vae_dir, latents, tmp_path,
                                                       monkeypatch):
    out = tmp_path / "resumed"
    real = prep._make_shard

    def failing(k, *args):
        if k == 2:
            raise OSError(28, "No space left on device", str(out / "shard-00002.safetensors"))
        return real(k, *args)

    monkeypatch.setattr(prep, "_make_shard", failing)
    args = ["--images", str(tree), "--out", str(out), "--vae", str(vae_dir), "--flip",
            "--device", "cpu", *COMMON]
    assert _run(*args) == 2
    assert sorted(_shards(out)) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (out / "manifest.json").exists()
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(prep, "_make_shard", real)
    made = []
    monkeypatch.setattr(prep, "_make_shard", lambda k, *a: made.append(k) or real(k, *a))
    assert _run(*args) == 0
    assert made == [2, 3, 4]  # continued at the next unfinished shard
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert _shards(out) == _shards(latents)
    assert (out / "manifest.json").read_bytes() != b""
    m, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, latents))
    assert m == ref
    made.clear()
    assert _run(*args) == 0 and made == []  # a finished preparation is left as it is


KILLER = textwrap.dedent("""
    import os, signal, sys
    import dar_core.io.data.prepare as prep
    real, calls = prep.write_safetensors, []

    def write_then_die(path, tensors, meta):
        calls.append(path)
        if len(calls) == 2:  # killed in the middle of the second shard's write
            (path.parent / f".{path.name}.killed.tmp").write_bytes(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, tensors, meta)

    prep.write_safetensors = write_then_die
    from dar_core.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def test_a_killed_process_resumes_at_the_next_shard(tree, pixels, tmp_path):
    out = tmp_path / "killed"
    cmd = ["prepare", "--images", str(tree), "--out", str(out), *COMMON]
    p = subprocess.run([sys.executable, "-c", KILLER, *cmd], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert sorted(_shards(out)) == ["shard-00000.safetensors"]
    assert list(out.glob(".shard-00001.safetensors.*.tmp")) and not (out / "manifest.json").exists()
    assert _run(*cmd[1:]) == 0
    assert _shards(out) == _shards(pixels) and not list(out.glob(".*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["count"] == 33


def test_two_processes_split_the_shards(tree, pixels, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "dar_core.cli", "prepare", "--images", str(tree), "--out",
           str(out), *COMMON]
    procs = [subprocess.Popen(cmd, env=_env(RANK=str(r), WORLD_SIZE="2"), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert _shards(out) == _shards(pixels)
    m, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, pixels))
    assert m == ref
    outs = [o for o, _ in results]
    assert any(o.startswith("33 examples of 3 classes") for o in outs)
    for r, (o, e) in enumerate(results):  # rank 0 makes shards 0, 2, 4; rank 1 1 and 3
        assert ("cat/broken.jpg" in e) == ("dog/tiny.png" in e) == (r == 0)
        assert o.startswith(("33 examples", f"rank {r}: wrote {3 - r} shard(s)"))


def _fails(capsys, *args: str) -> str:
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dar prepare: error: "), err
    return err[0]


def test_bad_inputs_are_one_line_errors(tree, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o")
    assert "'/nonexistent/images' is not a folder" in _fails(
        capsys, "--images", "/nonexistent/images", "--out", out)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    assert "has no class subfolders" in _fails(capsys, "--images", str(tmp_path / "flat"),
                                               "--out", out)
    (tmp_path / "flat" / "empty").mkdir()
    assert "empty' holds no image files" in _fails(capsys, "--images", str(tmp_path / "flat"),
                                                   "--out", out)
    assert "--flip stores the VAE encoding" in _fails(capsys, "--images", str(tree), "--out",
                                                      out, "--flip")
    assert "--shard-size must be a positive integer, got 0" in _fails(
        capsys, "--images", str(tree), "--out", out, "--shard-size", "0")
    (tmp_path / "file").write_text("")
    assert "is a file, expected a folder" in _fails(capsys, "--images", str(tree), "--out",
                                                    str(tmp_path / "file"))
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "RANK=5 must be in [0, WORLD_SIZE=2)" in _fails(capsys, "--images", str(tree),
                                                           "--out", out)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # another preparation in --out: refused unless --overwrite
    assert _run("--images", str(tree), "--out", out, *COMMON) == 0
    capsys.readouterr()
    msg = _fails(capsys, "--images", str(tree), "--out", out, *COMMON, "--image-size", "8")
    assert "manifest.json describes another preparation" in msg and "--overwrite" in msg
    (Path(out) / "manifest.json").unlink()
    msg = _fails(capsys, "--images", str(tree), "--out", out, *COMMON, "--image-size", "8")
    assert "shard-00000.safetensors was written by another preparation" in msg
    assert _run("--images", str(tree), "--out", out, *COMMON, "--image-size", "8",
                "--shard-size", "16", "--overwrite") == 0
    assert sorted(_shards(Path(out))) == [f"shard-0000{k}.safetensors" for k in range(3)]
    assert ShardDataset(out).image_size == 8


def test_bad_vae_inputs(tree, vae_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "--vae './no-such-vae': no such folder" in _fails(
        capsys, "--images", str(tree), "--out", out, "--vae", "./no-such-vae")
    (tmp_path / "novae").mkdir()
    assert "no config.json in it" in _fails(capsys, "--images", str(tree), "--out", out,
                                            "--vae", str(tmp_path / "novae"))
    assert "--image-size 15 is not divisible by the VAE's downsampling factor 2" in _fails(
        capsys, "--images", str(tree), "--out", out, "--vae", str(vae_dir), "--image-size",
        "15")
