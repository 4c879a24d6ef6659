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
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from dar_core.errors import ConfigError, InputError
from dar_core.spec.config import LN_EPS, ModelConfig
from dar_core.spec.config import ROUTING_IMPLS as CORE_IMPLS
from dar_core.spec.patches import unpatchify
from dar_core.spec.routing import fold_query, router_query, source_slices
from dar_core.spec.schema import init_params, pos_embed_2d
from dar_core.spec.timestep import FREQUENCY_DIM, timestep_frequencies
from dar_core.spec.validate import check_shapes, check_values

from .routing import FusedHistory, History, NaiveHistory, ResidualStream, resolve_impl

# the core's, and "naive" (tests); fused: the Triton kernel (triton_route.py)
ROUTING_IMPLS = (*CORE_IMPLS, "naive")


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

    ``static``: ``w``; ``static_t``: ``w + e(t)`` (``w + g e(t)`` with ``time_gain``);
    ``dynamic``: ``W_q v_{l-1}`` per token.
    """

    def __init__(self, hidden: int, query: str, eps: float, time_gain: bool = False):
        super().__init__()
        self.kind = query
        self.norm = nn.RMSNorm(hidden, eps=eps)  # only its weight is used (folded into q)
        if query == "dynamic":
            self.query_proj = nn.Linear(hidden, hidden, bias=False)
        else:
            self.query = nn.Parameter(torch.zeros(hidden))
        self.time_gain = nn.Parameter(torch.ones(1)) if time_gain else None

    def folded_query(self, newest: Tensor) -> Tensor:
        """The dynamic query already folded, ``fold_query(W_q v_{l-1}, w)``, as one projection
        by the folded ``W_q^T * w / sqrt(d)``: no unfolded ``[B, T, d]`` query is kept for the
        backward (the projection keeps only ``v_{l-1}``, a source kept anyway)."""
        return newest @ fold_query(self.query_proj.weight.T, self.norm.weight)  # [B, T, d]

    def raw_query(self, t_emb: Tensor, newest: Tensor) -> Tensor:
        """``q_l(t)``: ``[d]``, ``[B, 1, d]`` or ``[B, T, d]`` (docs/spec.md §3)."""
        if self.kind == "dynamic":
            return router_query(self.kind, t_emb, newest, query_proj=self.query_proj.weight)
        return router_query(self.kind, t_emb, newest, query=self.query,
                            time_gain=self.time_gain)


def aggregate(state: History | NaiveHistory | ResidualStream, router: Router | None, k: int,
              t_emb: Tensor) -> Tensor:
    """Input ``[B, T, d]`` of aggregator ``k`` (0-indexed; ``L`` feeds the final layer): the
    routed mix of its sources (DAR) or the running sum (residual, ``router`` is None)."""
    if router is None:
        return state.read(k, None, None)
    q = router.raw_query(t_emb, state.newest)  # [d] | [B, 1, d] | [B, T, d]
    return state.read(k, q, router.norm.weight)


def aggregate_normed(state: History | NaiveHistory | ResidualStream, router: Router | None,
                     k: int, t_emb: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(aggregate(...))``, the normalized input of a sublayer or of the final layer.
    ``History.read_normed`` rebuilds the routed input in the backward instead of keeping it;
    the other states (naive, residual, diagnostics' traces) keep it."""
    read_normed = getattr(state, "read_normed", None)
    if router is None or read_normed is None:
        return norm(aggregate(state, router, k, t_emb))
    if router.kind == "dynamic":
        return read_normed(k, router.folded_query(state.newest), None, norm.eps)
    q = router.raw_query(t_emb, state.newest)  # [d] | [B, 1, d]
    return read_normed(k, q, router.norm.weight, norm.eps)


class DiTBlock(nn.Module):
    """adaLN-Zero block; each sublayer reads its input from the routing state and writes its
    gated output ``v_l`` back to it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        r = cfg.routing
        self.attn_router = Router(d, r.query, r.norm_eps, r.time_gain) if r.is_dar else None
        self.mlp_router = Router(d, r.query, r.norm_eps, r.time_gain) if r.is_dar else None

    def forward(self, state, k: int, c: Tensor, t_emb: Tensor,
                checkpoint: bool) -> tuple[Tensor, Tensor]:
        """Sublayers ``k + 1`` (attention) and ``k + 2`` (MLP) of the stream in ``state``;
        returns the two sources it wrote (an FSDP2 unit gathers its weights for the backward
        when the gradient reaches its outputs)."""
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(6, dim=1)  # [B, d]
        x = aggregate_normed(state, self.attn_router, k, t_emb, self.norm1)  # [B, T, d]
        v_attn = _run(self.attn_branch, checkpoint, x, shift_msa, scale_msa, gate_msa)
        state.write(v_attn)
        x = aggregate_normed(state, self.mlp_router, k + 1, t_emb, self.norm2)  # [B, T, d]
        v_mlp = _run(self.mlp_branch, checkpoint, x, shift_mlp, scale_mlp, gate_mlp)
        state.write(v_mlp)
        return v_attn, v_mlp

    def attn_branch(self, x: Tensor, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
        """``x``: the normalized input ``norm1(h)``."""
        return gate.unsqueeze(1) * self.attn(modulate(x, shift, scale))  # [B, T, d]

    def mlp_branch(self, x: Tensor, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
        """``x``: the normalized input ``norm2(h)``."""
        return gate.unsqueeze(1) * self.mlp(modulate(x, shift, scale))  # [B, T, d]


def _run(branch, checkpoint: bool, h: Tensor, *mods: Tensor) -> Tensor:
    """``branch(h, *mods)``, recomputed in the backward pass when ``checkpoint`` is on."""
    if checkpoint and torch.is_grad_enabled():
        return torch_checkpoint(branch, h, *mods, use_reentrant=False)
    return branch(h, *mods)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x``: the normalized input ``norm_final(h)``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # [B, d] each
        return self.linear(modulate(x, shift, scale))  # [B, T, p*p*C]


class DARTransformer(nn.Module):
    """DiT/SiT with Diffusion-Adaptive Routing (``config.routing.mode == "dar"``) or the
    plain residual stream (``"residual"``): the same code with routing switched off.

    ``forward(x, t, y)`` validates its inputs and returns the velocity ``[B, C, H, W]``;
    ``velocity(x, t, y)`` is the unchecked hot path used by training and sampling.
    ``routing_impl``: ``"history"`` routes with per-source torch ops; ``"fused"`` with the
    one-pass Triton kernel of ``triton_route`` (CUDA, or Triton's interpreter on CPU tensors);
    ``"auto"`` (default) takes the kernel on CUDA once it has passed its self-check there
    (``routing.fused_checked``), ``"history"`` elsewhere; ``"naive"`` the core's four-pass
    reference routing (for tests).
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0, routing_impl: str = "auto",
                 grad_checkpoint: bool = False, recompute_routing: bool = True):
        super().__init__()
        if routing_impl not in ROUTING_IMPLS:
            raise ConfigError(f"routing_impl must be one of {ROUTING_IMPLS}, got {routing_impl!r}")
        cfg = self.config = config
        d = cfg.hidden_size
        self.routing_impl = routing_impl
        self.grad_checkpoint = grad_checkpoint
        self.recompute_routing = recompute_routing  # History.read_normed: h rebuilt, not kept
        self.slices = source_slices(cfg.num_sublayers, cfg.routing)
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        pos = torch.from_numpy(pos_embed_2d(d, cfg.grid_size).astype(np.float32))[None]
        self.register_buffer("pos_embed", pos)  # [1, T, d], fixed
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        r = cfg.routing
        self.final_router = Router(d, r.query, r.norm_eps, r.time_gain) if r.is_dar else None
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
        weight = self.x_embedder.proj.weight
        if x.dtype != weight.dtype or x.device != weight.device:
            raise InputError(f"x is {x.dtype} on {x.device}, the model's weights are "
                             f"{weight.dtype} on {weight.device}: pass x.to(model's dtype and "
                             "device) (bf16 compute: torch.autocast, not bf16 inputs)")
        is_int = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
        check_values(cfg, x_finite=bool(torch.isfinite(x).all()), t_min=float(t.min()),
                     t_max=float(t.max()), y_min=int(y.min()) if is_int else 0,
                     y_max=int(y.max()) if is_int else 0, y_is_int=is_int)

    def new_state(self, v0: Tensor) -> History | NaiveHistory | ResidualStream:
        """The routing state of one forward pass, holding ``v_0`` ``[B, T, d]``."""
        cfg = self.config
        if not cfg.routing.is_dar:
            impl = ResidualStream
        else:
            impl = {"naive": NaiveHistory, "fused": FusedHistory}.get(
                resolve_impl(self.routing_impl, v0), History)
        state = impl(v0, self.slices, cfg.routing.norm_eps)
        if isinstance(state, History):
            state.recompute = self.recompute_routing
        return state

    def velocity(self, x: Tensor, t: Tensor, y: Tensor, state_factory=None) -> Tensor:
        """The unchecked forward. ``state_factory(v0)``, when given, builds the routing state
        in place of ``new_state`` (diagnostics wrap it to watch and gate the sources)."""
        v0 = self.x_embedder(x) + self.pos_embed  # [B, T, d]
        t_emb = self.t_embedder(t)  # [B, d]
        c = t_emb + self.y_embedder(y)  # [B, d]
        state = (state_factory or self.new_state)(v0)
        for i, block in enumerate(self.blocks):
            block(state, 2 * i, c, t_emb, self.grad_checkpoint)  # writes v_{2i+1}, v_{2i+2}
        x = aggregate_normed(state, self.final_router, self.config.num_sublayers, t_emb,
                             self.final_layer.norm_final)  # [B, T, d]
        out = self.final_layer(x, c)  # [B, T, p*p*C]
        return unpatchify(out, self.config.patch_size, self.config.out_channels)  # [B,C,H,W]
