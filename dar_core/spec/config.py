"""Model and routing configuration: sizes as data, one routing switch, loud validation.

A ``ModelConfig`` fully determines the parameter schema and the forward pass. It is stored as
JSON inside every checkpoint, so it holds only plain values (no callables, no argparse).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dar_core.errors import ConfigError

ROUTING_MODES = ("residual", "dar")
QUERY_VARIANTS = ("static", "static_t", "dynamic")
# How a backend computes the routing (docs/spec.md §8.2), never what: "history" (per-source
# framework ops, every backend), "fused" (one-pass kernel: Triton in torch, Pallas in JAX),
# "auto" (the fused kernel on an accelerator where it passes its self-check, else "history").
# Backends also take "naive" (the four-pass reference, for tests).
ROUTING_IMPLS = ("auto", "history", "fused")

# DiT / SiT sizes: name -> (depth, hidden_size, num_heads). Patch sizes 2, 4, 8.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)

# Tiny presets that train on a CPU in minutes (16x16 or 32x32 RGB procedural data).
TINY: dict[str, dict[str, int]] = {
    "tiny": dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, input_size=16),
    "small": dict(depth=6, hidden_size=128, num_heads=4, patch_size=2, input_size=16),
    "micro": dict(depth=2, hidden_size=32, num_heads=2, patch_size=4, input_size=8),
    # tiny's width at 12, 16 and 24 blocks: the depth study's presets (benchmarks/README.md)
    "deep": dict(depth=12, hidden_size=64, num_heads=4, patch_size=2, input_size=16),
    "deep16": dict(depth=16, hidden_size=64, num_heads=4, patch_size=2, input_size=16),
    "deep24": dict(depth=24, hidden_size=64, num_heads=4, patch_size=2, input_size=16),
}

# LayerNorm eps (no affine) of every DiT sublayer and of the final layer, in every backend
# (framework defaults differ: torch and MLX use 1e-5). docs/spec.md §6.4.
LN_EPS = 1e-6


@dataclass(frozen=True)
class RoutingConfig:
    """How each sublayer reads the history of sublayer outputs (docs/spec.md §2-§4).

    ``mode="residual"`` is the plain DiT/SiT stream (h_l = sum of all earlier outputs);
    ``mode="dar"`` is a softmax mix over the visible sources. ``chunk_size=1`` is dense DAR.
    ``final_aggregator=True`` feeds the final layer from the chunk summaries plus the raw
    outputs of the last chunk; ``False`` (the paper's ablation arm) from the chunk summaries
    alone, the last chunk's summary included.

    ``time_gain=True`` (``static_t`` only) gives every router a learned scalar gain on the
    timestep term, ``q_l = w_l + g_l e(t)`` (``<router>.time_gain`` ``[1]``): 1 from scratch,
    0 after a graft onto a pretrained model, so the graft starts function-preserving
    (docs/spec.md §3.1). Off by default: the paper's ``w_l + e(t)`` with no extra parameter.
    """

    mode: str = "dar"
    query: str = "static_t"
    chunk_size: int = 4
    final_aggregator: bool = True
    norm_eps: float = 1e-6
    time_gain: bool = False

    def __post_init__(self) -> None:
        _one_of("routing.mode", self.mode, ROUTING_MODES)
        _one_of("routing.query", self.query, QUERY_VARIANTS)
        _positive_int("routing.chunk_size", self.chunk_size)
        _check_type("routing.final_aggregator", self.final_aggregator, bool)
        _check_type("routing.time_gain", self.time_gain, bool)
        if self.time_gain and self.query != "static_t":
            raise ConfigError(f"routing.time_gain=True needs query='static_t' (the only query "
                              f"with a timestep term), got query={self.query!r}")
        if not (isinstance(self.norm_eps, float) and 0.0 < self.norm_eps < 1.0):
            raise ConfigError(
                f"routing.norm_eps must be a float in (0, 1), got {self.norm_eps!r}"
            )

    @property
    def is_dar(self) -> bool:
        return self.mode == "dar"



# Upper bounds on sizes, checked before anything is built from a config (a checkpoint header
# that says depth=1e8 would otherwise allocate its schema for minutes). They sit far above
# every published DiT/SiT (XL: depth 28, width 1152, 256x256 images at patch 2, 1000 classes).
MAX_SIZES = {"depth": 1024, "hidden_size": 65536, "num_heads": 1024, "patch_size": 64,
             "input_size": 8192, "in_channels": 1024, "num_classes": 1_000_000}


@dataclass(frozen=True)
class ModelConfig:
    """A DiT/SiT with optional DAR routing. Output channels equal input channels (velocity)."""

    depth: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    patch_size: int = 2
    input_size: int = 16
    in_channels: int = 3
    num_classes: int = 10
    mlp_ratio: float = 4.0
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("depth", "hidden_size", "num_heads", "patch_size", "input_size",
                  "in_channels", "num_classes"):
            _positive_int(f, getattr(self, f))
            if getattr(self, f) > MAX_SIZES[f]:
                raise ConfigError(f"{f}={getattr(self, f)} is above the supported "
                                  f"{MAX_SIZES[f]} (a corrupt or crafted config?)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ConfigError(
                f"hidden_size={self.hidden_size} must be a multiple of 4 "
                "(the 2-D sin-cos position embedding splits it in quarters)"
            )
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}"
            )
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ConfigError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if isinstance(self.routing, dict):  # tolerate JSON round trips
            object.__setattr__(self, "routing", RoutingConfig(**self.routing))
        _check_type("routing", self.routing, RoutingConfig)

    # Derived sizes ---------------------------------------------------------------------
    @property
    def num_sublayers(self) -> int:
        """L = 2 * depth (one attention and one MLP sublayer per block)."""
        return 2 * self.depth

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (classifier-free guidance) class."""
        return self.num_classes

    def replace(self, **changes: Any) -> ModelConfig:
        routing = changes.pop("routing", self.routing)
        if isinstance(routing, dict):
            routing = dataclasses.replace(self.routing, **routing)
        return dataclasses.replace(self, routing=routing, **changes)

    # Serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; allowed: {sorted(known)}")
        if "routing" in d and isinstance(d["routing"], dict):
            rk = {f.name for f in dataclasses.fields(RoutingConfig)}
            bad = sorted(set(d["routing"]) - rk)
            if bad:
                raise ConfigError(f"unknown routing field(s) {bad}; allowed: {sorted(rk)}")
            d["routing"] = RoutingConfig(**d["routing"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> ModelConfig:
        return cls.from_dict(json.loads(s))


def preset_names() -> list[str]:
    """Every named preset: ``SiT-S/2`` ... ``SiT-XL/8`` (``DiT-*`` aliases too) and tiny ones."""
    names = [f"SiT-{s}/{p}" for s in SIZES for p in PATCH_SIZES]
    return names + list(TINY)


def model_config(
    name: str,
    routing: RoutingConfig | str | None = None,
    **overrides: Any,
) -> ModelConfig:
    """Build a config from a preset name (``"SiT-XL/2"``, ``"DiT-B/4"``, ``"tiny"``).

    ``routing`` may be a RoutingConfig, ``"residual"`` or ``"dar"``; ``overrides`` replace any
    other ModelConfig field (e.g. ``input_size=32``, ``num_classes=1000``).
    """
    if name in TINY:
        base: dict[str, Any] = dict(TINY[name])
    else:
        family, _, rest = name.partition("-")
        size, _, patch = rest.partition("/")
        if family not in ("SiT", "DiT") or size not in SIZES or not patch.isdigit() \
                or int(patch) not in PATCH_SIZES:
            raise ConfigError(f"unknown model preset {name!r}; expected one of {preset_names()}")
        depth, hidden, heads = SIZES[size]
        # ImageNet 256 latents: 32x32x4, 1000 classes.
        base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch),
                    input_size=32, in_channels=4, num_classes=1000)
    if routing is None:
        routing = RoutingConfig()
    elif isinstance(routing, str):
        routing = RoutingConfig(mode=routing)
    base.update(overrides)
    return ModelConfig(name=name, routing=routing, **base)


# Validation helpers ----------------------------------------------------------------------
def _one_of(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field_name} must be one of {list(allowed)}, got {value!r}")


def _positive_int(field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field_name} must be a positive integer, got {value!r}")


def _check_type(field_name: str, value: Any, typ: type) -> None:
    if not isinstance(value, typ):
        raise ConfigError(
            f"{field_name} must be a {typ.__name__}, got {value!r} ({type(value).__name__})"
        )
