"""The diffusers ``AutoencoderKL`` that ``dar prepare --vae`` encodes images with.

Latents are the **mean of the posterior**, not a sample: the encoding is then a pure
function of the image (a resumed or multi-process run writes byte-identical shards), and
the posterior of the Stable Diffusion VAE is so narrow that a sample differs from its mean
by far less than the noise the diffusion model adds. The stored value is
``(mean - shift_factor) * scaling_factor`` from the VAE's config (``shift_factor`` is None,
i.e. 0, for the SD VAEs; ``scaling_factor`` 0.18215), in float16; decoding inverts it:
``vae.decode(x / scale + shift)``.

The VAE's identity, recorded in the manifest, is its path (or hub id), the SHA-256 of its
config (as JSON with sorted keys, without the diffusers version) and of its weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import ConfigError, InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _torch_device(device: str) -> Any:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a torch device ({e})") from None


def config_sha256(config: dict[str, Any]) -> str:
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=list).encode()).hexdigest()


def weights_sha256(folder: Path) -> str | None:
    """SHA-256 over the names and bytes of the weight files of a local VAE folder."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


class VAEEncoder:
    """A loaded ``AutoencoderKL``: ``encode(uint8 [B, 3, H, W]) -> float16 latents``."""

    def __init__(self, path: str, device: str = "auto") -> None:
        try:
            import torch
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ConfigError(f"--vae needs diffusers and torch ({e}): "
                              "pip install 'dar-core[vae,torch]'") from None
        local = Path(path)
        if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise InputError(f"--vae {path!r}: no such folder (expected a diffusers "
                             "AutoencoderKL saved with save_pretrained, or a hub id org/name)")
        if local.exists() and not (local / "config.json").is_file():
            raise InputError(f"--vae {path!r}: no config.json in it; expected a folder "
                             "written by AutoencoderKL.save_pretrained")
        try:
            vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
        except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError ...
            msg = str(e).replace("\n", " ")[:300]
            raise InputError(f"--vae {path!r}: could not load an AutoencoderKL "
                             f"({type(e).__name__}: {msg})") from None
        self.device = _torch_device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self._torch = torch
        cfg = dict(vae.config)
        self.scale = float(cfg.get("scaling_factor") or 1.0)
        shift = cfg.get("shift_factor")
        self.shift = None if shift is None else float(shift)
        self.downsample = 2 ** (len(cfg.get("block_out_channels", [0])) - 1)
        self.latent_channels = int(cfg["latent_channels"])
        self.identity = {
            "class": type(vae).__name__,
            "path": str(local.resolve()) if local.exists() else path,
            "config_sha256": config_sha256(cfg),
            "weights_sha256": weights_sha256(local) if local.is_dir() else None,
            "posterior": "mean",
            "scaling_factor": self.scale,
            "shift_factor": self.shift,
        }

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise InputError(f"--image-size {image_size} is not divisible by the VAE's "
                             f"downsampling factor {self.downsample}")
        s = image_size // self.downsample
        return (self.latent_channels, s, s)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """``uint8 [B, 3, H, W]`` -> ``float16 [B, C, H/f, W/f]`` scaled latents."""
        torch = self._torch
        x = torch.from_numpy(pixels).to(self.device, torch.float32) / 127.5 - 1.0
        with torch.inference_mode():
            mean = self.vae.encode(x).latent_dist.mean
        if self.shift is not None:
            mean = mean - self.shift
        return (mean * self.scale).to(torch.float16).cpu().numpy()


class VAEDecoder:
    """Latents a model sampled -> images: ``decode(x / scale + shift)`` with the VAE the data
    was encoded with (``__call__(float [B, C, h, w]) -> float32 [B, 3, H, W]`` in [-1, 1]);
    ``scale=None`` takes the scale and shift from the VAE's config.

    ``expect`` is the manifest's VAE identity: a VAE whose config differs from it is refused
    (it would decode other latents than the model learned)."""

    def __init__(self, path: str, scale: float | None, shift: float | None = None,
                 device: str = "auto", expect: dict[str, Any] | None = None,
                 batch_size: int = 32) -> None:
        self._enc = VAEEncoder(path, device=device)
        if scale is None:  # the VAE's own config (what dar prepare stores)
            scale, shift = self._enc.scale, self._enc.shift
        want = (expect or {}).get("config_sha256")
        got = self._enc.identity["config_sha256"]
        if want and want != got:
            raise InputError(f"VAE {path!r} has config sha256 {got[:12]}..., but the data was "
                             f"encoded with {want[:12]}...: pass the VAE the data was "
                             "prepared with")
        self.scale, self.shift, self.batch_size = float(scale), shift, int(batch_size)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        torch, vae = self._enc._torch, self._enc.vae
        out = []
        for i in range(0, len(latents), self.batch_size):
            z = torch.from_numpy(np.array(latents[i:i + self.batch_size], np.float32))
            z = z.to(self._enc.device)
            z = z / self.scale + (self.shift or 0.0)
            with torch.inference_mode():
                out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 3, 0, 0), np.float32)


def decoder_for_data(data: str, vae: str | None = None,
                     device: str = "auto") -> VAEDecoder | None:
    """The decoder of a run's ``data``: a ``dar prepare`` latent dataset names its VAE in the
    manifest (``vae`` overrides the path, e.g. where the VAE sits elsewhere on this machine);
    None for pixel data and the procedural set."""
    from dar_core.io.data.shards import MANIFEST, read_manifest

    path = Path(data)
    if data != "procedural" and not path.exists() and vae:
        # trained on a folder this machine does not have: the VAE's own config gives the
        # scale ``dar prepare`` stored the latents with
        dec = VAEDecoder(vae, scale=None, device=device)
        print(f"dar: data {data!r} is not on this machine; decoding with --vae {vae!r} and "
              f"its scaling_factor {dec.scale:g} (its identity is not checked against the "
              "data's manifest)", file=sys.stderr)
        return dec
    if data == "procedural" or not (path.name == MANIFEST or (path / MANIFEST).is_file()):
        if vae:
            raise ConfigError(f"--vae {vae!r} was given but data {data!r} holds no VAE latents")
        return None
    m = read_manifest(path)
    if m.get("kind") != "latents":
        return None
    ident = m.get("vae") or {}
    where = vae or ident.get("path")
    if not where:
        raise InputError(f"{path}: latent manifest names no VAE; pass --vae")
    return VAEDecoder(where, scale=m.get("latent_scale") or 1.0, shift=m.get("latent_shift"),
                      device=device, expect=ident)
