"""An independent plain residual DiT forward (NumPy, float64), written the way DiT's
``models.py`` reads: ``x = x + gate * attn(modulate(norm(x)))``. Residual mode of every
backend must compute this function."""

from __future__ import annotations

import numpy as np

# Every primitive is written here from DiT's definitions, with none of the core reference's
# code, so that a mistake shared by the reference and the backends cannot hide.


def _ln(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:  # LayerNorm, no affine
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def _silu(x: np.ndarray) -> np.ndarray:
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))  # x * sigmoid(x)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _lin(x: np.ndarray, p: dict, name: str) -> np.ndarray:  # nn.Linear: weight [out, in]
    return np.einsum("...i,oi->...o", x, p[f"{name}.weight"]) + p[f"{name}.bias"]


def _mod(x: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x * (1.0 + scale[:, None]) + shift[:, None]


def _t_embed(t: np.ndarray, dim: int = 256, max_period: float = 10000.0) -> np.ndarray:
    half = dim // 2
    freqs = np.exp(-np.log(max_period) * np.arange(half) / half)
    return np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=-1)


def _patch_embed(x: np.ndarray, w: np.ndarray, b: np.ndarray, ps: int) -> np.ndarray:
    """Conv2d(C, d, kernel ps, stride ps), flattened to tokens in row-major (h, w) order."""
    g = x.shape[2] // ps
    return np.stack([np.einsum("bcij,dcij->bd", x[:, :, r * ps:(r + 1) * ps,
                                                  c * ps:(c + 1) * ps], w) + b
                     for r in range(g) for c in range(g)], axis=1)


def _unpatch(x: np.ndarray, ps: int, ch: int) -> np.ndarray:
    """DiT's unpatchify: token (r, c)'s features are (i, j, channel) of its ps x ps patch."""
    g = int(round(np.sqrt(x.shape[1])))
    out = np.zeros((x.shape[0], ch, g * ps, g * ps))
    for n in range(g * g):
        r, c = divmod(n, g)
        out[:, :, r * ps:(r + 1) * ps, c * ps:(c + 1) * ps] = \
            x[:, n].reshape(-1, ps, ps, ch).transpose(0, 3, 1, 2)
    return out


def _attn(x: np.ndarray, p: dict, name: str, heads: int) -> np.ndarray:
    B, T, d = x.shape
    q, k, v = np.split(_lin(x, p, f"{name}.qkv"), 3, axis=-1)  # each [B, T, d]
    q, k, v = (a.reshape(B, T, heads, d // heads) for a in (q, k, v))
    s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(d // heads)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return _lin(np.einsum("bhqk,bkhe->bqhe", a, v).reshape(B, T, d), p, f"{name}.proj")


def _mlp(x: np.ndarray, p: dict, name: str) -> np.ndarray:
    return _lin(_gelu_tanh(_lin(x, p, f"{name}.fc1")), p, f"{name}.fc2")


def dit_forward(p: dict, cfg, x: np.ndarray, t: np.ndarray, y: np.ndarray, *,
                mean_inputs: bool = False) -> np.ndarray:
    """The plain DiT. ``mean_inputs`` feeds every sublayer (and the final layer) the stream
    divided by the number of outputs summed into it, ``LayerNorm(sum / n)``: what dense DAR
    with zero queries computes (docs/spec.md §7)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    h = _patch_embed(x.astype(np.float64), p["x_embedder.proj.weight"], p["x_embedder.proj.bias"],
                     cfg.patch_size) + p["pos_embed"]
    temb = _lin(_silu(_lin(_t_embed(t.astype(np.float64)), p, "t_embedder.mlp.0")), p,
                "t_embedder.mlp.2")
    c = _silu(temb + p["y_embedder.embedding_table.weight"][y])
    n = (lambda k: k + 1) if mean_inputs else (lambda k: 1)  # outputs summed before sublayer k
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        sa, ca, ga, sm, cm, gm = np.split(_lin(c, p, f"{b}.adaLN_modulation.1"), 6, axis=-1)
        h = h + ga[:, None] * _attn(_mod(_ln(h / n(2 * i)), sa, ca), p, f"{b}.attn",
                                    cfg.num_heads)
        h = h + gm[:, None] * _mlp(_mod(_ln(h / n(2 * i + 1)), sm, cm), p, f"{b}.mlp")
    shift, scale = np.split(_lin(c, p, "final_layer.adaLN_modulation.1"), 2, axis=-1)
    out = _lin(_mod(_ln(h / n(2 * cfg.depth)), shift, scale), p, "final_layer.linear")
    return _unpatch(out, cfg.patch_size, cfg.out_channels)
