"""Check 3: a checkpoint trained in any backend loads in every backend with the same outputs;
a core reference checkpoint loads everywhere."""

import numpy as np
import pytest

from dar_core.conformance.conftest import available, get_adapter
from dar_core.conformance.report import check
from dar_core.conformance.tolerances import tol
from dar_core.io.checkpoint import load_checkpoint, save_checkpoint
from dar_core.spec.config import RoutingConfig, model_config
from dar_core.spec.reference import forward
from dar_core.spec.schema import random_params
from dar_core.testing import rel_err
from dar_core.train.run import TrainConfig

PROBE_T = 0.6


def _probe(cfg):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, cfg.in_channels, cfg.input_size, cfg.input_size))
    return x.astype(np.float32), np.array([0, 2, cfg.null_class])


def _outputs_everywhere(ckpt_path):
    ck = load_checkpoint(ckpt_path)
    x, y = _probe(ck.config)
    ref = forward(ck.weights("ema"), ck.config, x, np.full(3, PROBE_T), y)
    outs = {}
    for a in available():
        vm = a.velocity_model(ck.config, ck.weights("ema"))
        outs[a.name] = vm.to_numpy(vm.velocity(vm.asarray(x), PROBE_T, vm.asarray(y)))
    return ref, outs


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A few training steps in each backend (skipped backends are absent)."""
    out = {}
    for a in available():
        d = tmp_path_factory.mktemp(f"train-{a.name}")
        tc = TrainConfig(model="micro", image_size=16, batch_size=4, steps=3, ckpt_every=3,
                         sample_every=10_000, lr=1e-2, query="dynamic", chunk_size=3,
                         out=str(d), progress=False)
        run_dir = a.train(tc)
        out[a.name] = sorted((run_dir / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    return out


def test_trained_checkpoint_loads_everywhere(backend, trained):
    get_adapter(backend)
    ck = load_checkpoint(trained[backend])
    assert ck.meta["backend"] == backend and ck.meta["step"] == 3
    assert ck.ema is not None and ck.opt  # EMA and optimizer state travel too
    ref, outs = _outputs_everywhere(trained[backend])
    for name, out in outs.items():
        check(f"checkpoint.{backend}->reference", name, rel_err(out, ref), tol("checkpoint"))


def test_trained_checkpoints_agree_across_backends(pair, trained):
    a, b = pair
    get_adapter(a), get_adapter(b)
    pa, pb = load_checkpoint(trained[a]).params, load_checkpoint(trained[b]).params
    # Same init, same batches: three AdamW steps land on (nearly) the same weights.
    for k in pa:
        err = rel_err(pa[k], pb[k])
        check("train_3_steps.params", f"{a}-{b}", err, tol("train_params"), k)


def test_reference_checkpoint_loads_everywhere(tmp_path):
    cfg = model_config("micro", routing=RoutingConfig(query="static_t", chunk_size=2),
                       input_size=16)
    path = save_checkpoint(tmp_path / "ref.safetensors", cfg,
                           random_params(cfg, 5, dtype=np.float32))
    ref, outs = _outputs_everywhere(path)
    if not outs:
        pytest.skip("none of the requested backends runs on this device here")
    for name, out in outs.items():
        check("checkpoint.core->backend", name, rel_err(out, ref), tol("checkpoint"))
