"""A small image classifier for the procedural dataset, run in pure NumPy.

There is nothing to download (no Inception weights, no network access), so sample quality is
measured with an evaluator trained on the procedural data itself and shipped with the package
(``dar_core/evaluation/assets/evaluator-{16,32}.safetensors``, written by
``benchmarks/train_evaluator.py``). Why it is shaped this way:

* **Full-resolution first layer.** A class is a shape x texture pair and the textures are one-
  or two-pixel patterns (checker, stripes, dots). The first 3x3 convolution runs at stride 1 so
  that detail reaches the features before any downsampling; later layers halve the resolution
  until a global average pool leaves a ``feature_dim`` vector (128) that mixes the coarse
  (shape) and fine (texture) evidence. Fréchet distance and KID are computed on that vector.
* **Three heads on one feature vector.** A linear head over every class of the dataset (24,
  so one evaluator serves models trained on any ``num_classes <= 24``: class ``c`` means the
  same shape/texture pair for every ``num_classes``) and one linear head per factor, so a
  sample can be scored as "right shape, wrong texture".
* **NumPy only, float32.** The core never imports a framework. A convolution is an im2col
  (nine strided copies) followed by one matmul, over chunks of images so memory stays
  bounded; batch-norm statistics were folded into the convolution weights when the file was
  written, so inference is conv + bias + GELU (tanh form) and nothing else.
* **The file describes itself.** The architecture (channels, strides), the factor tables, the
  dataset parameters, the training steps and the held-out accuracy are in the safetensors
  metadata, and the tensors are checked against the architecture when loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import CheckpointError, ConfigError, InputError
from dar_core.io.data.procedural import IMAGE_SIZES, MAX_CLASSES, SHAPES, TEXTURES

FORMAT = "dar-evaluator"
VERSION = 1
ACTIVATION = "gelu_tanh"
FACTORS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "texture": TEXTURES}

# Convolution widths and strides per image size. Every layer is a 3x3 convolution with
# padding 1; the last one's channels are the feature dimension. At 32 px one more stride-2
# layer keeps the receptive field a similar fraction of the image as at 16 px.
ARCHITECTURES: dict[int, dict[str, tuple[int, ...]]] = {
    16: {"channels": (24, 48, 96, 128), "strides": (1, 2, 2, 2)},
    32: {"channels": (24, 32, 48, 96, 128), "strides": (1, 2, 2, 2, 2)},
}

# Pixels per im2col chunk (images x H x W): keeps the largest temporary, the second
# layer's im2col matrix, near 8 MB, where allocation stays cheap and the data stays in cache.
_CHUNK_PIXELS = 32768


@dataclass(frozen=True)
class EvaluatorSpec:
    """The evaluator's architecture and label tables: everything needed to shape its tensors."""

    image_size: int
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_classes: int = MAX_CLASSES
    factor_names: tuple[str, ...] = tuple(FACTORS)
    factor_values: tuple[tuple[str, ...], ...] = tuple(FACTORS.values())

    def __post_init__(self) -> None:
        if self.image_size not in IMAGE_SIZES:
            raise ConfigError(f"image_size must be one of {IMAGE_SIZES}, got {self.image_size!r}")
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ConfigError(
                f"channels {self.channels} and strides {self.strides} must be non-empty and "
                "of equal length")
        if any(s not in (1, 2) for s in self.strides):
            raise ConfigError(f"strides must be 1 or 2, got {self.strides}")
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ConfigError(f"num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")
        if len(self.factor_names) != len(self.factor_values):
            raise ConfigError(
                f"{len(self.factor_names)} factor names but {len(self.factor_values)} value lists")

    @classmethod
    def default(cls, image_size: int) -> EvaluatorSpec:
        """The shipped architecture for ``image_size`` (16 or 32)."""
        if image_size not in ARCHITECTURES:
            raise ConfigError(
                f"image_size must be one of {tuple(ARCHITECTURES)}, got {image_size!r}")
        arch = ARCHITECTURES[image_size]
        return cls(image_size=image_size, channels=arch["channels"], strides=arch["strides"])

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape. Conv weights are ``[out, in, 3, 3]``, Linear ``[out, in]``."""
        shapes: dict[str, tuple[int, ...]] = {}
        c_in = 3
        for i, c_out in enumerate(self.channels):
            shapes[f"conv.{i}.weight"] = (c_out, c_in, 3, 3)
            shapes[f"conv.{i}.bias"] = (c_out,)
            c_in = c_out
        heads = {"class": self.num_classes}
        heads.update({n: len(v) for n, v in zip(self.factor_names, self.factor_values)})
        for name, n_out in heads.items():
            shapes[f"head.{name}.weight"] = (n_out, self.feature_dim)
            shapes[f"head.{name}.bias"] = (n_out,)
        return shapes

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "version": str(VERSION),
            "activation": ACTIVATION,
            "image_size": str(self.image_size),
            "num_classes": str(self.num_classes),
            "channels": json.dumps(list(self.channels)),
            "strides": json.dumps(list(self.strides)),
            "factors": json.dumps({n: list(v) for n, v in zip(self.factor_names,
                                                              self.factor_values)}),
        }

    @classmethod
    def from_metadata(cls, md: dict[str, str], where: str = "evaluator") -> EvaluatorSpec:
        if md.get("format") != FORMAT:
            raise CheckpointError(
                f"{where} is not a dar evaluator file (format {md.get('format')!r}, "
                f"expected {FORMAT!r})")
        if md.get("version") != str(VERSION) or md.get("activation") != ACTIVATION:
            raise CheckpointError(
                f"{where}: unsupported evaluator version {md.get('version')!r} / activation "
                f"{md.get('activation')!r} (this code reads version {VERSION}, {ACTIVATION})")
        try:
            factors = json.loads(md["factors"])
            return cls(
                image_size=int(md["image_size"]),
                channels=tuple(int(c) for c in json.loads(md["channels"])),
                strides=tuple(int(s) for s in json.loads(md["strides"])),
                num_classes=int(md["num_classes"]),
                factor_names=tuple(factors),
                factor_values=tuple(tuple(v) for v in factors.values()),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: unreadable evaluator metadata ({e!r})") from e


@dataclass
class EvaluatorOutputs:
    """One forward pass: ``features [N, F]`` (float64), ``logits [N, num_classes]`` and
    ``factor_logits`` (factor name -> ``[N, n_values]``)."""

    features: np.ndarray
    logits: np.ndarray
    factor_logits: dict[str, np.ndarray]


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (``torch.nn.GELU(approximate="tanh")``), as a new array.

    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, evaluated in place on one temporary
    (the first layer's activations are the largest array of the forward pass).
    """
    c = math.sqrt(2.0 / math.pi)
    u = x * x
    u *= 0.044715 * c
    u += c
    u *= x  # sqrt(2/pi) (x + 0.044715 x^3)
    np.tanh(u, out=u)
    u += 1.0
    u *= x
    u *= 0.5
    return u


def conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """3x3 convolution with zero padding 1 on channels-last input, as im2col + one matmul.

    ``x [N, H, W, C]``, ``weight [O, C, 3, 3]`` (PyTorch layout, cross-correlation),
    ``bias [O]`` -> ``[N, ceil(H / stride), ceil(W / stride), O]``. The im2col matrix is laid
    out ``(kh, kw, c)``: each of the nine taps is one copy of a strided view of the padded
    input, moving whole channel vectors (a ``(c, kh, kw)`` layout would move single floats).
    """
    n, h, w, c = x.shape
    o = weight.shape[0]
    ho, wo = -(-h // stride), -(-w // stride)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # [N, H+2, W+2, C]
    cols = np.empty((n, ho, wo, 9, c), dtype=x.dtype)  # [N, Ho, Wo, taps, C]
    for kh in range(3):
        for kw in range(3):
            cols[:, :, :, 3 * kh + kw] = xp[:, kh:kh + stride * ho:stride,
                                            kw:kw + stride * wo:stride]
    w_mat = weight.transpose(0, 2, 3, 1).reshape(o, 9 * c)  # [O, (kh, kw, C)]
    out = cols.reshape(n * ho * wo, 9 * c) @ w_mat.T  # [N*Ho*Wo, O]
    out += bias
    return out.reshape(n, ho, wo, o)


class Evaluator:
    """The procedural-data evaluator. Build with :meth:`load` (shipped weights) or from a
    parameter dict. Inputs are ``[N, 3, H, W]`` float images in [-1, 1]; values outside are
    clipped, as they would be when written to an image file."""

    def __init__(self, spec: EvaluatorSpec, params: dict[str, np.ndarray],
                 metadata: dict[str, str] | None = None, source: str = "<memory>") -> None:
        expected = spec.param_shapes()
        for name, shape in expected.items():
            if name not in params:
                raise CheckpointError(f"{source}: missing tensor {name!r} (expected {shape})")
            got = tuple(np.shape(params[name]))
            if got != shape:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {got}, the architecture expects "
                    f"{shape}")
        extra = sorted(set(params) - set(expected))
        if extra:
            raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r}")
        self.spec = spec
        self.metadata = dict(metadata or {})
        self.source = source
        self._p = {k: np.ascontiguousarray(params[k], dtype=np.float32) for k in expected}

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, image_size: int = 16, path: str | PathLike[str] | None = None) -> Evaluator:
        """The shipped evaluator for ``image_size``, or the file at ``path``."""
        if path is None:
            if image_size not in IMAGE_SIZES:
                raise ConfigError(
                    f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
            return _load_shipped(int(image_size))
        ev = cls.from_file(path)
        if ev.image_size != image_size:
            raise ConfigError(
                f"{str(path)!r} is an evaluator for {ev.image_size} px images, "
                f"not image_size={image_size}")
        return ev

    @classmethod
    def from_file(cls, path: str | PathLike[str]) -> Evaluator:
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"no evaluator weights file at {str(p)!r}")
        return cls.from_bytes(p.read_bytes(), source=str(p))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Evaluator:
        """Parse a safetensors evaluator file's contents (tensors + metadata)."""
        md = _safetensors_metadata(data, source)
        spec = EvaluatorSpec.from_metadata(md, where=repr(source))
        try:
            import safetensors.numpy as stn
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the evaluator needs safetensors: pip install 'dar-core[tools]'") \
                from e
        ev = cls(spec, stn.load(data), md, source=source)
        ev.metadata["sha256"] = hashlib.sha256(data).hexdigest()
        return ev

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def factor_values(self) -> dict[str, list[str]]:
        return {n: list(v) for n, v in zip(self.spec.factor_names, self.spec.factor_values)}

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._p.items()}

    def __repr__(self) -> str:
        return (f"Evaluator(image_size={self.image_size}, num_classes={self.num_classes}, "
                f"feature_dim={self.feature_dim}, source={self.source!r})")

    # ------------------------------------------------------------------ inference
    def outputs(self, images: Any) -> EvaluatorOutputs:
        """Features, class logits and factor logits in one pass."""
        x = self._check_images(images)
        n = x.shape[0]
        feats = np.empty((n, self.feature_dim), np.float32)
        chunk = max(1, _CHUNK_PIXELS // (self.image_size * self.image_size))
        for s in range(0, n, chunk):
            feats[s:s + chunk] = self._trunk(x[s:s + chunk])
        logits = self._head("class", feats)
        factor_logits = {name: self._head(name, feats) for name in self.spec.factor_names}
        return EvaluatorOutputs(feats.astype(np.float64), logits, factor_logits)

    def features(self, images: Any) -> np.ndarray:
        """``[N, feature_dim]`` float64: the pooled activations Fréchet distance/KID use."""
        return self.outputs(images).features

    def logits(self, images: Any) -> np.ndarray:
        """``[N, num_classes]`` float64 class logits."""
        return self.outputs(images).logits

    def factor_logits(self, images: Any) -> dict[str, np.ndarray]:
        """Factor name -> ``[N, n_values]`` float64 logits."""
        return self.outputs(images).factor_logits

    def _trunk(self, x: np.ndarray) -> np.ndarray:
        h = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # [n, H, W, 3]
        for i, stride in enumerate(self.spec.strides):
            h = gelu_tanh(conv3x3(h, self._p[f"conv.{i}.weight"], self._p[f"conv.{i}.bias"],
                                  stride))  # [n, H_i, W_i, C_i]
        return h.mean(axis=(1, 2))  # [n, F]

    def _head(self, name: str, feats: np.ndarray) -> np.ndarray:
        w, b = self._p[f"head.{name}.weight"], self._p[f"head.{name}.bias"]
        return (feats @ w.T + b).astype(np.float64)  # [N, n_out]

    def _check_images(self, images: Any) -> np.ndarray:
        x = np.asarray(images)
        size = self.image_size
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(
                f"images must be [N, 3, {size}, {size}] (RGB, channels first), got shape "
                f"{list(x.shape)}")
        if x.shape[2:] != (size, size):
            raise InputError(
                f"this evaluator takes {size}x{size} images, got {x.shape[2]}x{x.shape[3]} "
                f"(shape {list(x.shape)}); use Evaluator.load(image_size={x.shape[2]})"
                if x.shape[2] == x.shape[3] else
                f"this evaluator takes {size}x{size} images, got shape {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(
                f"images must be floating point in [-1, 1], got dtype {x.dtype} "
                "(convert uint8 with x / 127.5 - 1)")
        if x.shape[0] == 0:
            raise InputError("images is empty (N = 0)")
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise InputError(f"images contain {bad} non-finite values (NaN or inf)")
        return np.clip(x.astype(np.float32, copy=False), -1.0, 1.0)


def _safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` block of a safetensors file's header."""
    if len(data) < 8:
        raise CheckpointError(f"{source!r} is not a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise CheckpointError(f"{source!r} is not a safetensors file (header size {n})")
    try:
        head = json.loads(data[8:8 + n])
    except ValueError as e:
        raise CheckpointError(f"{source!r} has an unreadable safetensors header") from e
    return dict(head.get("__metadata__") or {})


def weights_path(image_size: int) -> Path:
    """Where the shipped weights for ``image_size`` live (inside the installed package)."""
    return Path(str(resources.files("dar_core.evaluation").joinpath("assets",
                                                         f"evaluator-{image_size}.safetensors")))


@cache
def _load_shipped(image_size: int) -> Evaluator:
    path = weights_path(image_size)
    if not path.is_file():
        raise CheckpointError(
            f"no shipped evaluator weights for image_size={image_size} at {str(path)!r}; "
            f"create them with: python benchmarks/train_evaluator.py --image-size {image_size}")
    return Evaluator.from_file(path)
