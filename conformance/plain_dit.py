"""An independent plain residual DiT forward (NumPy, float64), written the way DiT's
``models.py`` reads: ``x = x + gate * attn(modulate(norm(x)))``. Residual mode of every
backend must compute this function."""

from __future__ import annotations

import numpy as np

from dar_core.spec.reference import (
    attention,
    layer_norm,
    linear,
    mlp,
    modulate,
    patchify,
    silu,
    unpatchify,
)
from dar_core.spec.timestep import timestep_embedding


def dit_forward(p: dict, cfg, x: np.ndarray, t: np.ndarray, y: np.ndarray, *,
                mean_inputs: bool = False) -> np.ndarray:
    """The plain DiT. ``mean_inputs`` feeds every sublayer (and the final layer) the stream
    divided by the number of outputs summed into it, ``LayerNorm(sum / n)``: what dense DAR
    with zero queries computes (docs/spec.md §7)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    d = cfg.hidden_size
    h = patchify(x.astype(np.float64), cfg.patch_size) @ p["x_embedder.proj.weight"].reshape(
        d, -1).T + p["x_embedder.proj.bias"] + p["pos_embed"]
    temb = linear(silu(linear(timestep_embedding(t.astype(np.float64)), p, "t_embedder.mlp.0")),
                  p, "t_embedder.mlp.2")
    c = silu(temb + p["y_embedder.embedding_table.weight"][y])
    n = (lambda k: k + 1) if mean_inputs else (lambda k: 1)  # outputs summed before sublayer k
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        sa, ca, ga, sm, cm, gm = np.split(linear(c, p, f"{b}.adaLN_modulation.1"), 6, axis=-1)
        h = h + ga[:, None] * attention(modulate(layer_norm(h / n(2 * i)), sa, ca), p,
                                        f"{b}.attn", cfg.num_heads)
        h = h + gm[:, None] * mlp(modulate(layer_norm(h / n(2 * i + 1)), sm, cm), p,
                                  f"{b}.mlp")
    shift, scale = np.split(linear(c, p, "final_layer.adaLN_modulation.1"), 2, axis=-1)
    out = linear(modulate(layer_norm(h / n(2 * cfg.depth)), shift, scale), p,
                 "final_layer.linear")
    return unpatchify(out, cfg.patch_size, cfg.out_channels)
