"""The FID InceptionV3 (TF graph ``classify_image_graph_def.pb`` of 2015-12-05) in PyTorch,
weights from a local file.

This is the network every FID table since Heusel et al. uses, the one ADM's evaluator runs
in TensorFlow. Its PyTorch port (pytorch-fid, torch-fidelity) ships the converted weights as
``pt_inception-2015-12-05-6726825d.pth``: a plain state dict under torchvision's module names,
read here with ``torch.load(weights_only=True)`` (no pickled code), or the same tensors as a
``.safetensors`` file. The module is written for those names; the differences from
torchvision's ``Inception3`` are the TF graph's: average pools that exclude the padding, a
max pool in the last block's pool branch, BatchNorm eps 1e-3, 1008 output classes.

Input is uint8 ``[N, H, W, 3]``, the ADM npz layout. As in the TF graph, images are resized
to 299 x 299 with TF1's ``ResizeBilinear`` (``align_corners=False``, no half-pixel offset:
source coordinate ``dst * in / out``), then scaled by ``(x - 128) / 128``.

Outputs: ``pool`` (``pool_3``, 2048, for FID and precision/recall), ``spatial`` (ADM's sFID
features: the first 7 channels of ``mixed_6/conv``, i.e. ``Mixed_6d.branch1x1``, 17 x 17,
flattened in TF's HWC order: 2023) and ``logits`` (1008, without the bias: the
``softmax/logits/MatMul`` that ADM's Inception Score uses).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import ConfigError, InputError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash in the file name (torch hub's convention)
WEIGHTS_ENV = "DAR_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7


def user_cache() -> Path:
    """``~/.cache/dar``: the Inception weights and the cached reference statistics."""
    return Path.home() / ".cache" / "dar"


def default_weights_path() -> Path:
    """``$DAR_INCEPTION_WEIGHTS``, else ``~/.cache/dar/pt_inception-2015-12-05-6726825d.pth``."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else user_cache() / WEIGHTS_FILE


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ConfigError(f"dar fid needs torch ({e}): pip install 'dar-core[fid]'") from None
    return torch


def build_inception() -> Any:
    """The FID InceptionV3 as a ``torch.nn.Module`` with randomly initialized weights."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class BasicConv2d(nn.Module):
        def __init__(self, cin: int, cout: int, **kw: Any) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x: Any) -> Any:
            return F.relu(self.bn(self.conv(x)))

    def avg(x: Any) -> Any:  # TF's 3x3 SAME average pool: the padding is not counted
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class InceptionA(nn.Module):
        def __init__(self, cin: int, pool: int) -> None:
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

        def forward(self, x: Any) -> Any:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg(x))], 1)

    class InceptionB(nn.Module):  # 35x35 -> 17x17
        def __init__(self, cin: int) -> None:
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x: Any) -> Any:
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)

    class InceptionC(nn.Module):
        def __init__(self, cin: int, c7: int) -> None:
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x: Any) -> Any:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for i in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{i}")(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg(x))], 1)

    class InceptionD(nn.Module):  # 17x17 -> 8x8
        def __init__(self, cin: int) -> None:
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x: Any) -> Any:
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    class InceptionE(nn.Module):
        def __init__(self, cin: int, max_pool: bool) -> None:
            super().__init__()
            self.max_pool = max_pool  # TF's mixed_10 pools with max, not average
            self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x: Any) -> Any:
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
            return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)

    class FIDInceptionV3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.Mixed_5b = InceptionA(192, 32)
            self.Mixed_5c = InceptionA(256, 64)
            self.Mixed_5d = InceptionA(288, 64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = InceptionC(768, 128)
            self.Mixed_6c = InceptionC(768, 160)
            self.Mixed_6d = InceptionC(768, 160)
            self.Mixed_6e = InceptionC(768, 192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = InceptionE(1280, max_pool=False)
            self.Mixed_7c = InceptionE(2048, max_pool=True)
            self.fc = nn.Linear(2048, 1008)

        def forward(self, x: Any) -> tuple[Any, Any, Any]:
            """``x`` float ``[N, 3, 299, 299]`` in [-1, 1] -> (pool, spatial, logits)."""
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [N, 64, 147²]
            x = F.max_pool2d(x, 3, stride=2)  # [N, 64, 73, 73]
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # 192, 35²
            x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [N, 288, 35, 35]
            x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # [N, 768, 17, 17]
            spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # [N, 7, 17, 17]
            x = self.Mixed_6e(self.Mixed_6d(x))  # [N, 768, 17, 17]
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [N, 2048, 8, 8]
            pool = x.mean(dim=(2, 3))  # [N, 2048]
            logits = pool @ self.fc.weight.T  # [N, 1008], no bias (ADM's IS)
            return pool, spatial.permute(0, 2, 3, 1).flatten(1), logits  # spatial: HWC order

    return FIDInceptionV3()


def tf1_resize_bilinear(x: Any, size: int) -> Any:
    """TF1 ``ResizeBilinear`` (``align_corners=False``, ``half_pixel_centers=False``) of
    float ``[N, C, H, W]`` to ``[N, C, size, size]``: output pixel ``o`` samples the input at
    ``o * in / size``, the two neighbours clamped to the edge."""
    torch = _torch()

    def axis(n_in: int) -> tuple[Any, Any, Any]:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    h_lo, h_hi, h_w = axis(x.shape[2])
    w_lo, w_hi, w_w = axis(x.shape[3])
    dev = x.device
    top, bot = x[:, :, h_lo.to(dev)], x[:, :, h_hi.to(dev)]
    rows = top + (bot - top) * h_w.to(dev)[:, None]  # [N, C, size, W]
    left, right = rows[..., w_lo.to(dev)], rows[..., w_hi.to(dev)]
    return left + (right - left) * w_w.to(dev)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures:
    """Loaded FID Inception: ``__call__(uint8 [N, H, W, 3]) -> dict`` of float32 ``pool``
    ``[N, 2048]``, ``spatial`` ``[N, 2023]``, ``logits`` ``[N, 1008]``."""

    def __init__(self, path: str | os.PathLike[str] | None = None, device: str = "auto",
                 batch_size: int = 100) -> None:
        torch = _torch()
        self.path = Path(path) if path else default_weights_path()
        if not self.path.is_file():
            raise InputError(f"InceptionV3 weights not found at {str(self.path)!r}: expected "
                             f"the FID Inception file {WEIGHTS_FILE} (pytorch-fid / "
                             "torch-fidelity release asset); pass --inception PATH or set "
                             f"${WEIGHTS_ENV}")
        state = self._read(self.path)
        model = build_inception()
        # BatchNorm's step counter is not a weight (files from older torch lack it)
        want = {k: v for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
        missing = sorted(set(want) - set(state))
        extra = sorted(k for k in set(state) - set(want) if not k.endswith("num_batches_tracked"))
        if missing or extra:
            raise InputError(f"{str(self.path)!r} is not an FID InceptionV3 state dict "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for k, v in want.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise InputError(f"{str(self.path)!r}: tensor {k!r} has shape "
                                 f"{list(state[k].shape)}, expected {list(v.shape)}")
        model.load_state_dict({k: state[k].to(v.dtype) for k, v in want.items()}, strict=False)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.sha256 = file_sha256(self.path)
        self.standard = self.sha256.startswith(WEIGHTS_SHA256_PREFIX)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        torch = _torch()
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # a torch, zip or safetensors reader error
            raise InputError(f"cannot read InceptionV3 weights {str(path)!r} "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(state, dict):
            raise InputError(f"{str(path)!r} holds a {type(state).__name__}, expected a "
                             "state dict of tensors")
        return state

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = _torch()
        a = np.asarray(images)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8 or len(a) == 0:
            raise InputError(f"Inception input must be uint8 [N>0, H, W, 3], got {a.dtype} "
                             f"{list(a.shape)}")
        out: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
        flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        try:  # float32 convolutions and matmuls, as in the TF graph (no TF32 on Ampere+)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            with torch.inference_mode():
                for i in range(0, len(a), self.batch_size):
                    x = torch.from_numpy(np.array(a[i:i + self.batch_size], order="C"))
                    x = x.to(self.device).permute(0, 3, 1, 2).float()  # [B, 3, H, W], 0..255
                    x = (tf1_resize_bilinear(x, 299) - 128.0) / 128.0  # [B, 3, 299, 299]
                    for k, v in zip(out, self.model(x)):
                        out[k].append(v.float().cpu().numpy())
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        return {k: np.concatenate(v) for k, v in out.items()}
