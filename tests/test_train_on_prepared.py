"""The README's "Train on your own images" path end to end, in every backend: an ImageFolder of
real photographs -> ``dar prepare`` with a VAE -> ``dar train --data SHARDS`` with warm-up,
gradient accumulation, flips and TensorBoard -> sample grids and ``dar sample`` decoded by the
data's VAE to RGB images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from photos import make_image_tree, save_tiny_vae
from PIL import Image

from dar_core.backend import BACKENDS, is_installed
from dar_core.cli import main
from dar_core.io.checkpoint import load_checkpoint

pytest.importorskip("torch")
pytest.importorskip("diffusers")

SIZE, LATENT = 16, 8  # pixels; the tiny VAE downsamples by 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    images = make_image_tree(tmp_path_factory.mktemp("images"), tiles=24, odd_files=False)
    vae = save_tiny_vae(tmp_path_factory.mktemp("vae"), SIZE)
    out = tmp_path_factory.mktemp("shards")
    assert main(["prepare", "--images", str(images), "--out", str(out), "--image-size",
                 str(SIZE), "--vae", str(vae), "--flip", "--device", "cpu", "--min-size", "8",
                 "--shard-size", "8", "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_on_prepared_latents_and_look_at_decoded_samples(backend, shards, tmp_path):
    if not is_installed(backend):
        pytest.skip(f"{backend} is not installed")
    run = tmp_path / "run"
    assert main(["train", "--backend", backend, "--model", "micro", "--data", str(shards),
                 "--image-size", str(LATENT), "--num-classes", "3", "--batch-size", "4",
                 "--steps", "4", "--warmup-steps", "2", "--grad-accum", "2", "--flip",
                 "--ckpt-every", "4", "--sample-every", "4", "--sample-steps", "2",
                 "--per-class", "2", "--log-every", "1", "--no-progress", "--out", str(run)]) == 0
    ck = load_checkpoint(run / "checkpoints" / "ckpt-0000004.safetensors")
    assert ck.config.in_channels == 4 and ck.config.input_size == LATENT
    assert ck.meta["train"]["grad_accum"] == 2 and ck.meta["train"]["data"] == str(shards)
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["lr"] == pytest.approx(ck.meta["train"]["lr"] / 2, rel=1e-6)  # warm-up
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the grid shows decoded RGB images: 3 classes x 2, each SIZE pixels, not latents
    grid = np.asarray(Image.open(run / "samples" / "step-0000004.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[0] >= 3 * SIZE and grid.shape[1] >= 2 * SIZE
    png = tmp_path / "s.png"
    assert main(["sample", "--backend", backend, "--checkpoint", str(run / "checkpoints" /
                 "ckpt-0000004.safetensors"), "--steps", "2", "--per-class", "1",
                 "--out", str(png), "--save-npz", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["x"].shape == (3, 3, SIZE, SIZE) and np.isfinite(z["x"]).all()
        assert z["x"].min() >= -1 and z["x"].max() <= 1


def test_a_missing_vae_is_named(shards, tmp_path, capsys):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    assert main(["train", "--model", "micro", "--data", str(shards), "--image-size",
                 str(LATENT), "--num-classes", "3", "--batch-size", "4", "--steps", "1",
                 "--sample-every", "100", "--no-progress", "--out", str(run)]) == 0
    ck = str(run / "checkpoints" / "ckpt-0000001.safetensors")
    assert main(["sample", "--checkpoint", ck, "--steps", "1", "--per-class", "1",
                 "--vae", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.png")]) == 2
    assert "--vae " in capsys.readouterr().err
    assert main(["sample", "--checkpoint", ck, "--steps", "1", "--per-class", "1",
                 "--no-decode", "--out", str(tmp_path / "raw.png")]) == 0
