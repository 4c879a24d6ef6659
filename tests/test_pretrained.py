"""``dar import`` / ``dar export --to sit`` (docs/spec.md §9.6): SiT/DiT-format checkpoints built
here from the project's own residual model, in the layout DiT's and SiT's training scripts
write (``learn_sigma`` final layer with 2C channels per pixel, ``ema``/``model`` entries, an
``argparse.Namespace`` under ``args``), read back safely and checked key by key and by output.
"""

from __future__ import annotations

import argparse
import os
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dar_core.backend import BACKENDS, installed_backends, load_backend  # noqa: E402
from dar_core.cli import main  # noqa: E402
from dar_core.conformance.plain_dit import dit_forward  # noqa: E402
from dar_core.conformance.tolerances import forward_tol, sensitivity  # noqa: E402
from dar_core.errors import CheckpointError, ConfigError  # noqa: E402
from dar_core.io.checkpoint import load_checkpoint  # noqa: E402
from dar_core.pretrained.convert import export_file, import_file  # noqa: E402
from dar_core.spec.config import model_config  # noqa: E402
from dar_core.spec.reference import forward  # noqa: E402
from dar_core.spec.schema import param_shapes, random_params  # noqa: E402
from dar_core.testing import parity_inputs, rel_err  # noqa: E402

CFG = model_config("micro", routing="residual")  # depth 2, d 32, patch 4, 8x8x3, 10 classes
C, P = CFG.out_channels, CFG.patch_size
SIT_ARGS = dict(model="SiT-micro", image_size=8, num_classes=10, path_type="Linear",
                prediction="velocity", loss_weight=None, global_batch_size=256)


def weights(seed: int, cfg=CFG) -> dict[str, np.ndarray]:
    """A trained-looking residual model: every weight dense, float32."""
    return {k: v.astype(np.float32) for k, v in random_params(cfg, seed).items()}


def learn_sigma_layout(p: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """DiT/SiT's ``learn_sigma`` final layer, built independently of the code under test: per
    patch position (i, j) its 2C rows are the C velocity rows, then C learned-variance rows
    (random here, so a wrong slice shows)."""
    rng = np.random.default_rng(seed)
    out = dict(p)
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        v = p[name]
        wide = np.empty((2 * v.shape[0],) + v.shape[1:], np.float32)
        for ij in range(P * P):
            wide[ij * 2 * C: ij * 2 * C + C] = v[ij * C: (ij + 1) * C]
            wide[ij * 2 * C + C: (ij + 1) * 2 * C] = rng.standard_normal((C,) + v.shape[1:])
        out[name] = wide
    return out


def tensors(p: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in p.items()}


def sit_file(path: Path, *, ema_seed: int = 1, model_seed: int = 2, entries=("ema", "model"),
             args: dict | None = SIT_ARGS, drop_null_row: bool = False, cfg=CFG) -> dict:
    """Write a checkpoint the way SiT's train.py does; returns the velocity-layout weights."""
    p = {"ema": weights(ema_seed, cfg), "model": weights(model_seed, cfg)}
    obj: dict = {}
    for k in entries:
        state = learn_sigma_layout(p[k], seed=7)
        if drop_null_row:
            state["y_embedder.embedding_table.weight"] = \
                state["y_embedder.embedding_table.weight"][:-1]
        obj[k] = tensors(state)
    if args is not None:
        obj["args"] = argparse.Namespace(**args)
    obj["opt"] = {"state": {}, "param_groups": []}
    torch.save(obj, path)
    return p


# Import --------------------------------------------------------------------------------------
def test_import_takes_ema_slices_learn_sigma_and_reports_every_key(tmp_path):
    p = sit_file(tmp_path / "sit.pt")
    report = import_file(tmp_path / "sit.pt", "micro", tmp_path / "a.safetensors")
    ck = load_checkpoint(tmp_path / "a.safetensors")
    assert ck.config == CFG and ck.ema is None
    assert sorted(ck.params) == sorted(param_shapes(CFG))
    for k, v in p["ema"].items():  # the EMA weights, bit for bit, velocity rows only
        np.testing.assert_array_equal(ck.params[k], v, err_msg=k)
    assert report.key == "ema" and report.prediction == "velocity"
    assert report.prediction_evidence == "args.prediction in the file"
    assert [s.split()[0] for s in report.sliced] == ["final_layer.linear.weight",
                                                     "final_layer.linear.bias"]
    assert len(report.mapped) + len(report.sliced) == len(param_shapes(CFG))
    assert report.added == [] and ck.meta["import"]["weights"] == "ema"


def test_import_key_model_and_the_fallbacks(tmp_path):
    p = sit_file(tmp_path / "both.pt")
    r = import_file(tmp_path / "both.pt", "micro", tmp_path / "m.safetensors", key="model")
    got = load_checkpoint(tmp_path / "m.safetensors").params
    np.testing.assert_array_equal(got["blocks.0.attn.qkv.weight"],
                                  p["model"]["blocks.0.attn.qkv.weight"])
    assert r.key == "model" and r.key_note == "as asked"

    sit_file(tmp_path / "model_only.pt", entries=("model",))
    r = import_file(tmp_path / "model_only.pt", "micro", tmp_path / "f.safetensors")
    assert r.key == "model" and "no 'ema'" in r.key_note
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        import_file(tmp_path / "model_only.pt", "micro", tmp_path / "x.safetensors", key="ema")

    bare = learn_sigma_layout(p["ema"], seed=7)  # a released checkpoint: the EMA state dict
    torch.save(tensors(bare), tmp_path / "bare.pt")
    r = import_file(tmp_path / "bare.pt", "micro", tmp_path / "b.safetensors",
                    prediction="velocity")
    assert r.key == "state dict" and r.prediction_evidence == "--prediction"
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "b.safetensors")
                                  .params["final_layer.linear.weight"],
                                  p["ema"]["final_layer.linear.weight"])


def test_ddp_prefix_and_half_precision_are_undone_and_reported(tmp_path):
    p = learn_sigma_layout(weights(1), seed=7)
    half = {f"module.{k}": torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in p.items()}
    torch.save(half, tmp_path / "ddp.pt")
    r = import_file(tmp_path / "ddp.pt", "micro", tmp_path / "a.safetensors",
                    prediction="velocity")
    got = load_checkpoint(tmp_path / "a.safetensors").params["blocks.1.mlp.fc2.weight"]
    want = half["module.blocks.1.mlp.fc2.weight"].float().numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert r.changed[0] == "stripped the prefix 'module.' from every key"
    assert r.changed[1].startswith(f"widened {len(p)} float16/bfloat16 tensors to float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_imported_model_computes_what_sit_computes(tmp_path, backend):
    """SiT's forward on the learn_sigma weights keeps the first C output channels; the imported
    model must give exactly that velocity, in every backend (float32 against the independent
    float64 plain DiT, within the draw's float32 tolerance)."""
    if backend not in installed_backends():
        pytest.skip(f"{backend} is not installed")
    p = sit_file(tmp_path / "sit.pt")
    import_file(tmp_path / "sit.pt", "micro", tmp_path / "a.safetensors")
    ck = load_checkpoint(tmp_path / "a.safetensors")
    x, t, y = parity_inputs(CFG)
    wide = learn_sigma_layout(p["ema"], seed=7)
    sit_arch = types.SimpleNamespace(depth=CFG.depth, patch_size=P, num_heads=CFG.num_heads,
                                     out_channels=2 * C)
    sit = dit_forward(wide, sit_arch, x, t, y)[:, :C]  # SiT: x, _ = x.chunk(2, dim=1)
    sens = sensitivity(lambda q, xx: forward(q, CFG, xx, t, y), p["ema"], x)
    out = load_backend(backend).numerics.forward(ck.config, ck.params, x, t, y, "float32", "cpu")
    assert rel_err(out, sit) <= forward_tol("forward", sens)
    # and the learned-variance rows really were dropped: they change SiT's other half only
    assert rel_err(dit_forward(wide, sit_arch, x, t, y)[:, C:], sit) > 0.1


def test_missing_null_class_row_is_added_as_the_class_mean(tmp_path):
    p = sit_file(tmp_path / "nodrop.pt", drop_null_row=True)
    r = import_file(tmp_path / "nodrop.pt", "micro", tmp_path / "a.safetensors")
    table = load_checkpoint(tmp_path / "a.safetensors").params["y_embedder.embedding_table.weight"]
    want = p["ema"]["y_embedder.embedding_table.weight"][:-1]
    np.testing.assert_array_equal(table[:-1], want)
    np.testing.assert_allclose(table[-1], want.mean(axis=0), rtol=0, atol=1e-7)
    assert table.shape == (CFG.num_classes + 1, CFG.hidden_size)
    assert len(r.added) == 1 and r.added[0].startswith("y_embedder.embedding_table.weight row 10")


def test_args_supply_image_size_and_class_count(tmp_path):
    sit_file(tmp_path / "sit.pt", args={**SIT_ARGS, "num_classes": 7},
             cfg=CFG.replace(num_classes=7))
    import_file(tmp_path / "sit.pt", "micro", tmp_path / "a.safetensors")
    assert load_checkpoint(tmp_path / "a.safetensors").config.num_classes == 7
    with pytest.raises(CheckpointError, match=r"pos_embed.*different --image-size"):
        import_file(tmp_path / "sit.pt", "micro", tmp_path / "b.safetensors", image_size=16)
    with pytest.raises(ConfigError, match="does not match the checkpoint's args.model"):
        import_file(tmp_path / "sit.pt", "tiny", tmp_path / "c.safetensors")


def test_a_dit_noise_model_is_refused_unless_told(tmp_path):
    sit_file(tmp_path / "dit.pt", args={"model": "DiT-micro", "image_size": 8,
                                        "num_classes": 10, "global_batch_size": 256})
    with pytest.raises(CheckpointError, match=r"predicts noise \(args.model DiT-micro"):
        import_file(tmp_path / "dit.pt", "micro", tmp_path / "a.safetensors")
    r = import_file(tmp_path / "dit.pt", "micro", tmp_path / "a.safetensors",
                    prediction="velocity")
    assert r.prediction_evidence == "--prediction"
    with pytest.raises(CheckpointError, match="predicts noise"):
        import_file(tmp_path / "dit.pt", "micro", tmp_path / "a.safetensors", prediction="noise")


def test_sit_args_that_say_otherwise_win(tmp_path):
    sit_file(tmp_path / "eps.pt", args={**SIT_ARGS, "prediction": "noise"})
    with pytest.raises(ConfigError, match="contradicts the checkpoint's args.prediction='noise'"):
        import_file(tmp_path / "eps.pt", "micro", tmp_path / "a.safetensors",
                    prediction="velocity")
    sit_file(tmp_path / "gvp.pt", args={**SIT_ARGS, "path_type": "GVP"})
    with pytest.raises(CheckpointError, match="SiT's 'GVP' path"):
        import_file(tmp_path / "gvp.pt", "micro", tmp_path / "a.safetensors")


class _Payload:
    """What a tampered checkpoint carries: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    good = tensors(learn_sigma_layout(weights(1), seed=7))
    torch.save({"ema": good, "args": argparse.Namespace(**SIT_ARGS), "x": _Payload(marker)},
               tmp_path / "evil.pt")
    rc = main(["import", str(tmp_path / "evil.pt"), "--model", "micro",
               "--out", str(tmp_path / "a.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("dar import: error: ") and "'posix.system'" in err
    assert not marker.exists() and not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("argv, says", [
    (["--model", "SiT-Q/2"], "unknown model preset 'SiT-Q/2'"),
    (["--model", "micro", "--num-classes", "5"], "different --num-classes"),
    (["--model", "micro", "--image-size", "0"], "image size must be a positive integer"),
    (["--model", "SiT-XL/2", "--image-size", "250"], "not a multiple of 8"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, says):
    sit_file(tmp_path / "sit.pt", args=None)
    rc = main(["import", str(tmp_path / "sit.pt"), "--prediction", "velocity",
               "--out", str(tmp_path / "a.safetensors"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("dar import: error: ")
    assert says in err


def test_cli_import_missing_file_and_junk(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for path, says in ((tmp_path / "none.pt", "no file at"),
                       (tmp_path / "junk.pt", "not a loadable torch checkpoint")):
        rc = main(["import", str(path), "--model", "micro", "--out", str(tmp_path / "a.st")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and says in err


# Export --------------------------------------------------------------------------------------
def test_export_import_round_trip_is_bit_exact(tmp_path, capsys):
    sit_file(tmp_path / "sit.pt")
    a, b, c = (tmp_path / n for n in ("a.safetensors", "b.pt", "c.safetensors"))
    assert main(["import", str(tmp_path / "sit.pt"), "--model", "micro", "--out", str(a)]) == 0
    assert main(["export", str(a), "--to", "sit", str(b)]) == 0
    assert main(["import", str(b), "--model", "SiT-micro", "--out", str(c)]) == 2  # no preset
    assert main(["import", str(b), "--model", "micro", "--prediction", "velocity",
                 "--out", str(c)]) == 0
    pa, pc = load_checkpoint(a).params, load_checkpoint(c).params
    assert sorted(pa) == sorted(pc)
    for k in pa:
        assert pa[k].dtype == pc[k].dtype and pa[k].tobytes() == pc[k].tobytes(), k
    # a plain state dict (no allowlisted class needed), SiT's names, learn_sigma layout with
    # zero variance rows: what SiT's models.py builds by default and load_state_dict takes
    sd = torch.load(b, weights_only=True)
    assert sorted(sd) == sorted(param_shapes(CFG))
    w = sd["final_layer.linear.weight"].numpy().reshape(P * P, 2 * C, -1)
    np.testing.assert_array_equal(w[:, C:], 0)
    np.testing.assert_array_equal(w[:, :C].reshape(P * P * C, -1),
                                  pa["final_layer.linear.weight"])
    export_file(a, "sit", tmp_path / "narrow.pt", learn_sigma=False)
    narrow = torch.load(tmp_path / "narrow.pt", weights_only=True)
    assert tuple(narrow["final_layer.linear.weight"].shape) == (P * P * C, CFG.hidden_size)


def test_export_refuses_a_dar_model(tmp_path, capsys):
    sit_file(tmp_path / "sit.pt")
    a, g = tmp_path / "a.safetensors", tmp_path / "g.safetensors"
    import_file(tmp_path / "sit.pt", "micro", a)
    assert main(["graft", str(a), "--query", "static", "--chunk-size", "1", "--out", str(g)]) == 0
    capsys.readouterr()
    assert main(["export", str(g), "--to", "sit", str(tmp_path / "g.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dar export: error: only residual models export to SiT")
    assert not (tmp_path / "g.pt").exists()
