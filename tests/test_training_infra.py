"""The backend-neutral training pieces: stream, run folder, grids, CLI."""

import json

import numpy as np
import pytest

from dar_core.cli import build_parser
from dar_core.errors import ConfigError, NonFiniteLossError
from dar_core.io.images import make_grid, save_image_grid
from dar_core.spec.interpolant import interpolate, sample_time, velocity_target
from dar_core.train.run import Run, TrainConfig


def test_stream_is_a_function_of_seed_and_step():
    tc = TrainConfig(batch_size=8, class_dropout=0.5)
    run = Run(tc.replace(out="/nonexistent/never-written"), "test", rank=1, world=2)
    a, b = run.stream.batch(3), run.stream.batch(3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(run.stream.batch(4)["noise"], a["noise"])
    assert (a["y"] == 10).any()  # label dropout to the null class happens
    assert a["x"].dtype == np.float32 and a["y"].dtype == np.int64


def test_rank_slices_tile_the_global_batch(tmp_path):
    run = Run(TrainConfig(batch_size=8, out=str(tmp_path)), "test")
    full = run.stream.batch(5)
    parts = [run.stream.batch(5, r, 4) for r in range(4)]
    for k in full:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    with pytest.raises(ConfigError, match="batch_size=8.*3"):
        run.stream.batch(0, 0, 3)


def test_interpolant_endpoints():
    x, n = np.ones((2, 3)), np.zeros((2, 3))
    np.testing.assert_array_equal(interpolate(x, n, np.array([0.0, 1.0])), [[0] * 3, [1] * 3])
    np.testing.assert_array_equal(velocity_target(x, n), x)
    t = sample_time(np.random.default_rng(0), 10_000, "logit_normal")
    assert 0 < t.min() and t.max() < 1 and abs(np.median(t) - 0.5) < 0.02
    with pytest.raises(ConfigError, match="'beta'"):
        sample_time(np.random.default_rng(0), 3, "beta")


def test_run_logs_and_stops_on_nan(tmp_path):
    run = Run(TrainConfig(out=str(tmp_path), log_every=1, progress=False), "test")
    run.log(0, 0.5, 1.0)
    run.log(1, 0.4, 1.0)
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    with pytest.raises(NonFiniteLossError, match="step 2"):
        run.log(2, float("nan"), 1.0)
    run.finish()
    assert (tmp_path / "training.png").stat().st_size > 1000


def test_grid_layout_and_png(tmp_path):
    imgs = np.stack([np.full((3, 4, 4), v) for v in np.linspace(-1, 1, 6)])
    g = make_grid(imgs, nrow=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and g.dtype == np.uint8
    assert g[1, 1, 0] == 0 and g[6, 11, 0] == 255
    save_image_grid(imgs, tmp_path / "g.png", nrow=3)
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 16 * 3


def test_cli_train_flags_mirror_train_config():
    import dataclasses

    from dar_core.train.run import TrainConfig

    defaults = build_parser().parse_args(["train"])
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    missing = [f for f in fields if not hasattr(defaults, f)]
    assert not missing, f"TrainConfig fields without a dar train flag: {missing}"
    # every flag's default is the dataclass default: train and sample agree with the config
    assert TrainConfig(**{f: getattr(defaults, f) for f in fields}) == TrainConfig()
    args = build_parser().parse_args(["train", "--backend", "jax", "--lr", "3e-4",
                                      "--no-final-aggregator", "--chunk-size", "8"])
    assert args.backend == "jax" and args.lr == 3e-4
    assert args.final_aggregator is False and args.chunk_size == 8


def test_rank_and_world_from_launchers(tmp_path, monkeypatch):
    from dar_core.train.run import env_rank_world

    for k in ("RANK", "WORLD_SIZE", "MLX_RANK", "MLX_HOSTFILE"):
        monkeypatch.delenv(k, raising=False)
    assert env_rank_world() == (0, 1)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]))
    monkeypatch.setenv("MLX_RANK", "2")
    monkeypatch.setenv("MLX_HOSTFILE", str(hosts))
    assert env_rank_world() == (2, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert env_rank_world() == (1, 4)
