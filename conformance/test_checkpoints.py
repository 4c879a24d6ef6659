"""Check 3: a checkpoint trained in any backend loads in every backend with the same outputs;
a core reference checkpoint loads everywhere."""

import numpy as np
import pytest

from conformance.adapters import requested_backends
from conformance.conftest import get_adapter, record
from conformance.tolerances import tol
from dar_core.backend import is_installed
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
    for name in requested_backends():
        vm = get_adapter(name).velocity_model(ck.config, ck.weights("ema"))
        outs[name] = vm.to_numpy(vm.velocity(vm.asarray(x), PROBE_T, vm.asarray(y)))
    return ref, outs


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A few training steps in each backend (skipped backends are absent)."""
    out = {}
    for name in requested_backends():
        a = get_adapter(name) if _available(name) else None
        if a is None:
            continue
        d = tmp_path_factory.mktemp(f"train-{name}")
        tc = TrainConfig(model="micro", image_size=16, batch_size=4, steps=3, ckpt_every=3,
                         sample_every=10_000, lr=1e-2, query="dynamic", chunk_size=3,
                         out=str(d), progress=False, device="cpu")
        run_dir = a.train(tc)
        out[name] = sorted((run_dir / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    return out


def _available(name):
    return is_installed(name)


def test_trained_checkpoint_loads_everywhere(backend, trained):
    get_adapter(backend)
    ck = load_checkpoint(trained[backend])
    assert ck.meta["backend"] == backend and ck.meta["step"] == 3
    assert ck.ema is not None and ck.opt  # EMA and optimizer state travel too
    ref, outs = _outputs_everywhere(trained[backend])
    for name, out in outs.items():
        err = record(f"checkpoint.{backend}->reference", name, rel_err(out, ref))
        assert err < tol("checkpoint"), name


def test_trained_checkpoints_agree_across_backends(pair, trained):
    a, b = pair
    get_adapter(a), get_adapter(b)
    pa, pb = load_checkpoint(trained[a]).params, load_checkpoint(trained[b]).params
    # Same init, same batches: three AdamW steps land on (nearly) the same weights.
    for k in pa:
        err = rel_err(pa[k], pb[k])
        record("train_3_steps.params", f"{a}-{b}", err)
        assert err < tol("train_params"), k


def test_reference_checkpoint_loads_everywhere(tmp_path):
    cfg = model_config("micro", routing=RoutingConfig(query="static_t", chunk_size=2),
                       input_size=16)
    path = save_checkpoint(tmp_path / "ref.safetensors", cfg,
                           random_params(cfg, 5, dtype=np.float32))
    ref, outs = _outputs_everywhere(path)
    assert outs, "no backend available"
    for name, out in outs.items():
        assert record("checkpoint.core->backend", name, rel_err(out, ref)) < tol("checkpoint")
