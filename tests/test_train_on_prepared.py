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


def test_torchrun_on_shards_with_accumulation_matches_one_process(shards, tmp_path):
    """Two DDP ranks, each reading only its rows of the shards and accumulating 2 micro-batches
    (DDP all-reduces only the last), train the same model as one process with one batch."""
    import os
    import subprocess
    import sys

    from dar_core.spec.schema import init_params
    from dar_core.testing import assert_close

    common = ["train", "--backend", "torch", "--model", "micro", "--data", str(shards),
              "--image-size", str(LATENT), "--num-classes", "3", "--batch-size", "8",
              "--steps", "3", "--ckpt-every", "3", "--sample-every", "100", "--lr", "1e-3",
              "--flip", "--no-progress", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "dar_core.cli", *common, "--out",
                    str(tmp_path / "one")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "dar_core.cli", *common, "--grad-accum", "2",
                    "--out", str(tmp_path / "two")], check=True, env=env, timeout=300)
    one, two = (load_checkpoint(tmp_path / d / "checkpoints" / "ckpt-0000003.safetensors")
                for d in ("one", "two"))
    assert two.meta["world"] == 2 and two.meta["train"]["grad_accum"] == 2
    init = init_params(one.config, 0)
    for k in one.params:
        # AdamW moves a weight by ~lr per step whatever its gradient's size, so compare the
        # change since init (tests/test_mlx_distributed.py's bound): the all-reduce and the
        # micro-batches sum the gradient in another order than one process
        assert_close(two.params[k] - init[k], one.params[k] - init[k], 2e-3, k)


def test_bulk_npz_of_a_latent_model_is_decoded_with_or_without_its_data(shards, tmp_path,
                                                                         capsys):
    """``dar sample --num-samples --npz`` decodes a latent model's samples with the data's VAE;
    on a machine without the data folder, ``--vae`` decodes them the same way (the scale from
    the VAE's own config, as ``dar prepare`` stored it), and leaving it out is named."""
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    vae = json.loads((shards / "manifest.json").read_text())["vae"]["path"]
    run = tmp_path / "run"
    assert main(["train", "--backend", "torch", "--model", "micro", "--data", str(data),
                 "--image-size", str(LATENT), "--num-classes", "3", "--batch-size", "4",
                 "--steps", "2", "--ckpt-every", "2", "--sample-every", "100",
                 "--no-progress", "--no-tensorboard", "--out", str(run)]) == 0
    ck = str(run / "checkpoints" / "ckpt-0000002.safetensors")
    bulk = ["sample", "--backend", "torch", "--checkpoint", ck, "--num-samples", "5",
            "--batch-size", "2", "--steps", "2", "--sampler", "euler"]
    assert main([*bulk, "--npz", str(tmp_path / "here.npz")]) == 0
    with np.load(tmp_path / "here.npz") as z:
        here = z["arr_0"]
        settings = json.loads(str(z["settings"][0]))
    assert here.dtype == np.uint8 and here.shape == (5, SIZE, SIZE, 3) and here.std() > 0
    assert settings["vae"]["path"] == vae
    shutil.rmtree(data)  # the sampling machine has the checkpoint and the VAE, not the data
    capsys.readouterr()
    assert main([*bulk, "--npz", str(tmp_path / "x.npz")]) == 2
    assert "--vae" in capsys.readouterr().err
    assert main([*bulk, "--vae", vae, "--npz", str(tmp_path / "away.npz")]) == 0
    assert "is not on this machine" in capsys.readouterr().err
    with np.load(tmp_path / "away.npz") as z:
        assert np.array_equal(z["arr_0"], here)
