"""The FID pipeline against torch-fidelity, the field's maintained implementation: its
InceptionV3 (the same TF-2015 network, resize and scaling) on the same weights gives the same
features, and its FID and Inception Score on the same features the same numbers.

torch-fidelity needs torchvision, which does not import beside the CPU torch the other
sessions pin, so ``nox -s fidelity`` runs this file in an environment of its own (torch and
torchvision of one release); elsewhere it is skipped. The weights are random, of the
architecture, written here: no download."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tfid = pytest.importorskip("torch_fidelity", reason="nox -s fidelity installs torch-fidelity")

from torch_fidelity.feature_extractor_inceptionv3 import (  # noqa: E402
    FeatureExtractorInceptionV3,
)
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402

from dar_core.conformance.tolerances import tol  # noqa: E402
from dar_core.evaluation.fid import inception_score  # noqa: E402
from dar_core.evaluation.inception import InceptionFeatures, build_inception  # noqa: E402
from dar_core.evaluation.metrics import frechet_distance  # noqa: E402
from dar_core.testing import rel_err  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights of the FID InceptionV3 under the released file's names, BatchNorm
    statistics moved off their identity so every normalisation acts."""
    gen = torch.Generator().manual_seed(0)
    state = build_inception().state_dict()
    for k, v in state.items():
        if v.dtype.is_floating_point:
            v = v + 0.05 * torch.randn(v.shape, generator=gen)
            state[k] = v.abs() + 0.5 if k.endswith("running_var") else v
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("size", [(64, 48), (299, 299), (16, 16)])  # down, none, up 18x
def test_inception_features_match_torch_fidelity(weights, size):
    imgs = np.random.default_rng(1).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    ours = InceptionFeatures(weights, device="cpu", batch_size=2)(imgs)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(weights)).eval()
    with torch.no_grad():
        pool, logits = theirs(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
    # two float32 runs of one network (~100 layers deep): the suite's float32 forward bound
    assert rel_err(ours["pool"], pool.numpy()) <= tol("forward"), rel_err(ours["pool"], pool)
    assert rel_err(ours["logits"], logits.numpy()) <= tol("forward")


def test_fid_and_inception_score_match_torch_fidelity():
    rng = np.random.default_rng(2)
    d = 64
    fa = rng.standard_normal((600, d))
    fb = rng.standard_normal((500, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)) / 8) + 0.2
    stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (fa, fb)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert abs(frechet_distance(fa, fb) - theirs) <= 1e-6 * theirs
    logits = 3.0 * rng.standard_normal((1000, 1008))
    isc = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    assert abs(inception_score(logits, split=100) - isc["inception_score_mean"]) <= (
        1e-9 * isc["inception_score_mean"])
