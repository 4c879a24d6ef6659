"""What a newcomer meets: defaults that work for short runs, progress on long commands, clear
notes and refusals (EMA warm-up on, bars for sample/eval/diagnose, eval of other data,
distinct legend labels, a resume with nothing left to train, a missing CUDA)."""

from __future__ import annotations

import numpy as np
import pytest

from dar_core.cli import build_parser, main
from dar_core.io.checkpoint import save_checkpoint
from dar_core.spec.config import model_config
from dar_core.spec.schema import init_params
from dar_core.train.run import Run, TrainConfig


def _checkpoint(path, meta=None):
    cfg = model_config("micro", input_size=16, num_classes=4)
    w = {k: v.astype(np.float32) for k, v in init_params(cfg, 0).items()}
    return save_checkpoint(path, cfg, w, meta={"step": 1, **(meta or {})})


def test_ema_warmup_is_on_by_default_and_sits_fixed_decay_is_one_flag_away():
    assert TrainConfig().ema_warmup is True
    assert TrainConfig().ema_decay_at(0) == pytest.approx(0.1)
    on = build_parser().parse_args(["train"])
    off = build_parser().parse_args(["train", "--no-ema-warmup"])
    assert on.ema_warmup is True and off.ema_warmup is False
    assert TrainConfig(ema_warmup=off.ema_warmup).ema_decay_at(0) == 0.9999


def test_sample_shows_progress_over_the_network_evaluations(tmp_path, capsys):
    pytest.importorskip("torch")
    ck = _checkpoint(tmp_path / "m.safetensors")
    assert main(["sample", "--backend", "torch", "--checkpoint", str(ck), "--steps", "3",
                 "--per-class", "1", "--out", str(tmp_path / "g.png")]) == 0
    err = capsys.readouterr().err
    assert "sample 4" in err and "6/6" in err  # Heun: 2 evaluations per step


def test_eval_checks_out_first_and_refuses_other_data_without_force(tmp_path, capsys):
    pytest.importorskip("torch")
    ck = _checkpoint(tmp_path / "m.safetensors", {"train": {"data": "/data/my-images"}})
    (tmp_path / "taken").mkdir()
    args = ["eval", "--backend", "torch", "--checkpoint", str(ck), "--n-per-class", "2",
            "--steps", "1"]
    assert main(args + ["--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dar eval: error: output ") and "is a folder" in err
    assert "sample" not in err  # refused before any sampling
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"dar eval: error: checkpoint {str(ck)!r} was trained on data "
                   "'/data/my-images', but the evaluator scores against the procedural "
                   "dataset; pass --force to score it anyway")


def test_eval_with_force_warns_and_scores(tmp_path, capsys):
    pytest.importorskip("torch")
    ck = _checkpoint(tmp_path / "m.safetensors", {"train": {"data": "/data/my-images"}})
    out = tmp_path / "r" / "eval.json"
    assert main(["eval", "--backend", "torch", "--checkpoint", str(ck), "--n-per-class", "2",
                 "--steps", "1", "--force", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "warning: checkpoint" in cap.err and "not a measure of fit" in cap.err
    assert "sample 8" in cap.err and out.exists() and "FD " in cap.out


def test_diagnose_tells_same_named_checkpoints_apart_and_shows_progress(tmp_path, capsys):
    a = _checkpoint(tmp_path / "res" / "ckpt-0000001.safetensors")
    b = _checkpoint(tmp_path / "dar" / "ckpt-0000001.safetensors")
    out = tmp_path / "diag"
    assert main(["diagnose", "--backend", "reference", "--checkpoint", str(a), "--checkpoint",
                 str(b), "--n", "2", "--timesteps", "0.5", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "2/2" in cap.err  # two checkpoints x one timestep
    import json

    labels = [m["label"] for m in json.loads((out / "diagnostics.json").read_text())["models"]]
    assert labels == ["DAR static_t c4 @1 (res/ckpt-0000001)",
                      "DAR static_t c4 @1 (dar/ckpt-0000001)"]


def test_diagnose_checks_out_before_the_passes(tmp_path, capsys):
    ck = _checkpoint(tmp_path / "m.safetensors")
    (tmp_path / "file").write_text("x")
    assert main(["diagnose", "--backend", "reference", "--checkpoint", str(ck), "--n", "2",
                 "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dar diagnose: error: --out ") and "is a file" in err
    assert len(err.strip().splitlines()) == 1 and "pass" not in err  # no bar: nothing ran


def test_resume_with_nothing_left_to_train_says_so(tmp_path, capsys):
    base = dict(model="micro", image_size=16, batch_size=4, progress=False,
                out=str(tmp_path / "run"))
    run = Run(TrainConfig(**base, steps=20), "test")
    run.resume_checkpoint()
    w = {k: v.astype(np.float32) for k, v in init_params(run.cfg, 0).items()}
    run.save(20, w)
    run.finish()
    again = Run(TrainConfig(**base, steps=10, resume="auto"), "test")
    again.resume_checkpoint()
    err = capsys.readouterr().err
    assert "resumed checkpoint is at step 20 and steps=10: nothing is left to train " \
           "(pass --steps above 20" in err
    assert list(again.steps()) == []
    again.finish()


def test_torch_names_why_a_device_is_missing():
    pytest.importorskip("torch")
    from dar_core.backends.torch.device import resolve_device
    from dar_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"device 'cuda:99' is not available to torch on "
                                          r"this machine \(.+\); available: cpu"):
        resolve_device("cuda:99")
