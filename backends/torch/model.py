"""DARTransformer for PyTorch: a DiT/SiT whose residual additions are replaced by DAR routing.

Module and parameter names are DiT's (``x_embedder.proj``, ``t_embedder.mlp.0``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.adaLN_modulation.1``, ``final_layer.linear``, ...) plus
one router per aggregator (``blocks.{i}.attn_router``, ``blocks.{i}.mlp_router``,
``final_router``), exactly ``dar_core.spec.schema.param_shapes(config)``, so a core checkpoint or a
DiT/SiT state dict loads with ``load_state_dict`` and no renaming.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dar_core.spec.config import ModelConfig
from dar_core.spec.routing import source_slices
from dar_core.spec.schema import init_params, pos_embed_2d
from dar_core.spec.timestep import FREQUENCY_DIM, timestep_frequencies
from dar_core.spec.validate import check_shapes, check_values

from .routing import History, NaiveHistory, ResidualStream

LN_EPS = 1e-6
ROUTING_IMPLS = ("history", "naive")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, T, d]


class TimestepEmbedder(nn.Module):
    """Sinusoid of raw t in [0, 1] (the core's frequencies) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden))
        freqs = torch.from_numpy(timestep_frequencies().astype(np.float32))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = t.float()[:, None] * self.freqs[None]  # [B, 128]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # [B, d]


class LabelEmbedder(nn.Module):
    """One row per class plus the null (classifier-free guidance) class at ``num_classes``."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)  # [B, d]


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, d // self.heads)  # [B, T, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, hd]
        o = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, hd]
        return self.proj(o.transpose(1, 2).reshape(B, T, d))  # [B, T, d]


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Router(nn.Module):
    """One aggregator's parameters: the RMSNorm weight of the keys and the query.

    ``static``: ``w``; ``static_t``: ``w + e(t)``; ``dynamic``: ``W_q v_{l-1}`` per token.
    """

    def __init__(self, hidden: int, query: str, eps: float):
        super().__init__()
        self.kind = query
        self.norm = nn.RMSNorm(hidden, eps=eps)  # only its weight is used (folded into q)
        if query == "dynamic":
            self.query_proj = nn.Linear(hidden, hidden, bias=False)
        else:
            self.query = nn.Parameter(torch.zeros(hidden))

    def raw_query(self, t_emb: Tensor, prev: Tensor) -> Tensor:
        if self.kind == "static":
            return self.query  # [d]
        if self.kind == "static_t":
            return self.query + t_emb[:, None, :]  # [B, 1, d]
        return self.query_proj(prev)  # [B, T, d]


class DiTBlock(nn.Module):
    """adaLN-Zero block; each sublayer's input comes from the routing state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if cfg.routing.is_dar:
            eps = cfg.routing.norm_eps
            self.attn_router = Router(d, cfg.routing.query, eps)
            self.mlp_router = Router(d, cfg.routing.query, eps)

    def attn_branch(self, h: Tensor, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
        return gate.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift, scale))

    def mlp_branch(self, h: Tensor, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
        return gate.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # [B, d] each
        return self.linear(modulate(self.norm_final(h), shift, scale))  # [B, T, p*p*C]


class DARTransformer(nn.Module):
    """DiT/SiT with Diffusion-Adaptive Routing (``config.routing.mode == "dar"``) or the
    plain residual stream (``"residual"``): the same code with routing switched off.

    ``forward(x, t, y)`` validates its inputs and returns the velocity ``[B, C, H, W]``;
    ``velocity(x, t, y)`` is the unchecked hot path used by training and sampling.
    ``routing_impl="naive"`` uses the core's four-pass reference routing (for tests).
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0, routing_impl: str = "history",
                 grad_checkpoint: bool = False):
        super().__init__()
        if routing_impl not in ROUTING_IMPLS:
            raise ValueError(f"routing_impl must be one of {ROUTING_IMPLS}, got {routing_impl!r}")
        cfg = self.config = config
        d = cfg.hidden_size
        self.routing_impl = routing_impl
        self.grad_checkpoint = grad_checkpoint
        self.slices = source_slices(cfg.num_sublayers, cfg.routing)
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        pos = torch.from_numpy(pos_embed_2d(d, cfg.grid_size).astype(np.float32))[None]
        self.register_buffer("pos_embed", pos)  # [1, T, d], fixed
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        if cfg.routing.is_dar:
            self.final_router = Router(d, cfg.routing.query, cfg.routing.norm_eps)
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)
        self.load_weights(init_params(cfg, seed))

    # Weights ---------------------------------------------------------------------------
    def load_weights(self, params: dict[str, np.ndarray]) -> DARTransformer:
        """Load a canonical NumPy parameter dict (a core checkpoint's ``params``/``ema``);
        returns the model."""
        from dar_core.spec.schema import check_params

        check_params(self.config, params)
        ref = self.state_dict()
        self.load_state_dict({k: torch.from_numpy(np.asarray(v)).to(ref[k].dtype)
                              for k, v in params.items()})
        return self

    def export_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() for k, v in self.state_dict().items()}

    # Forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.check_inputs(x, t, y)
        return self.velocity(x, t, y)

    def check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        cfg = self.config
        for name, a in (("x", x), ("t", t), ("y", y)):
            if not isinstance(a, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
        check_shapes(cfg, x.shape, t.shape, y.shape)
        is_int = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
        check_values(cfg, x_finite=bool(torch.isfinite(x).all()), t_min=float(t.min()),
                     t_max=float(t.max()), y_min=int(y.min()) if is_int else 0,
                     y_max=int(y.max()) if is_int else 0, y_is_int=is_int)

    def velocity(self, x: Tensor, t: Tensor, y: Tensor, trace: dict | None = None) -> Tensor:
        cfg = self.config
        L = cfg.num_sublayers
        v0 = self.x_embedder(x) + self.pos_embed  # [B, T, d]
        t_emb = self.t_embedder(t)  # [B, d]
        c = t_emb + self.y_embedder(y)  # [B, d]
        gates = trace.get("gates") if trace is not None else None  # [L+1] ones, or None
        if gates is not None:  # measurement-only gates of 1 on every source (diagnostics)
            v0 = v0 * gates[0]
        if not cfg.routing.is_dar:
            state = ResidualStream(v0)
        elif self.routing_impl == "naive":
            state = NaiveHistory(v0, L, self.slices, cfg.routing.norm_eps)
        else:
            state = History(v0, L, self.slices, cfg.routing.norm_eps)

        def read(k: int, router: Router | None) -> Tensor:
            if router is None:
                h = state.read(k)  # residual stream
            else:
                q = router.raw_query(t_emb, state.newest)  # [d] | [B, 1, d] | [B, T, d]
                h = state.read(k, q, router.norm.weight)  # [B, T, d]
            if trace is not None:  # diagnostics: the aggregated inputs and their gradients
                trace.setdefault("inputs", []).append(h)
                if h.requires_grad:
                    h.retain_grad()
            return h

        for i, block in enumerate(self.blocks):
            mods = block.adaLN_modulation(c).chunk(6, dim=1)  # 6 x [B, d]
            h = read(2 * i, getattr(block, "attn_router", None))  # [B, T, d]
            v = self._run(block.attn_branch, h, *mods[0:3])  # v_{2i+1}: [B, T, d]
            state.write(v if gates is None else v * gates[2 * i + 1])
            h = read(2 * i + 1, getattr(block, "mlp_router", None))  # [B, T, d]
            v = self._run(block.mlp_branch, h, *mods[3:6])  # v_{2i+2}: [B, T, d]
            state.write(v if gates is None else v * gates[2 * i + 2])

        h = read(L, getattr(self, "final_router", None))  # [B, T, d]
        out = self.final_layer(h, c)  # [B, T, p*p*C]
        if trace is not None:
            trace["weights"] = state.weights
        return self.unpatchify(out)  # [B, C, H, W]

    def _run(self, branch, h: Tensor, *mods: Tensor) -> Tensor:
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(branch, h, *mods, use_reentrant=False)
        return branch(h, *mods)

    def unpatchify(self, x: Tensor) -> Tensor:
        """``[B, T, p*p*C] -> [B, C, H, W]`` (DiT's layout)."""
        c, p, g = self.config.out_channels, self.config.patch_size, self.config.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)  # [B, h, w, p, p, C]
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)
