import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dar_core.errors import CheckpointError
from dar_core.io.checkpoint import load_checkpoint, read_header, save_checkpoint
from dar_core.spec.config import RoutingConfig, model_config
from dar_core.spec.schema import init_params, random_params


def test_round_trip_is_bit_exact(tmp_path):
    cfg = model_config("micro", routing=RoutingConfig(query="dynamic", chunk_size=3))
    p = random_params(cfg, 0, dtype=np.float32)
    ema = random_params(cfg, 1, dtype=np.float32)
    opt = {"m/blocks.0.attn.qkv.weight": np.ones((96, 32), np.float32),
           "step": np.array(7, np.int64)}
    path = save_checkpoint(tmp_path / "c.safetensors", cfg, p, ema=ema, opt=opt,
                           meta={"step": 7, "note": "x"})
    ck = load_checkpoint(path)
    assert ck.config == cfg and ck.meta == {"step": 7, "note": "x"}
    for k in p:
        assert ck.params[k].dtype == np.float32
        np.testing.assert_array_equal(ck.params[k], p[k])
        np.testing.assert_array_equal(ck.ema[k], ema[k])
    assert ck.opt["step"].shape == () and int(ck.opt["step"]) == 7
    assert ck.weights("ema") is ck.ema and ck.weights("params") is ck.params
    assert read_header(path)["format"] == "dar-checkpoint"
    # no pickle anywhere: the file is a plain safetensors file
    from safetensors.numpy import load_file

    assert "params/pos_embed" in load_file(str(path))


def test_mismatched_config_names_key_and_shapes(tmp_path):
    cfg = model_config("micro")
    path = save_checkpoint(tmp_path / "c.safetensors", cfg, init_params(cfg))
    other = cfg.replace(hidden_size=64)
    with pytest.raises(CheckpointError, match=r"'pos_embed'.*\(1, 4, 32\).*\(1, 4, 64\)"):
        load_checkpoint(path, other)
    dyn = cfg.replace(routing=RoutingConfig(query="dynamic"))
    with pytest.raises(CheckpointError, match="query_proj"):
        load_checkpoint(path, dyn)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(bad)


def test_save_rejects_wrong_params(tmp_path):
    cfg = model_config("micro")
    p = init_params(cfg)
    p["blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.qkv.weight.*\(3, 3\)"):
        save_checkpoint(tmp_path / "c.safetensors", cfg, p)
    assert not list(tmp_path.iterdir())


WRITER = r"""
import os, sys, time, numpy as np
import dar_core.io.checkpoint as ck
from dar_core.spec.config import model_config
from dar_core.spec.schema import init_params
real_fsync = os.fsync
def slow_fsync(fd):
    open(sys.argv[2], "w").close()   # tell the parent the temp file is being written
    time.sleep(60)
ck.os.fsync = slow_fsync
cfg = model_config("micro")
ck.save_checkpoint(sys.argv[1], cfg, init_params(cfg, seed=99))
"""


def test_write_killed_midway_keeps_the_previous_file(tmp_path):
    cfg = model_config("micro")
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, cfg, init_params(cfg, seed=1))
    before = path.read_bytes()
    flag = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(flag)])
    try:
        for _ in range(600):
            if flag.exists():
                break
            time.sleep(0.05)
        assert flag.exists(), "writer never reached the write"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert path.read_bytes() == before
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck.params["y_embedder.embedding_table.weight"],
                                  init_params(cfg, seed=1)["y_embedder.embedding_table.weight"])
