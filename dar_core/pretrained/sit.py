"""DiT/SiT state dicts to dar parameters and back (docs/spec.md §9.6).

The canonical schema already uses DiT's names, so importing is a check, not a renaming.
Three things differ in released checkpoints and are handled here, each reported:

- ``learn_sigma``: the final layer predicts ``2C`` channels per pixel, the velocity and a
  learned variance. Its rows are ordered ``(i, j, c)`` per token (``c`` fastest, DiT's
  unpatchify), and SiT keeps the first ``C`` channels of the unpatchified output, so the
  velocity rows are, for every patch position, the first ``C`` of its ``2C``. Those are kept.
- ``class_dropout_prob = 0``: the label table has no null-class row; one is added (the mean
  of the class rows: a neutral start for fine-tuning with label dropout; guidance against it
  means nothing until then).
- The prediction: DiT trains DDPM noise prediction with integer ``t``, SiT velocity on its
  linear path with ``t`` in [0, 1]. dar models are SiT velocity models, so anything else is
  refused (``prediction_of``).

``export_sit`` is the inverse for residual models: SiT's names, and by default the
``learn_sigma`` layout with zero variance rows, which SiT's ``models.py`` builds by default.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dar_core.errors import CheckpointError, ConfigError
from dar_core.spec.config import TINY, ModelConfig, model_config
from dar_core.spec.schema import param_shapes

PREDICTIONS = ("velocity", "noise")
WEIGHT_KEYS = ("ema", "model")
VAE_DOWNSAMPLING = 8  # the SD VAE SiT and DiT train on: latents are image_size / 8 wide
FINAL = ("final_layer.linear.weight", "final_layer.linear.bias")
TABLE = "y_embedder.embedding_table.weight"


@dataclass
class ImportReport:
    """What ``import_state`` did to every key; ``lines()`` is what ``dar import`` prints."""

    source: str
    key: str  # where the weights came from: "ema", "model" or "state dict"
    key_note: str
    prediction: str
    prediction_evidence: str
    mapped: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # key prefixes removed, dtypes widened

    def lines(self) -> list[str]:
        out = [f"weights: {self.key} ({self.key_note})",
               f"prediction: {self.prediction} ({self.prediction_evidence})"]
        out += [f"changed: {r}" for r in self.changed]
        out += [f"mapped:  {k}" for k in self.mapped]
        out += [f"sliced:  {s}" for s in self.sliced]
        out += [f"added:   {a}" for a in self.added]
        out.append(f"{len(self.mapped)} mapped, {len(self.sliced)} sliced, "
                   f"{len(self.added)} added")
        return out

    def as_meta(self) -> dict[str, Any]:
        return {"imported_from": self.source, "weights": self.key,
                "prediction": self.prediction, "prediction_evidence": self.prediction_evidence,
                "sliced": self.sliced, "added": self.added, "changed": self.changed}


def pick_weights(obj: Any, key: str | None) -> tuple[dict[str, Any], str, str]:
    """``(state dict, where, note)`` from a loaded file: ``obj[key]``; by default ``ema``, then
    ``model``, then ``obj`` itself when it is a bare state dict (a released checkpoint)."""
    if key is not None and key not in WEIGHT_KEYS:
        raise ConfigError(f"--key must be one of {list(WEIGHT_KEYS)}, got {key!r}")
    if not isinstance(obj, dict):
        raise CheckpointError(f"the file holds a {type(obj).__name__}, expected a state dict "
                              "or a dict with 'ema'/'model' entries")
    wrapped = [k for k in WEIGHT_KEYS if isinstance(obj.get(k), dict)]
    if key is not None:
        if key in wrapped:
            return obj[key], key, "as asked"
        have = wrapped or "none: it is a bare state dict, used when --key is not given"
        raise CheckpointError(f"the file has no {key!r} weights (weight entries: {have})")
    if wrapped:
        k = wrapped[0]
        note = "the EMA weights" if k == "ema" else "the file has no 'ema' entry"
        return obj[k], k, note
    if obj and all(isinstance(k, str) for k in obj) and "args" not in obj:
        return obj, "state dict", "the file is a bare state dict (released checkpoints are EMA)"
    raise CheckpointError(f"found no weights: entries {sorted(map(str, obj))[:8]}, expected "
                          "'ema'/'model' or a bare state dict")


def strip_prefix(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix every key carries."""
    notes = []
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"stripped the prefix {prefix!r} from every key")
    return state, notes


def config_for(model: str, args: argparse.Namespace | None, image_size: int | None,
               num_classes: int | None) -> ModelConfig:
    """The residual ``ModelConfig`` of ``--model``; image size and class count from the flags,
    else from the file's ``args``, else the preset's (ImageNet 256: 32x32 latents, 1000)."""
    stored = getattr(args, "model", None)
    if isinstance(stored, str) and _arch(stored) != _arch(model):
        raise ConfigError(f"--model {model} does not match the checkpoint's args.model "
                          f"{stored!r}")
    image_size = image_size if image_size is not None else getattr(args, "image_size", None)
    num_classes = num_classes if num_classes is not None else getattr(args, "num_classes", None)
    over: dict[str, Any] = {}
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image size must be a positive integer, got {image_size!r}")
        if model in TINY:  # the tiny presets are pixel-space models
            over["input_size"] = image_size
        elif image_size % VAE_DOWNSAMPLING:
            raise ConfigError(f"image size {image_size} is not a multiple of "
                              f"{VAE_DOWNSAMPLING} (DiT/SiT model VAE latents, image_size/8)")
        else:
            over["input_size"] = image_size // VAE_DOWNSAMPLING
    if num_classes is not None:
        over["num_classes"] = num_classes
    return model_config(model, routing="residual", **over)


def _arch(name: str) -> str:
    """``SiT-XL/2`` and ``DiT-XL/2`` are the same architecture: compare ``XL/2``."""
    family, sep, rest = name.partition("-")
    return rest if sep and family in ("SiT", "DiT") else name


def prediction_of(args: argparse.Namespace | None, model: str, flag: str | None
                  ) -> tuple[str, str]:
    """``(prediction, evidence)``, refusing anything but velocity on SiT's linear path.

    Evidence, strongest first: SiT's stored transport args (``path_type``, ``prediction``),
    which a flag may not contradict; then ``--prediction``; then the family of ``args.model``
    or ``--model`` (DiT: DDPM noise prediction, SiT: velocity). Released checkpoints are bare
    state dicts, so for them the family name decides unless the flag says otherwise.
    """
    if flag is not None and flag not in PREDICTIONS:
        raise ConfigError(f"--prediction must be one of {list(PREDICTIONS)}, got {flag!r}")
    path_type = getattr(args, "path_type", None)
    if isinstance(path_type, str) and path_type.lower() != "linear":
        raise CheckpointError(f"the checkpoint was trained on SiT's {path_type!r} path; dar "
                              "models use the Linear interpolant x_t = t x + (1 - t) noise")
    recorded = getattr(args, "prediction", None)
    if isinstance(recorded, str):
        recorded = recorded.lower()
        if flag is not None and flag != recorded:
            raise ConfigError(f"--prediction {flag} contradicts the checkpoint's "
                              f"args.prediction={recorded!r}")
        pred, evidence = recorded, "args.prediction in the file"
    elif flag is not None:
        pred, evidence = flag, "--prediction"
    else:
        stored = getattr(args, "model", None)
        name, where = (stored, "args.model") if isinstance(stored, str) else (model, "--model")
        family = name.partition("-")[0]
        if family == "DiT":
            pred, evidence = "noise", f"{where} {name}: DiT trains DDPM noise prediction"
        elif family == "SiT":
            pred, evidence = "velocity", f"{where} {name}: SiT trains velocity prediction"
        else:
            raise ConfigError(f"cannot tell what the checkpoint predicts ({where} {name!r} is "
                              "neither DiT nor SiT, and the file records no prediction); pass "
                              "--prediction velocity if it is a velocity model")
    if pred != "velocity":
        raise CheckpointError(f"the checkpoint predicts {pred} ({evidence}); dar models "
                              "predict velocity on SiT's linear interpolant with t in [0, 1], "
                              "so it cannot be imported as one (pass --prediction velocity "
                              "only if it is in fact a velocity model)")
    return pred, evidence


def import_state(state: dict[str, np.ndarray], cfg: ModelConfig, report: ImportReport
                 ) -> dict[str, np.ndarray]:
    """The canonical parameters of residual ``cfg`` from a DiT/SiT state dict (NumPy arrays),
    with every key's fate appended to ``report``; the first problem is a CheckpointError."""
    if cfg.routing.is_dar:
        raise ConfigError("import_state builds a residual model; graft routing afterwards")
    shapes = param_shapes(cfg)
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise CheckpointError(f"unexpected key {extra[0]!r} (shape {tuple(state[extra[0]].shape)})"
                              f" not in {cfg.name}'s schema ({len(extra)} unexpected in total)")
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name not in state:
            raise CheckpointError(f"missing key {name!r} (expected shape {shape}) for "
                                  f"{cfg.name}")
        v = np.asarray(state[name])
        if tuple(v.shape) == shape:
            out[name] = v
            report.mapped.append(name)
        elif name in FINAL and v.shape[1:] == shape[1:] and v.shape[0] == 2 * shape[0]:
            out[name] = velocity_rows(v, cfg.patch_size, cfg.out_channels)
            report.sliced.append(f"{name} {tuple(v.shape)} -> {shape}: learn_sigma, kept the "
                                 f"velocity channels (first {cfg.out_channels} of "
                                 f"{2 * cfg.out_channels} per patch position)")
        elif name == TABLE and v.shape == (cfg.num_classes, cfg.hidden_size):
            out[name] = np.concatenate([v, v.mean(axis=0, keepdims=True)]).astype(v.dtype)
            report.added.append(f"{name} row {cfg.num_classes}: the null class (no label "
                                "dropout in training); set to the mean of the class rows")
        else:
            raise CheckpointError(f"key {name!r} has shape {tuple(v.shape)}, {cfg.name} expects "
                                  f"{shape}{_hint(name)}")
    return out


def _hint(name: str) -> str:
    if name == "pos_embed":
        return " (a different --image-size?)"
    if name == TABLE:
        return " (a different --num-classes?)"
    return " (a different --model?)"


def velocity_rows(w: np.ndarray, patch: int, channels: int) -> np.ndarray:
    """The final layer's velocity rows of a ``learn_sigma`` weight or bias ``[p*p*2C, ...]``."""
    per = w.reshape(patch * patch, 2 * channels, *w.shape[1:])  # [p*p, 2C, ...]
    return np.ascontiguousarray(per[:, :channels].reshape(patch * patch * channels,
                                                          *w.shape[1:]))


def export_state(params: dict[str, np.ndarray], cfg: ModelConfig, *, learn_sigma: bool = True
                 ) -> dict[str, np.ndarray]:
    """SiT's state dict of a residual model: the schema's names and arrays, with zero learned-
    variance rows interleaved in the final layer when ``learn_sigma`` (SiT's default build)."""
    if cfg.routing.is_dar:
        raise ConfigError(f"only residual models export to SiT (this one routes with DAR: "
                          f"query={cfg.routing.query!r}, chunk_size={cfg.routing.chunk_size}); "
                          "SiT's models.py has no routers")
    out = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in params.items()}
    if learn_sigma:
        pp, C = cfg.patch_size**2, cfg.out_channels
        for name in FINAL:
            v = out[name].reshape(pp, C, *out[name].shape[1:])  # [p*p, C, ...]
            out[name] = np.concatenate([v, np.zeros_like(v)], axis=1).reshape(
                pp * 2 * C, *v.shape[2:])
    return out
