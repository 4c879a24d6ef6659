"""``freeze_routing``: the routers stay at their initialisation (zero query: uniform routing)
while everything else trains, in every backend; a frozen run resumes like any other."""

from __future__ import annotations

import numpy as np
import pytest

from dar_core.backend import BACKENDS, is_installed, load_backend
from dar_core.io.checkpoint import load_checkpoint
from dar_core.spec.schema import init_params, router_prefixes
from dar_core.train.run import TrainConfig, frozen_names, trained_names

BASE = TrainConfig(model="micro", image_size=16, batch_size=8, lr=1e-2, steps=3, ckpt_every=3,
                   sample_every=1000, progress=False, query="static", freeze_routing=True)


def test_frozen_names_are_the_routers():
    cfg = BASE.model_config()
    frozen = frozen_names(cfg, BASE)
    assert frozen and all(n.split(".")[-2] in ("attn_router", "mlp_router", "final_router")
                          or ".norm." in n for n in frozen)
    assert {n.rsplit(".", 2)[0] if ".norm." in n else n.rsplit(".", 1)[0] for n in frozen} \
        == set(router_prefixes(cfg))
    assert not set(frozen) & set(trained_names(cfg, BASE))
    assert frozen_names(cfg, BASE.replace(freeze_routing=False)) == []
    assert frozen_names(BASE.replace(routing="residual").model_config(), BASE) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_run_trains_everything_but_the_routers(backend, tmp_path):
    if not is_installed(backend):
        pytest.skip(f"{backend} is not installed")
    train = load_backend(backend).train
    run = train(BASE.replace(out=str(tmp_path / "run")))
    ck = load_checkpoint(run / "checkpoints" / "ckpt-0000003.safetensors")
    init = init_params(ck.config, BASE.seed)
    frozen = set(frozen_names(ck.config, BASE))
    for name, p in ck.params.items():
        if name in frozen:
            np.testing.assert_array_equal(p, init[name].astype(np.float32), err_msg=name)
            np.testing.assert_array_equal(ck.ema[name], p, err_msg=name)
            assert f"m/{name}" not in ck.opt
    moved = [n for n in trained_names(ck.config, BASE)
             if not np.array_equal(ck.params[n], init[n].astype(np.float32))]
    assert len(moved) > len(trained_names(ck.config, BASE)) // 2
    again = train(BASE.replace(out=str(run), steps=5, ckpt_every=5, resume="auto"))
    later = load_checkpoint(again / "checkpoints" / "ckpt-0000005.safetensors")
    for name in frozen:
        np.testing.assert_array_equal(later.params[name], ck.params[name], err_msg=name)
