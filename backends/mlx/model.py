"""DARTransformer for MLX: a DiT/SiT whose residual additions are replaced by DAR routing.

Parameter names are exactly ``dar_core.spec.schema.param_shapes(config)`` (DiT's names plus one
router per aggregator), so ``model.load_weights(list(weights.items()))`` with a core checkpoint
converted to ``mx.array`` works, and ``load_weights`` does the conversion and checks for you.
``pos_embed`` is a frozen array: it is saved and loaded under its name but never trained.

The public ``__call__`` takes ``x [B, C, H, W]``, ``t [B]`` in [0, 1] and integer ``y [B]``
(``num_classes`` = null class), checks them with ``dar_core.spec.validate`` and calls ``forward``,
the unchecked path the compiled training step uses. Internally tokens are ``[B, T, d]``.
Weights stay float32; ``dtype=mx.bfloat16`` computes in bf16 (every Linear casts its weight to
the activation dtype) while routing softmax, LayerNorm statistics and the loss stay float32.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from dar_core.errors import ConfigError
from dar_core.spec.config import LN_EPS, ModelConfig
from dar_core.spec.patches import patchify, unpatchify
from dar_core.spec.routing import router_query, source_slices
from dar_core.spec.schema import NON_TRAINABLE, check_params, init_params, param_shapes
from dar_core.spec.timestep import FREQUENCY_DIM, timestep_embedding, timestep_frequencies
from dar_core.spec.validate import check_shapes, check_values

from .routing import History, NaiveHistory, ResidualStream

# dar_core.spec.config.ROUTING_IMPLS without "fused" (README.md, "No fused Metal kernel"),
# and "naive"; "auto" is "history" here
ROUTING_IMPLS = ("auto", "history", "naive")


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``[B, d]`` shift and scale."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x: mx.array) -> mx.array:
    """LayerNorm over the last axis without affine parameters, eps 1e-6."""
    return mx.fast.layer_norm(x, None, None, LN_EPS)


class Linear(nn.Module):
    """``x @ W^T + b`` with ``W [out, in]``; the weight is cast to the activation dtype."""

    def __init__(self, din: int, dout: int, bias: bool = True):
        super().__init__()
        self.weight = mx.zeros((dout, din))
        if bias:
            self.bias = mx.zeros((dout,))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(x.dtype)
        if "bias" in self:
            return mx.addmm(self.bias.astype(x.dtype), x, w.T)
        return x @ w.T


class PatchProj(nn.Module):
    """The weights of a ``p x p`` stride-``p`` convolution: ``weight [d, C, p, p]``, ``bias``."""

    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.weight = mx.zeros((hidden, in_channels, patch, patch))
        self.bias = mx.zeros((hidden,))


class PatchEmbed(nn.Module):
    """The patch convolution written as patchify + one matmul (the same function)."""

    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = PatchProj(in_channels, hidden, patch)

    def __call__(self, x: mx.array) -> mx.array:
        d = self.proj.weight.shape[0]
        x = patchify(x, self.patch)  # [B, T, C*p*p], features (c, i, j)
        w = self.proj.weight.reshape(d, -1).astype(x.dtype)  # [d, C*p*p], (c, i, j) order
        return mx.addmm(self.proj.bias.astype(x.dtype), x, w.T)  # [B, T, d]


class TimestepEmbedder(nn.Module):
    """The core's sinusoid of raw ``t`` in [0, 1] -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = [Linear(FREQUENCY_DIM, hidden), nn.SiLU(), Linear(hidden, hidden)]
        self._freqs = mx.array(timestep_frequencies().astype(np.float32))  # not a parameter

    def __call__(self, t: mx.array, dtype: mx.Dtype) -> mx.array:
        f = timestep_embedding(t.astype(mx.float32), freqs=self._freqs)  # [B, 256]
        h = self.mlp[0](f.astype(dtype))  # [B, d]
        return self.mlp[2](nn.silu(h))  # [B, d]


class LabelEmbedder(nn.Module):
    """One row per class plus the null (classifier-free guidance) class at ``num_classes``."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def __call__(self, y: mx.array) -> mx.array:
        return self.embedding_table(y)  # [B, d]


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(hidden, 3 * hidden)
        self.proj = Linear(hidden, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, hd)  # [B, T, 3, H, hd]
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each [B, H, T, hd]
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(hd))  # [B,H,T,hd]
        return self.proj(o.transpose(0, 2, 1, 3).reshape(B, T, d))  # [B, T, d]


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = Linear(hidden, mlp_hidden)
        self.fc2 = Linear(mlp_hidden, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu_tanh(self.fc1(x)))  # [B, T, d]


class Router(nn.Module):
    """One aggregator's parameters: the key RMSNorm weight and the query (docs/spec.md §3)."""

    def __init__(self, hidden: int, query: str, eps: float, time_gain: bool = False):
        super().__init__()
        self.kind = query
        self.norm = nn.RMSNorm(hidden, eps=eps)  # only its weight is used: folded into q
        if query == "dynamic":
            self.query_proj = Linear(hidden, hidden, bias=False)
        else:
            self.query = mx.zeros((hidden,))
        if time_gain:  # w + g e(t) (docs/spec.md §3.1); absent: the paper's w + e(t)
            self.time_gain = mx.ones((1,))

    def raw_query(self, t_emb: mx.array, newest: mx.array) -> mx.array:
        """``q_l(t)``: ``[d]``, ``[B, 1, d]`` or ``[B, T, d]`` (docs/spec.md §3)."""
        if self.kind == "dynamic":
            w = self.query_proj.weight.astype(newest.dtype)  # the Linears' compute dtype
            return router_query(self.kind, t_emb, newest, query_proj=w)
        return router_query(self.kind, t_emb, newest, query=self.query,
                            time_gain=self.get("time_gain"))


def aggregate(router: Router | None, hist, k: int, t_emb: mx.array) -> mx.array:
    """Input of aggregator ``k`` ``[B, T, d]``: routed (DAR) or the running sum (residual)."""
    if router is None:
        return hist.read(k, None, None)
    return hist.read(k, router.raw_query(t_emb, hist.newest), router.norm.weight)


class DiTBlock(nn.Module):
    """Attention and MLP sublayers, each reading its input from the history (docs/spec.md §2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, r = cfg.hidden_size, cfg.routing
        self.attn = Attention(d, cfg.num_heads)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.adaLN_modulation = [nn.SiLU(), Linear(d, 6 * d)]
        if r.is_dar:
            self.attn_router = Router(d, r.query, r.norm_eps, r.time_gain)
            self.mlp_router = Router(d, r.query, r.norm_eps, r.time_gain)

    def __call__(self, hist, k: int, c: mx.array, t_emb: mx.array, checkpoint: bool) -> None:
        """Run sublayers ``k+1`` and ``k+2`` (aggregators ``k``, ``k+1``); ``c`` is SiLU'd."""
        mod = self.adaLN_modulation[1](c)  # [B, 6d]
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = mx.split(mod, 6, axis=-1)  # each [B, d]
        attn = nn.utils.checkpoint(self.attn) if checkpoint else self.attn
        mlp = nn.utils.checkpoint(self.mlp) if checkpoint else self.mlp
        h = aggregate(self.get("attn_router"), hist, k, t_emb)  # [B, T, d]
        hist.write(g_a[:, None, :] * attn(modulate(layer_norm(h), sh_a, sc_a)))  # v: [B, T, d]
        h = aggregate(self.get("mlp_router"), hist, k + 1, t_emb)  # [B, T, d]
        hist.write(g_m[:, None, :] * mlp(modulate(layer_norm(h), sh_m, sc_m)))  # v: [B, T, d]


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = [nn.SiLU(), Linear(hidden, 2 * hidden)]
        self.linear = Linear(hidden, patch * patch * out_channels)

    def __call__(self, h: mx.array, c: mx.array) -> mx.array:
        shift, scale = mx.split(self.adaLN_modulation[1](c), 2, axis=-1)  # each [B, d]
        return self.linear(modulate(layer_norm(h), shift, scale))  # [B, T, p*p*C]


def as_mlx(a) -> mx.array:
    """MLX arrays pass through; anything else goes via NumPy, floats as float32."""
    if isinstance(a, mx.array):
        return a
    a = np.asarray(a)
    return mx.array(a.astype(np.float32) if a.dtype.kind == "f" else a)


class DARTransformer(nn.Module):
    """DiT/SiT with DAR routing (or plain residual, ``config.routing.mode == "residual"``).

    ``seed`` draws the core's initialization (``dar_core.spec.schema.init_params``) in NumPy;
    ``dtype`` is the compute dtype (float32 or bfloat16; weights are always float32);
    ``routing_impl``: ``"auto"``/``"history"`` route with per-source MLX ops, ``"naive"``
    with the core's four-pass ``route`` (tests); there is no fused kernel (README.md);
    ``grad_checkpoint`` recomputes attention and MLP internals in the backward pass.
    """

    @staticmethod
    def check_routing_impl(routing_impl: str) -> None:
        if routing_impl == "fused":
            raise ConfigError("routing_impl='fused': the MLX backend has no fused routing "
                              "kernel (backends/mlx/README.md, 'No fused Metal kernel'); "
                              "use 'auto' or 'history'")
        if routing_impl not in ROUTING_IMPLS:
            raise ConfigError(f"routing_impl must be one of {list(ROUTING_IMPLS)}, "
                              f"got {routing_impl!r}")

    def __init__(self, config: ModelConfig, seed: int = 0, dtype: mx.Dtype = mx.float32,
                 routing_impl: str = "auto", grad_checkpoint: bool = False):
        super().__init__()
        self.check_routing_impl(routing_impl)
        if dtype not in (mx.float32, mx.bfloat16):
            raise ConfigError(f"dtype must be mlx.core.float32 or bfloat16, got {dtype!r}")
        cfg = config
        self.config, self.dtype, self.routing_impl = cfg, dtype, routing_impl
        self.grad_checkpoint = grad_checkpoint
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        self.pos_embed = mx.zeros((1, cfg.num_tokens, d))
        self.blocks = [DiTBlock(cfg) for _ in range(cfg.depth)]
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)
        if cfg.routing.is_dar:
            r = cfg.routing
            self.final_router = Router(d, r.query, r.norm_eps, r.time_gain)
        self.freeze(keys=sorted(NON_TRAINABLE), recurse=False)
        self.load_weights(init_params(cfg, seed))

    # Weights ----------------------------------------------------------------------------
    def load_weights(self, weights: dict | list | str, strict: bool = True) -> DARTransformer:
        """Load a canonical ``name -> array`` dict (NumPy or MLX), e.g. a checkpoint's
        ``params``/``ema``; raises CheckpointError naming the first mismatch. MLX's own forms
        of ``nn.Module.load_weights`` (a file, or a list of ``(name, array)`` pairs) pass
        through to it unchanged."""
        if not isinstance(weights, dict):
            return super().load_weights(weights, strict=strict)
        check_params(self.config, weights, where="weights")
        super().load_weights([(k, as_mlx(v).astype(mx.float32)) for k, v in weights.items()])
        return self

    def export_weights(self) -> dict[str, np.ndarray]:
        """Every parameter and buffer as float32 NumPy, in the schema's order."""
        flat = dict(tree_flatten(self.parameters()))
        mx.eval(list(flat.values()))
        return {k: np.array(flat[k].astype(mx.float32)) for k in param_shapes(self.config)}

    # Forward ----------------------------------------------------------------------------
    def __call__(self, x, t, y) -> mx.array:
        """Velocity ``[B, C, H, W]`` (float32) for NumPy or MLX inputs, checked first."""
        return self.forward(*self.check_inputs(x, t, y))

    def check_inputs(self, x, t, y) -> tuple[mx.array, mx.array, mx.array]:
        """Check shapes (free) and values (one host sync); return float32/int32 MLX arrays.
        Raises ``dar_core.errors.InputError`` naming the offending shape or value."""
        x, t, y = (as_mlx(a) for a in (x, t, y))
        check_shapes(self.config, x.shape, t.shape, y.shape)
        y_int = mx.issubdtype(y.dtype, mx.integer)
        stats = [mx.all(mx.isfinite(x)), mx.min(t), mx.max(t)]
        stats += [mx.min(y), mx.max(y)] if y_int else []
        mx.eval(stats)
        s = [v.item() for v in stats]
        check_values(self.config, x_finite=bool(s[0]), t_min=float(s[1]), t_max=float(s[2]),
                     y_min=int(s[3]) if y_int else 0, y_max=int(s[4]) if y_int else 0,
                     y_is_int=bool(y_int))
        return x.astype(mx.float32), t.astype(mx.float32), y.astype(mx.int32)

    def forward(self, x: mx.array, t: mx.array, y: mx.array) -> mx.array:
        """Unchecked forward: ``x [B, C, H, W]`` float32, ``t [B]`` float32, ``y [B]`` int."""
        cfg, dt = self.config, self.dtype
        v0 = self.x_embedder(x.astype(dt)) + self.pos_embed.astype(dt)  # [B, T, d]
        t_emb = self.t_embedder(t, dt)  # [B, d]
        c = nn.silu(t_emb + self.y_embedder(y).astype(dt))  # [B, d] (adaLN_modulation.0)
        slices = source_slices(cfg.num_sublayers, cfg.routing)  # per aggregator, <= 2 slices
        if not cfg.routing.is_dar:
            impl = ResidualStream
        else:
            impl = NaiveHistory if self.routing_impl == "naive" else History
        hist = impl(v0, slices, cfg.routing.norm_eps)
        for i, block in enumerate(self.blocks):
            block(hist, 2 * i, c, t_emb, self.grad_checkpoint)  # appends v_{2i+1}, v_{2i+2}
        h = aggregate(self.get("final_router"), hist, cfg.num_sublayers, t_emb)  # [B, T, d]
        out = self.final_layer(h, c)  # [B, T, p*p*C]
        return unpatchify(out, cfg.patch_size, cfg.out_channels).astype(mx.float32)
