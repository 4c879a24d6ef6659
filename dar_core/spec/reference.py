"""A float64 NumPy forward pass of the whole DARTransformer: the executable specification.

Read top to bottom: patch embedding, timestep/label conditioning, then for every sublayer
"aggregate the visible history -> LayerNorm -> adaLN modulate -> attention or MLP -> gate",
then the final aggregator and the final layer. ``residual`` mode is the same loop with the
aggregation replaced by a plain sum. Backends are checked against this function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dar_core.spec.config import LN_EPS, ModelConfig
from dar_core.spec.patches import patchify, unpatchify
from dar_core.spec.routing import route, source_sets
from dar_core.spec.routing import router_query as routing_query
from dar_core.spec.timestep import timestep_embedding
from dar_core.spec.validate import validate_inputs


def layer_norm(x: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    """LayerNorm over the last axis without affine parameters."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def modulate(x: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample shift/scale ``[B, d]``."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def linear(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def attention(x: np.ndarray, p: dict[str, np.ndarray], name: str, heads: int) -> np.ndarray:
    B, T, d = x.shape
    qkv = linear(x, p, f"{name}.qkv").reshape(B, T, 3, heads, d // heads)  # [B,T,3,H,hd]
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each [B, H, T, hd]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)  # [B, H, T, T]
    s = np.exp(s - s.max(-1, keepdims=True))
    a = s / s.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, d)  # [B, T, d]
    return linear(o, p, f"{name}.proj")


def mlp(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    return linear(gelu_tanh(linear(x, p, f"{name}.fc1")), p, f"{name}.fc2")


def router_query(cfg: ModelConfig, p: dict[str, np.ndarray], prefix: str,
                 t_emb: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """The query of the aggregator whose parameters start with ``prefix`` (docs/spec.md §3)."""
    return routing_query(cfg.routing.query, t_emb, prev, p.get(f"{prefix}.query"),
                         p.get(f"{prefix}.query_proj.weight"), p.get(f"{prefix}.time_gain"))


@dataclass
class Trace:
    """Intermediates of one forward pass (for tests and diagnostics)."""

    history: list[np.ndarray] = field(default_factory=list)  # v_0 .. v_L, each [B, T, d]
    inputs: list[np.ndarray] = field(default_factory=list)  # h_1 .. h_{L+1}, each [B, T, d]
    weights: list[np.ndarray] = field(default_factory=list)  # alpha per aggregator [N, B, T]
    sources: list[tuple[int, ...]] = field(default_factory=list)


def forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    x: Any,
    t: Any,
    y: Any,
    *,
    trace: Trace | None = None,
) -> np.ndarray:
    """Velocity ``[B, C, H, W]`` for images ``x`` ``[B, C, H, W]``, times ``t`` ``[B]`` in
    [0, 1] and integer labels ``y`` ``[B]`` (``num_classes`` is the null class), in float64."""
    x, t, y = validate_inputs(cfg, x, t, y)
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x, t = x.astype(np.float64), t.astype(np.float64)
    d, L = cfg.hidden_size, cfg.num_sublayers
    sets = source_sets(L, cfg.routing)

    tokens = patchify(x, cfg.patch_size)  # [B, T, C*p*p]
    w_patch = p["x_embedder.proj.weight"].reshape(d, -1)  # [d, C*p*p]
    v0 = tokens @ w_patch.T + p["x_embedder.proj.bias"] + p["pos_embed"]  # [B, T, d]
    t_freq = timestep_embedding(t)  # [B, 256]
    t_emb = linear(silu(linear(t_freq, p, "t_embedder.mlp.0")), p, "t_embedder.mlp.2")  # [B, d]
    y_emb = p["y_embedder.embedding_table.weight"][y]  # [B, d]
    c = silu(t_emb + y_emb)  # [B, d], the adaLN conditioning (SiLU is adaLN_modulation.0)

    history = [v0]

    def aggregate(agg: int, prefix: str) -> np.ndarray:
        """Input of aggregator ``agg`` (0-indexed) from the visible history."""
        idx = sets[agg]
        if not cfg.routing.is_dar:
            h = np.sum([history[i] for i in idx], axis=0)  # residual stream
            w = np.ones((len(idx),) + h.shape[:-1])
        else:
            q = router_query(cfg, p, prefix, t_emb, history[-1])
            stacked = np.stack([history[i] for i in idx])  # [N, B, T, d]
            h, w = route(stacked, q, p[f"{prefix}.norm.weight"], eps=cfg.routing.norm_eps)
        if trace is not None:
            trace.inputs.append(h)
            trace.weights.append(w)
            trace.sources.append(idx)
        return h

    for i in range(cfg.depth):
        b = f"blocks.{i}"
        mod = linear(c, p, f"{b}.adaLN_modulation.1")  # [B, 6d]
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = np.split(mod, 6, axis=-1)
        h = aggregate(2 * i, f"{b}.attn_router")  # [B, T, d]
        v = g_a[:, None] * attention(modulate(layer_norm(h), sh_a, sc_a), p, f"{b}.attn",
                                     cfg.num_heads)
        history.append(v)
        h = aggregate(2 * i + 1, f"{b}.mlp_router")  # [B, T, d]
        v = g_m[:, None] * mlp(modulate(layer_norm(h), sh_m, sc_m), p, f"{b}.mlp")
        history.append(v)

    h = aggregate(L, "final_router")  # [B, T, d]
    shift, scale = np.split(linear(c, p, "final_layer.adaLN_modulation.1"), 2, axis=-1)
    out = linear(modulate(layer_norm(h), shift, scale), p, "final_layer.linear")  # [B,T,p*p*C]
    if trace is not None:
        trace.history = history
    return unpatchify(out, cfg.patch_size, cfg.out_channels)  # [B, C, H, W]
