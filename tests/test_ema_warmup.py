"""EMA warm-up (``TrainConfig.ema_warmup``): the same decay schedule in every backend."""

import numpy as np
import pytest

from dar_core.backend import BACKENDS, is_installed, load_backend
from dar_core.errors import ConfigError
from dar_core.io.checkpoint import load_checkpoint
from dar_core.spec.schema import init_params
from dar_core.train.run import TrainConfig


def test_decay_schedule():
    tc = TrainConfig(ema_decay=0.999, ema_warmup=True)
    assert tc.ema_decay_at(0) == pytest.approx(0.1)
    assert tc.ema_decay_at(90) == pytest.approx(91 / 100)
    assert tc.ema_decay_at(10**6) == 0.999  # capped at ema_decay
    assert all(tc.ema_decay_at(s) <= tc.ema_decay_at(s + 1) for s in range(0, 20000, 97))
    off = tc.replace(ema_warmup=False)
    assert {off.ema_decay_at(s) for s in (0, 5, 10**6)} == {0.999}
    with pytest.raises(ConfigError, match="ema_warmup must be a bool, got 1"):
        TrainConfig(ema_warmup=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_apply_the_warmup_decay(backend, tmp_path):
    if not is_installed(backend):
        pytest.skip(f"{backend} is not installed")
    tc = TrainConfig(model="micro", image_size=16, batch_size=4, steps=2, ckpt_every=1,
                     sample_every=100, keep_checkpoints=5, lr=1e-2, ema_decay=0.99,
                     ema_warmup=True, progress=False, out=str(tmp_path / backend))
    run_dir = load_backend(backend).train(tc)
    first, second = (load_checkpoint(run_dir / "checkpoints" / f"ckpt-{n:07d}.safetensors")
                     for n in (1, 2))
    init = init_params(first.config, tc.seed)
    moved = 0
    for k, p1 in first.params.items():
        d0, d1 = tc.ema_decay_at(0), tc.ema_decay_at(1)  # 0.1, 2/11
        np.testing.assert_allclose(first.ema[k], d0 * init[k] + (1 - d0) * p1,
                                   rtol=1e-5, atol=1e-7, err_msg=f"step 1 ema {k}")
        expected = d1 * first.ema[k] + (1 - d1) * second.params[k]
        np.testing.assert_allclose(second.ema[k], expected,
                                   rtol=1e-5, atol=1e-7, err_msg=f"step 2 ema {k}")
        moved += not np.array_equal(second.params[k], init[k])
    assert moved > 10
