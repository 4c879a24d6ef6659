"""Check 4: the same initial noise and labels give the same samples in every backend."""

import numpy as np
import pytest

from dar_core.conformance.report import check
from dar_core.conformance.tolerances import tol
from dar_core.sampling.samplers import sample
from dar_core.spec.config import RoutingConfig, model_config
from dar_core.spec.reference import forward
from dar_core.spec.schema import random_params
from dar_core.testing import rel_err

CASES = [("euler", 1.0), ("heun", 1.0), ("sde", 1.0), ("heun", 2.5)]


@pytest.mark.parametrize("sampler,cfg_scale", CASES, ids=[f"{s}-cfg{c}" for s, c in CASES])
def test_samples_match_reference(adapter, sampler, cfg_scale):
    cfg = model_config("micro", routing=RoutingConfig(query="static_t", chunk_size=3),
                       input_size=16)
    p = random_params(cfg, 2, scale=0.3)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    y = np.array([0, 1, 5, cfg.null_class])

    def ref_velocity(x, t, yy):
        return forward(p, cfg, x, np.full(len(x), t), yy)

    kw = dict(sampler=sampler, steps=6, cfg_scale=cfg_scale, null_class=cfg.null_class)
    ref = sample(ref_velocity, noise.astype(np.float64), y, rng=np.random.default_rng(9), **kw)
    vm = adapter.velocity_model(cfg, {k: v.astype(np.float32) for k, v in p.items()})
    out = sample(vm.velocity, vm.asarray(noise), vm.asarray(y), rng=np.random.default_rng(9),
                 asarray=vm.asarray, **kw)
    err = rel_err(vm.to_numpy(out), ref)
    check(f"sampler.{sampler}-cfg{cfg_scale}", adapter.name, err, tol("sample"))
