"""The canonical parameter schema: one flat ``name -> shape`` table for any config.

Names follow DiT/SiT (``x_embedder.proj.weight`` [d, C, p, p], ``blocks.{i}.attn.qkv.weight``,
``final_layer.linear.weight``, ...) so a DiT/SiT state dict imports without renaming; Linear
weights are ``[out, in]``. DAR adds one router per aggregator:

- ``blocks.{i}.attn_router.*`` feeds sublayer ``2i+1``, ``blocks.{i}.mlp_router.*`` sublayer
  ``2i+2``, ``final_router.*`` the final layer;
- ``*.norm.weight`` [d] (RMSNorm of the keys), and the query: ``*.query`` [d] for ``static``
  and ``static_t``, ``*.query_proj.weight`` [d, d] for ``dynamic``; ``*.time_gain`` [1] only
  with ``routing.time_gain`` (``static_t``), so other schemas are unchanged.

``pos_embed`` [1, T, d] is a fixed sin-cos buffer (not trained), kept in the schema as DiT
keeps it in its state dict.
"""

from __future__ import annotations

import math

import numpy as np

from dar_core.spec.config import ModelConfig
from dar_core.spec.timestep import FREQUENCY_DIM

NON_TRAINABLE = frozenset({"pos_embed"})


def router_prefixes(cfg: ModelConfig) -> list[str]:
    """Router name prefixes in aggregator order (sublayer 1..L, then the final layer)."""
    if not cfg.routing.is_dar:
        return []
    per_block = [f"blocks.{i}.{kind}_router" for i in range(cfg.depth) for kind in ("attn", "mlp")]
    return per_block + ["final_router"]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer of the model, in a fixed order."""
    d, C, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
    s: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, cfg.num_tokens, d),
        "x_embedder.proj.weight": (d, C, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, FREQUENCY_DIM),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, d),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        s.update({
            f"{b}.attn.qkv.weight": (3 * d, d),
            f"{b}.attn.qkv.bias": (3 * d,),
            f"{b}.attn.proj.weight": (d, d),
            f"{b}.attn.proj.bias": (d,),
            f"{b}.mlp.fc1.weight": (cfg.mlp_hidden, d),
            f"{b}.mlp.fc1.bias": (cfg.mlp_hidden,),
            f"{b}.mlp.fc2.weight": (d, cfg.mlp_hidden),
            f"{b}.mlp.fc2.bias": (d,),
            f"{b}.adaLN_modulation.1.weight": (6 * d, d),
            f"{b}.adaLN_modulation.1.bias": (6 * d,),
        })
    s.update({
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (p * p * cfg.out_channels, d),
        "final_layer.linear.bias": (p * p * cfg.out_channels,),
    })
    for r in router_prefixes(cfg):
        s[f"{r}.norm.weight"] = (d,)
        if cfg.routing.query == "dynamic":
            s[f"{r}.query_proj.weight"] = (d, d)
        else:
            s[f"{r}.query"] = (d,)
        if cfg.routing.time_gain:
            s[f"{r}.time_gain"] = (1,)
    return s


def trainable_names(cfg: ModelConfig) -> list[str]:
    return [n for n in param_shapes(cfg) if n not in NON_TRAINABLE]


def count_params(cfg: ModelConfig, *, trainable_only: bool = True) -> int:
    shapes = param_shapes(cfg)
    return sum(math.prod(v) for k, v in shapes.items()
               if not (trainable_only and k in NON_TRAINABLE))


def pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos position embedding ``[grid*grid, dim]`` (float64).

    Half of the channels encode the column coordinate, half the row; each half is
    ``[sin(pos w), cos(pos w)]`` with ``w = 10000 ** (-k / (dim/4))``.
    """
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)  # [T, dim/4]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [T, dim/2]

    coords = np.arange(grid_size, dtype=np.float64)
    cols, rows = np.meshgrid(coords, coords)  # cols varies along the last axis
    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


def _xavier(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def init_params(cfg: ModelConfig, seed: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """DiT's initialization plus DAR's (docs/spec.md §3), in NumPy.

    Xavier-uniform Linear and patch-embedding weights with zero biases; N(0, 0.02) label table
    and timestep-MLP weights; zero adaLN modulations and final layer (adaLN-Zero); fixed
    sin-cos ``pos_embed``. Routers: zero query (``query`` or ``query_proj``), RMSNorm weight 1,
    time gain 1 (``routing.time_gain``: the paper's ``w + e(t)`` at init), so routing starts
    uniform. For ``static_t`` the last timestep Linear is zero as well, so
    the routing query's ``e(t)`` starts at 0.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(cfg).items():
        if name == "pos_embed":
            v = pos_embed_2d(cfg.hidden_size, cfg.grid_size)[None]
        elif "_router." in name or name.startswith("final_router."):
            unit = name.endswith(("norm.weight", ".time_gain"))
            v = np.ones(shape) if unit else np.zeros(shape)
        elif "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            v = np.zeros(shape)
        elif name.startswith("t_embedder.") and name.endswith("weight"):
            v = rng.normal(0.0, 0.02, size=shape)
        elif name == "y_embedder.embedding_table.weight":
            v = rng.normal(0.0, 0.02, size=shape)
        elif name.endswith(".bias"):
            v = np.zeros(shape)
        else:
            v = _xavier(rng, shape)
        out[name] = v.astype(dtype)
    if cfg.routing.is_dar and cfg.routing.query == "static_t":
        out["t_embedder.mlp.2.weight"][...] = 0
        out["t_embedder.mlp.2.bias"][...] = 0
    return out


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.5,
                  dtype: type = np.float64) -> dict[str, np.ndarray]:
    """Dense random parameters (no zero init) for numerical tests: every path is exercised.

    Weights are N(0, scale / sqrt(fan_in)); RMSNorm weights near 1; ``pos_embed`` is the fixed
    sin-cos table.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(cfg).items():
        if name == "pos_embed":
            v = pos_embed_2d(cfg.hidden_size, cfg.grid_size)[None]
        elif name.endswith("norm.weight"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            v = 0.1 * rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) * scale / math.sqrt(math.prod(shape[1:]))
        out[name] = v.astype(dtype)
    return out


def check_params(cfg: ModelConfig, params: dict[str, np.ndarray], *, where: str = "params") -> None:
    """Raise CheckpointError naming the first missing/unexpected key or mismatched shape."""
    from dar_core.errors import CheckpointError

    expected = param_shapes(cfg)
    for name, shape in expected.items():
        if name not in params:
            raise CheckpointError(f"{where}: missing parameter {name!r} (expected shape {shape})")
        got = tuple(params[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{where}: parameter {name!r} has shape {got}, the config expects {shape}"
            )
    extra = [k for k in params if k not in expected]
    if extra:
        raise CheckpointError(
            f"{where}: unexpected parameter {extra[0]!r} (shape {tuple(params[extra[0]].shape)})"
            f" not in the schema of this config ({len(extra)} unexpected in total)"
        )
