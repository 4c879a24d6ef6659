"""DARTransformer in JAX: pure functions over a flat ``name -> array`` parameter dict.

The parameter tree IS the canonical core schema (``dar_core.spec.schema.param_shapes``): a core
checkpoint's ``params`` or ``ema`` dict loads with ``DARTransformer.load`` and nothing else.
Read top to bottom: patch + timestep + label embedding, then per DiTBlock two sublayers that
each read the routing state (``routing.History``), then the FinalLayer. Compute runs in the dtype of
the parameters (float32, or bfloat16 for ``precision="bf16"``); normalization statistics,
softmaxes and routing logits are taken in at least float32 (``acc_dtype``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dar_core.errors import ConfigError
from dar_core.spec.config import LN_EPS, ModelConfig
from dar_core.spec.config import ROUTING_IMPLS as CORE_IMPLS
from dar_core.spec.patches import patchify, unpatchify
from dar_core.spec.routing import router_query
from dar_core.spec.schema import check_params, init_params, router_prefixes
from dar_core.spec.timestep import timestep_embedding, timestep_frequencies
from dar_core.spec.validate import check_shapes, check_values

from .routing import FusedHistory, History, NaiveHistory, ResidualStream, resolve_impl, slices_of

# the core's, and "naive" (tests); fused: the Pallas kernel (pallas_route.py)
ROUTING_IMPLS = (*CORE_IMPLS, "naive")

_FREQS = timestep_frequencies()  # [128] float64, cast to the accumulation dtype when used


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype statistics are taken in: float32 for bfloat16/float32, float64 stays."""
    return jnp.promote_types(dtype, jnp.float32)


def layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm over the last axis, no affine parameters, statistics in ``acc_dtype``."""
    xa = x.astype(acc_dtype(x.dtype))
    mu = jnp.mean(xa, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xa - mu), axis=-1, keepdims=True)
    return ((xa - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``[B, d]`` shift and scale."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def linear(p: dict, name: str, x: jax.Array) -> jax.Array:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def attention(p: dict, name: str, x: jax.Array, heads: int) -> jax.Array:
    B, T, d = x.shape
    qkv = linear(p, f"{name}.qkv", x).reshape(B, T, 3, heads, d // heads)  # [B, T, 3, H, hd]
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each [B, H, T, hd]
    s = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=acc_dtype(x.dtype))  # [B,H,T,T]
    a = jax.nn.softmax(s / math.sqrt(d // heads), axis=-1).astype(x.dtype)  # [B, H, T, T]
    o = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, d)  # [B, T, d]
    return linear(p, f"{name}.proj", o)  # [B, T, d]


def mlp(p: dict, name: str, x: jax.Array) -> jax.Array:
    hidden = jax.nn.gelu(linear(p, f"{name}.fc1", x), approximate=True)  # [B, T, mlp_hidden]
    return linear(p, f"{name}.fc2", hidden)  # [B, T, d]


def embed(p: dict, cfg: ModelConfig, x: jax.Array, t: jax.Array,
          y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``v_0`` ``[B, T, d]``, the timestep embedding ``e(t)`` ``[B, d]`` and the adaLN
    conditioning ``c = SiLU(e(t) + y_emb)`` ``[B, d]``."""
    d, dtype = cfg.hidden_size, p["x_embedder.proj.weight"].dtype
    tokens = patchify(x.astype(dtype), cfg.patch_size)  # [B, T, C*p*p]
    w_patch = p["x_embedder.proj.weight"].reshape(d, -1)  # [d, C*p*p] (conv k=p, stride p)
    v0 = tokens @ w_patch.T + p["x_embedder.proj.bias"] + p["pos_embed"]  # [B, T, d]
    acc = acc_dtype(dtype)
    t_freq = timestep_embedding(t.astype(acc), freqs=jnp.asarray(_FREQS, acc))  # [B, 256]
    t_hidden = jax.nn.silu(linear(p, "t_embedder.mlp.0", t_freq.astype(dtype)))  # [B, d]
    t_emb = linear(p, "t_embedder.mlp.2", t_hidden)  # [B, d]
    y_emb = p["y_embedder.embedding_table.weight"][y]  # [B, d]
    return v0, t_emb, jax.nn.silu(t_emb + y_emb)  # c: [B, d]


# Rematerialized sublayers (``grad_checkpoint``): activations inside attention / MLP are
# recomputed in the backward pass instead of stored.
_attention_remat = jax.checkpoint(attention, static_argnums=(1, 3))
_mlp_remat = jax.checkpoint(mlp, static_argnums=(1,))


def aggregate(p: dict, cfg: ModelConfig, state, k: int, prefix: str | None,
              t_emb: jax.Array) -> jax.Array:
    """Input ``[B, T, d]`` of aggregator ``k``: routed by the router at ``prefix`` (DAR) or the
    running sum (residual, ``prefix`` is None)."""
    if prefix is None:
        return state.read(k, None, None)
    q = router_query(cfg.routing.query, t_emb, state.newest, p.get(f"{prefix}.query"),
                     p.get(f"{prefix}.query_proj.weight"),
                     p.get(f"{prefix}.time_gain"))  # [d] | [B, 1, d] | [B, T, d]
    return state.read(k, q, p[f"{prefix}.norm.weight"])


def dit_block(p: dict, cfg: ModelConfig, i: int, c: jax.Array, t_emb: jax.Array, state,
              remat: bool = False) -> None:
    """Block ``i``: sublayers ``2i+1`` (attention) and ``2i+2`` (MLP). Each reads its input
    from the routing state and writes its gated output ``v_l`` back to it."""
    attn_fn, mlp_fn = (_attention_remat, _mlp_remat) if remat else (attention, mlp)
    b = f"blocks.{i}"
    mod = jnp.split(linear(p, f"{b}.adaLN_modulation.1", c), 6, axis=-1)  # 6 x [B, d]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    attn_router, mlp_router = ((f"{b}.attn_router", f"{b}.mlp_router") if cfg.routing.is_dar
                               else (None, None))
    h = aggregate(p, cfg, state, 2 * i, attn_router, t_emb)  # [B, T, d]
    h = modulate(layer_norm(h), shift_msa, scale_msa)  # [B, T, d]
    state.write(gate_msa[:, None, :] * attn_fn(p, f"{b}.attn", h, cfg.num_heads))
    h = aggregate(p, cfg, state, 2 * i + 1, mlp_router, t_emb)  # [B, T, d]
    h = modulate(layer_norm(h), shift_mlp, scale_mlp)  # [B, T, d]
    state.write(gate_mlp[:, None, :] * mlp_fn(p, f"{b}.mlp", h))


def final_layer(p: dict, cfg: ModelConfig, h: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(linear(p, "final_layer.adaLN_modulation.1", c), 2, axis=-1)
    h = modulate(layer_norm(h), shift, scale)  # [B, T, d]
    out = linear(p, "final_layer.linear", h)  # [B, T, p*p*C]
    return unpatchify(out, cfg.patch_size, cfg.out_channels)  # [B, C, H, W]


def new_state(cfg: ModelConfig, v0: jax.Array, routing_impl: str = "auto"):
    """The routing state of one forward pass, holding ``v_0`` ``[B, T, d]``."""
    if routing_impl not in ROUTING_IMPLS:
        raise ConfigError(f"routing_impl must be one of {list(ROUTING_IMPLS)}, "
                          f"got {routing_impl!r}")
    if not cfg.routing.is_dar:
        impl = ResidualStream
    else:
        impl = {"naive": NaiveHistory, "fused": FusedHistory}.get(
            resolve_impl(routing_impl, v0.dtype), History)
    return impl(v0, slices_of(cfg.num_sublayers, cfg.routing), cfg.routing.norm_eps)


def forward(p: dict, cfg: ModelConfig, x: jax.Array, t: jax.Array, y: jax.Array,
            routing_impl: str = "auto", remat: bool = False) -> jax.Array:
    """Velocity ``[B, C, H, W]`` (float32, or float64 for float64 parameters). Pure and
    jit-able: no validation here.

    ``routing_impl``: ``"history"`` (per-source ops), ``"fused"`` (the Pallas kernel,
    interpreted on the CPU), ``"auto"`` (the kernel on a GPU or TPU once it passed its
    self-check, ``routing.fused_checked``; ``"history"`` on the CPU), ``"naive"`` (the core's
    four-pass ``route``, tests);
    ``remat`` recomputes sublayer internals in the backward pass."""
    v0, t_emb, c = embed(p, cfg, x, t, y)  # [B, T, d], [B, d], [B, d]
    state = new_state(cfg, v0, routing_impl)
    for i in range(cfg.depth):
        dit_block(p, cfg, i, c, t_emb, state, remat)  # writes v_{2i+1}, v_{2i+2}
    final = router_prefixes(cfg)[-1] if cfg.routing.is_dar else None
    h = aggregate(p, cfg, state, cfg.num_sublayers, final, t_emb)  # [B, T, d]
    return final_layer(p, cfg, h, c).astype(acc_dtype(v0.dtype))  # [B, C, H, W]


# One jitted forward for every model: compiled once per (config, shapes, dtypes), so a new
# DARTransformer or velocity_model of a config already seen (e.g. each sample grid during
# training) reuses the executable.
forward_jit = jax.jit(forward, static_argnums=(1,), static_argnames=("routing_impl", "remat"))


def cast(params: dict, dtype: jnp.dtype) -> dict:
    """Every floating parameter in ``dtype`` (e.g. bfloat16 compute copies)."""
    return {k: v.astype(dtype) for k, v in params.items()}


class DARTransformer:
    """The model of a ``ModelConfig``; parameters live outside, in a flat dict pytree.

    - ``init(seed)``: DiT/DAR initialization from the core, as ``jnp`` float32 arrays;
    - ``load_weights(weights)``: a checkpoint's ``params``/``ema`` dict, checked against the
      schema, as the parameter dict; ``export_weights(params)``: back to float32 NumPy;
    - ``apply(params, x, t, y)``: the pure forward, for use inside ``jax.jit``/``grad``;
    - ``__call__(params, x, t, y)``: validates shapes, values and parameter names at the
      boundary (host-side), then runs the jitted forward (``forward_jit``).
    """

    def __init__(self, config: ModelConfig):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a dar_core ModelConfig, got {type(config).__name__}")
        self.config = config

    def init(self, seed: int = 0) -> dict[str, jax.Array]:
        return {k: jnp.asarray(v) for k, v in init_params(self.config, seed).items()}

    def load_weights(self, weights: dict, dtype: jnp.dtype = jnp.float32) -> dict[str, jax.Array]:
        check_params(self.config, weights, where="weights")
        return {k: jnp.asarray(np.asarray(v, dtype=np.float32), dtype=dtype)
                for k, v in weights.items()}

    def export_weights(self, params: dict) -> dict[str, np.ndarray]:
        """Every schema name -> float32 NumPy array (host copies), checked against the schema."""
        check_params(self.config, params, where="params")
        return {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in params.items()}

    def apply(self, params: dict, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        return forward(params, self.config, x, t, y)

    def __call__(self, params: dict, x, t, y) -> jax.Array:
        check_params(self.config, params, where="params")
        x, t, y = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
        validate(self.config, x, t, y)
        return forward_jit(params, self.config, x, t, y)

    def __repr__(self) -> str:
        return f"DARTransformer({self.config})"


def validate(cfg: ModelConfig, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
    """The core's input checks, fed host scalars reduced here (never inside traced code)."""
    check_shapes(cfg, x.shape, t.shape, y.shape)
    y_is_int = jnp.issubdtype(y.dtype, jnp.integer)
    reduced = jax.device_get(_reductions(x, t, y if y_is_int else y.astype(jnp.int32)))
    x_finite, t_min, t_max, y_min, y_max = reduced  # one host transfer
    check_values(cfg, x_finite=bool(x_finite), t_min=float(t_min), t_max=float(t_max),
                 y_min=int(y_min), y_max=int(y_max), y_is_int=bool(y_is_int))


@jax.jit
def _reductions(x: jax.Array, t: jax.Array, y: jax.Array):
    return jnp.isfinite(x).all(), t.min(), t.max(), y.min(), y.max()
