"""File-level conversions: a DiT/SiT ``.pt`` to a dar checkpoint (``dar import``) and a residual
dar checkpoint to SiT's ``.pt`` (``dar export --to sit``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dar_core.errors import CheckpointError, ConfigError
from dar_core.io.checkpoint import load_checkpoint, save_checkpoint, writable_parent
from dar_core.pretrained.pt_files import read_pt, to_numpy, write_pt
from dar_core.pretrained.sit import (
    ImportReport,
    config_for,
    export_state,
    import_state,
    pick_weights,
    prediction_of,
    strip_prefix,
)

EXPORT_FORMATS = ("sit",)


def import_file(path: str | os.PathLike, model: str, out: str | os.PathLike, *,
                key: str | None = None, image_size: int | None = None,
                num_classes: int | None = None, prediction: str | None = None) -> ImportReport:
    """Read a DiT/SiT checkpoint safely and write it as a residual dar checkpoint at ``out``
    (the chosen weights as ``params``; the report in ``meta``). Returns the report."""
    writable_parent(out)  # before reading gigabytes
    obj = read_pt(path)
    state, where, note = pick_weights(obj, key)
    args = obj.get("args") if isinstance(obj, dict) else None
    if args is not None and not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{str(path)!r}: 'args' is a {type(args).__name__}, expected the "
                              "argparse.Namespace DiT/SiT training scripts store")
    pred, evidence = prediction_of(args, model, prediction)
    cfg = config_for(model, args, image_size, num_classes)
    state, renamed = strip_prefix({str(k): v for k, v in state.items()})
    report = ImportReport(source=str(path), key=where, key_note=note, prediction=pred,
                          prediction_evidence=evidence, changed=renamed)
    half = sorted(k for k, v in state.items()
                  if str(getattr(v, "dtype", "")) in ("torch.float16", "torch.bfloat16"))
    if half:
        report.changed.append(f"widened {len(half)} float16/bfloat16 tensors to float32 "
                              f"(exactly), e.g. {half[0]!r}")
    params = import_state({k: to_numpy(k, v) for k, v in state.items()}, cfg, report)
    save_checkpoint(out, cfg, params, meta={"import": report.as_meta()})
    return report


def export_file(ckpt: str | os.PathLike, to: str, out: str | os.PathLike, *,
                weights: str = "ema", learn_sigma: bool = True) -> Path:
    """Write a residual dar checkpoint's ``weights`` (``ema``, falling back to ``params``) as a
    plain SiT state dict (``torch.save``) at ``out``."""
    if to not in EXPORT_FORMATS:
        raise ConfigError(f"--to must be one of {list(EXPORT_FORMATS)}, got {to!r}")
    writable_parent(out)
    ck = load_checkpoint(ckpt)
    state = export_state(ck.weights(weights), ck.config, learn_sigma=learn_sigma)
    return write_pt(out, state)
