"""The backend-neutral side of sharded runs: the flags, the mesh shape, the manifest that
makes a sharded checkpoint folder complete, and the refusals."""

import json

import pytest

from dar_core.errors import CheckpointError, ConfigError
from dar_core.io.sharded import (
    MANIFEST,
    consolidate,
    finalize,
    flat_keys,
    mesh_shape,
    read_manifest,
)
from dar_core.spec.schema import param_shapes, trainable_names
from dar_core.train.run import TrainConfig


@pytest.mark.parametrize("bad, match", [(dict(shard="zero3"), "'zero3'"),
                                        (dict(fsdp_size=-1), "-1"),
                                        (dict(fsdp_size=True), "True")])
def test_bad_shard_flags_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_mesh_shape_splits_devices_into_replicas_of_shard_groups():
    assert mesh_shape(8, 0) == (1, 8)
    assert mesh_shape(8, 2) == (4, 2)
    assert mesh_shape(8, 8) == (1, 8)
    with pytest.raises(ConfigError, match="fsdp_size=3 does not divide the 8 devices"):
        mesh_shape(8, 3)
    with pytest.raises(ConfigError, match="fsdp_size=16"):
        mesh_shape(8, 16)


def test_flat_keys_are_the_portable_sections():
    cfg = TrainConfig(model="micro").model_config()
    trained = trainable_names(cfg)
    keys = flat_keys(cfg, trained)
    shapes = param_shapes(cfg)
    assert {k for k in keys if k.startswith("params/")} == {f"params/{n}" for n in shapes}
    assert {k for k in keys if k.startswith("opt/m/")} == {f"opt/m/{n}" for n in trained}
    assert keys["opt/step"] == () and keys["ema/pos_embed"] == tuple(shapes["pos_embed"])


def test_a_folder_is_a_checkpoint_only_once_its_manifest_is_written(tmp_path):
    cfg = TrainConfig(model="micro").model_config()
    tmp = tmp_path / ".ckpt-0000003.sharded.tmp"
    (tmp / "state").mkdir(parents=True)
    final = tmp_path / "ckpt-0000003.sharded"
    with pytest.raises(CheckpointError, match="no dar.json"):
        read_manifest(tmp)
    finalize(tmp, final, cfg, "torch-dcp", ["a"], {"step": 3})
    assert not tmp.exists() and (final / "state").is_dir()
    sc = read_manifest(final)
    assert sc.config == cfg and sc.meta == {"step": 3} and sc.engine == "torch-dcp"
    d = json.loads((final / MANIFEST).read_text())
    (final / MANIFEST).write_text(json.dumps({**d, "engine": "npz"}))
    with pytest.raises(CheckpointError, match="unknown engine 'npz'"):
        read_manifest(final)
    (final / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_manifest(final)


def test_consolidate_names_a_path_without_a_sharded_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no sharded checkpoint at"):
        consolidate(tmp_path)


def test_mlx_refuses_sharding_and_says_what_to_do_instead(tmp_path):
    pytest.importorskip("mlx.core")
    from dar_core.backends.mlx import train

    with pytest.raises(ConfigError, match="data parallel only.*--grad-accum"):
        train(TrainConfig(model="micro", shard="params", out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_an_asynchronous_save_is_completed_at_the_next_save_and_at_the_end(tmp_path):
    from dar_core.errors import NonFiniteLossError
    from dar_core.train.run import Run

    tc = TrainConfig(model="micro", out=str(tmp_path / "run"), tensorboard=False,
                     keep_checkpoints=5)
    run = Run(tc, backend="torch")
    run.resume_checkpoint()
    waited = []

    def write(step):
        def start(folder):
            folder.mkdir()  # the engine's files, "still being written"
            return lambda: waited.append(step)
        return start

    ckpts = run.ckpt_dir
    run.save_sharded(2, "torch-dcp", write(2), lambda: None, any_bad=False)
    assert not (ckpts / "ckpt-0000002.sharded").exists()  # in flight: not a checkpoint yet
    assert (ckpts / ".ckpt-0000002.sharded.tmp").is_dir() and waited == []
    run.save_sharded(4, "torch-dcp", write(4), lambda: None, any_bad=False)
    assert waited == [2] and read_manifest(ckpts / "ckpt-0000002.sharded").meta["step"] == 2
    with pytest.raises(NonFiniteLossError, match="after step 6.*ckpt-0000004.sharded"):
        run.save_sharded(6, "torch-dcp", write(6), lambda: None, any_bad=True)
    assert waited == [2, 4] and not (ckpts / ".ckpt-0000006.sharded.tmp").exists()
    run.save_sharded(8, "torch-dcp", write(8), lambda: None, any_bad=False)
    run.finish()
    assert waited == [2, 4, 8]
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "ckpt-0000002.sharded", "ckpt-0000004.sharded", "ckpt-0000008.sharded"]
