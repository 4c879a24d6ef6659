"""Run folders never lose work and never keep a NaN (the fault and bad-input matrix of the
backend-neutral run folder every trainer uses): each case asserts the refusal, its message,
and that nothing already on disk changed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from dar_core.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    NonFiniteLossError,
    RunFolderError,
    TrainingInterrupted,
)
from dar_core.io.images import to_uint8
from dar_core.spec.schema import init_params
from dar_core.train.run import Run, TrainConfig

BASE = dict(model="micro", image_size=16, batch_size=4, progress=False, keep_checkpoints=5)


def _tc(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / "run"), **{**BASE, **kw})


def _weights(run: Run) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in init_params(run.cfg, 0).items()}


def _run_with_checkpoints(tmp_path, steps=(10, 20)) -> tuple[Run, dict[str, bytes]]:
    run = Run(_tc(tmp_path), "test")
    run.resume_checkpoint()
    for s in steps:
        run.log(s - 1, 0.5, 1.0)
        run.save(s, _weights(run))
    run.finish()
    return run, _snapshot(run.dir)


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_fresh_run_into_a_folder_with_a_run_refuses_and_keeps_it(tmp_path):
    _, before = _run_with_checkpoints(tmp_path)
    with pytest.raises(RunFolderError, match=r"already holds a run, checkpoints up to step 20: "
                                             r"pass --resume auto .* --overwrite"):
        Run(_tc(tmp_path, steps=5), "test")
    assert _snapshot(tmp_path / "run") == before


def test_overwrite_replaces_the_old_run(tmp_path):
    _run_with_checkpoints(tmp_path)
    run = Run(_tc(tmp_path, overwrite=True), "test")
    run.resume_checkpoint()
    assert run.checkpoints() == [] and not run.metrics_path.exists()
    run.save(3, _weights(run))
    assert [p.name for p in run.checkpoints()] == ["ckpt-0000003.safetensors"]


def test_a_second_trainer_refuses_while_the_first_holds_the_folder(tmp_path):
    first = Run(_tc(tmp_path), "test")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = first.dir / ".lock"
        lock.write_text(f"{os.uname().nodename} {holder.pid}\n")  # as if that process held it
        with pytest.raises(RunFolderError, match=f"in use by another trainer .*{holder.pid}"):
            Run(_tc(tmp_path, resume="auto"), "test")
    finally:
        holder.kill()
        holder.wait()
    # its holder gone, the lock is stale and taken over
    second = Run(_tc(tmp_path, resume="auto"), "test")
    assert second.dir.joinpath(".lock").read_text().split()[1] == str(os.getpid())
    second.finish()
    assert not second.dir.joinpath(".lock").exists()


def test_orphaned_checkpoint_temp_files_are_removed_at_start(tmp_path):
    run, _ = _run_with_checkpoints(tmp_path)
    orphan = run.ckpt_dir / ".ckpt-0000030.safetensors.k3j2.tmp"
    orphan.write_bytes(b"\0" * 1000)
    again = Run(_tc(tmp_path, resume="auto"), "test")
    assert not orphan.exists() and len(again.checkpoints()) == 2


def test_a_failed_resume_leaves_the_run_record_alone(tmp_path):
    _, before = _run_with_checkpoints(tmp_path)
    run = Run(_tc(tmp_path, resume="auto", model="tiny"), "test")
    with pytest.raises(CheckpointError, match="different model config"):
        run.resume_checkpoint()
    after = _snapshot(tmp_path / "run")
    after.pop(".lock", None)
    assert after == before  # config.json still says micro


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    run, _ = _run_with_checkpoints(tmp_path)
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 21, "lo')  # power lost mid-write
    again = Run(_tc(tmp_path, resume="auto"), "test")
    assert again.resume_checkpoint().meta["step"] == 20
    assert "dropping unreadable line 3" in capsys.readouterr().err
    assert [ln[:11] for ln in again.metrics_path.read_text().splitlines()] == ['{"step": 10',
                                                                               '{"step": 20']


def test_resume_auto_falls_back_past_a_truncated_newest_checkpoint(tmp_path, capsys):
    run, _ = _run_with_checkpoints(tmp_path)
    newest = run.checkpoints()[-1]
    newest.write_bytes(newest.read_bytes()[:5000])  # a copy cut short, a disk that filled
    again = Run(_tc(tmp_path, resume="auto"), "test")
    assert again.resume_checkpoint().meta["step"] == 10
    assert f"skipping checkpoint {newest.name}" in capsys.readouterr().err


def test_a_non_finite_state_is_never_saved_and_the_last_good_one_is_named(tmp_path):
    run, before = _run_with_checkpoints(tmp_path)
    run = Run(_tc(tmp_path, resume="auto"), "test")
    run.resume_checkpoint()
    w = _weights(run)
    w["blocks.0.attn.qkv.weight"][0, 0] = np.nan
    ema = dict(w, **{"final_layer.linear.bias": np.full_like(w["final_layer.linear.bias"],
                                                              np.inf)})
    with pytest.raises(NonFiniteLossError, match=r"params/blocks.0.attn.qkv.weight.*not saved.*"
                                                 r"ckpt-0000020.safetensors"):
        run.save(30, w, ema=ema)
    assert [p.name for p in run.checkpoints()] == ["ckpt-0000010.safetensors",
                                                   "ckpt-0000020.safetensors"]


def test_resume_refuses_a_checkpoint_with_non_finite_tensors(tmp_path):
    from dar_core.io.checkpoint import save_checkpoint

    run = Run(_tc(tmp_path), "test")
    w = _weights(run)
    w["pos_embed"] = np.full_like(w["pos_embed"], np.nan)
    bad = save_checkpoint(tmp_path / "nan.safetensors", run.cfg, w, meta={"step": 4})
    run.finish()
    again = Run(_tc(tmp_path, resume=str(bad), overwrite=True), "test")
    with pytest.raises(CheckpointError, match="non-finite tensors: \\['params/pos_embed'\\]"):
        again.resume_checkpoint()


@pytest.mark.parametrize("field, value, message", [
    ("adam_eps", 0.0, "adam_eps must be a finite number > 0, got 0.0"),
    ("sample_cfg", float("nan"), "sample_cfg must be a finite number >= 0, got nan"),
    ("sample_cfg", float("inf"), "sample_cfg must be a finite number >= 0, got inf"),
    ("overwrite", "yes", "overwrite must be a bool, got 'yes'"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _tc(tmp_path, **{field: value})
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(RunFolderError, match="run folder .* is a file, expected a folder"):
        Run(_tc(tmp_path), "test")
    assert (tmp_path / "run").read_text() == "notes"


def test_non_finite_images_are_refused_not_painted_grey():
    imgs = np.zeros((2, 3, 4, 4), np.float32)
    imgs[1, 0, 2, 2] = np.nan
    with pytest.raises(InputError, match="1 non-finite values"):
        to_uint8(imgs)


def test_dar_train_refuses_a_second_fresh_run_in_one_line(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "dar_core.cli", "train", "--backend", "torch", "--model",
            "micro", "--image-size", "16", "--batch-size", "4", "--steps", "2", "--ckpt-every",
            "1", "--sample-every", "100", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(out)
    second = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"dar train: error: run folder {str(out)!r} already holds a run, checkpoints up to "
        "step 2: pass --resume auto to continue it, --overwrite to replace it, or another --out"]
    assert _snapshot(out) == before


def test_resume_auto_with_no_readable_checkpoint_refuses_instead_of_starting_afresh(tmp_path):
    run, _ = _run_with_checkpoints(tmp_path)
    for p in run.checkpoints():
        p.write_bytes(b"not a checkpoint")
    before = _snapshot(run.dir)
    again = Run(_tc(tmp_path, resume="auto"), "test")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be resumed .*--overwrite"):
        again.resume_checkpoint()
    after = _snapshot(run.dir)
    after.pop(".lock", None)
    assert after == before


def test_an_os_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    pytest.importorskip("torch")
    from dar_core.io.checkpoint import save_checkpoint
    from dar_core.spec.config import model_config

    cfg = model_config("micro")
    ckpt = save_checkpoint(tmp_path / "m.safetensors", cfg,
                           {k: v.astype(np.float32) for k, v in init_params(cfg, 0).items()},
                           meta={"step": 1})
    png = "/proc/no-such-folder/grid.png"  # a folder nobody can create
    base = [sys.executable, "-m", "dar_core.cli"]
    tail = ["sample", "--backend", "torch", "--checkpoint", str(ckpt), "--steps", "1",
            "--per-class", "1", "--out", png]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(base + tail, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dar sample: error: "), res.stderr
    assert "/proc/no-such-folder" in lines[0]
    res = subprocess.run(base + ["--debug"] + tail, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr


def _saved(tmp_path) -> tuple[object, object]:
    from dar_core.io.checkpoint import save_checkpoint
    from dar_core.spec.config import model_config

    cfg = model_config("micro", input_size=16)  # the procedural data's size
    w = {k: v.astype(np.float32) for k, v in init_params(cfg, 0).items()}
    return cfg, save_checkpoint(tmp_path / "m.safetensors", cfg, w, meta={"step": 1})


def test_a_flipped_bit_in_a_checkpoint_is_caught_by_its_checksums(tmp_path):
    from dar_core.io.checkpoint import load_checkpoint

    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x04  # one bit of the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch in \\['"):
        load_checkpoint(path)


def test_a_crafted_header_is_refused_before_anything_is_built(tmp_path):
    import json
    import time

    from safetensors.numpy import save

    from dar_core.io.checkpoint import FORMAT, VERSION, load_checkpoint
    from dar_core.spec.config import model_config

    cfg = model_config("micro").to_dict()
    cfg["depth"] = 10**8
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(save({"params/x": np.zeros(1, np.float32)},
                          metadata={"format": FORMAT, "version": str(VERSION),
                                    "config": json.dumps(cfg), "meta": "{}"}))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="depth=100000000 is above the supported 1024"):
        load_checkpoint(path)
    assert time.perf_counter() - t0 < 5  # refused, not built (this took minutes and GBs)
    no_config = tmp_path / "no-config.safetensors"
    no_config.write_bytes(save({"params/x": np.zeros(1, np.float32)},
                               metadata={"format": FORMAT, "meta": "{}"}))
    with pytest.raises(CheckpointError, match="unusable header: 'config'"):
        load_checkpoint(no_config)


@pytest.mark.parametrize("kw, message", [
    (dict(per_class=0), "per_class must be a positive integer, got 0"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number >= 0, got nan"),
    (dict(labels=[]), "labels is empty"),
    (dict(png="/proc/no-such-folder/x.png"), "cannot create the folder of output"),
])
def test_bad_sampling_requests_are_refused_before_sampling(tmp_path, kw, message):
    from dar_core.sampling.from_checkpoint import sample_checkpoint

    _, path = _saved(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("[", "\\[")):
        sample_checkpoint(str(path), backend="auto", **kw)


def test_torch_model_names_a_dtype_mismatch_of_its_input():
    torch = pytest.importorskip("torch")
    from dar_core.backends.torch import DARTransformer
    from dar_core.spec.config import model_config

    cfg = model_config("micro")
    model = DARTransformer(cfg)
    x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, dtype=torch.float64)
    with pytest.raises(InputError, match="x is torch.float64 on cpu, the model's weights are "
                                         "torch.float32 on cpu"):
        model(x, torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_diagnose_refuses_n_0_and_an_untrained_model_gets_a_headline(tmp_path):
    from dar_core.diagnostics.symptoms import diagnose, headline

    _, path = _saved(tmp_path)  # zero-initialised final layer: no gradient reaches z_D
    with pytest.raises(ConfigError, match="n must be a positive integer, got 0"):
        diagnose([str(path)], (0.5,), n=0, backend="reference")
    lines = headline(diagnose([str(path)], (0.5,), n=2, backend="reference"))
    assert len(lines) == 1 and "t=0.50" in lines[0]


def _steps_with_sigterm_at(run: Run, at: int, decide: bool) -> list[int]:
    """Iterate the run's steps, sending this process SIGTERM during step ``at``; with
    ``decide``, ask whether each step checkpoints (as a trainer does after its update)."""
    seen = []
    for step in run.steps():
        seen.append(step)
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)
        if decide:
            run.should_checkpoint(step)
    return seen


@pytest.fixture
def sigterm_calls():
    """SIGTERM's handler outside the run records its calls (instead of ending pytest)."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGTERM, previous)


def test_a_stop_signal_after_the_last_step_is_passed_on_not_dropped(tmp_path, sigterm_calls):
    """SIGTERM during the last step's own work (after its stop decision: its samples, its
    plots) has no step left to stop: the run ends, and the signal reaches the handler that
    was there before the run, which would otherwise never see it."""
    run = Run(_tc(tmp_path, steps=3), "test")
    run.resume_checkpoint()
    assert _steps_with_sigterm_at(run, 2, decide=False) == [0, 1, 2]
    assert sigterm_calls == [signal.SIGTERM]
    run.finish()


def test_a_stop_signal_that_stops_a_step_is_not_passed_on(tmp_path, sigterm_calls):
    """The run acts on it (saves and raises TrainingInterrupted): nothing is passed on."""
    run = Run(_tc(tmp_path, steps=5), "test")
    run.resume_checkpoint()
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 2"):
        _steps_with_sigterm_at(run, 1, decide=True)
    assert sigterm_calls == []
