"""DAR routing for PyTorch: the routing state of one forward pass (docs/spec.md §8.2).

``History`` keeps ``v_0 .. v_L`` as a list of ``[B, T, d]`` tensors (at least float32), each
appended once when its sublayer writes it, with its inverse RMS ``rstd_l`` (``[B, T]``)
computed once at the write. ``read(k, raw_query, norm_weight)`` mixes the sources of aggregator
``k`` (the at most two strided slices of ``dar_core.spec.routing.source_slices`` applied to the
list: no gathers, no re-stacking) with the RMSNorm weight and ``1/sqrt(d)`` folded into the
query::

    logit_i = rstd_i * (v_i . q~)      q~ = fold_query(q, w_norm) = q * w_norm / sqrt(d)
    alpha   = softmax over the sources of logit        [N, B, T]
    h       = sum_i alpha_i v_i                        [B, T, d]

Ordinary autograd differentiates it. The routing math runs in at least float32 whatever the
autocast dtype. A preallocated buffer carried by custom autograd Functions was measured against
this design and replaced by it (``benchmarks/bench_torch_history.py``, figures in README).

``NaiveHistory`` (re-stacks the sources for the core's four-pass ``route``: the readable
specification, for tests) and ``ResidualStream`` (routing off) are the core's, array-generic
(``dar_core.spec.routing``). All three
are built as ``(v0, slices, eps)`` and read as ``read(k, raw_query, norm_weight)``, the same
interface as the JAX and MLX backends.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from dar_core.errors import ConfigError
from dar_core.spec.routing import NaiveHistory, ResidualStream, fold_query

__all__ = ["FusedHistory", "History", "NaiveHistory", "ResidualStream", "check_fused",
           "fused_checked", "resolve_impl"]

def _acc(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 activations are routed in float32, float64 stays)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _dot(v: Tensor, q: Tensor) -> Tensor:
    """``v [B, T, d] . q -> [B, T]`` for a folded query ``[d]``, ``[B, 1, d]`` or ``[B, T, d]``:
    a matrix-vector product per sample for the shared queries, a broadcast multiply and
    reduction for the per-token one."""
    if q.dim() == 3 and q.shape[1] > 1:
        return (v * q).sum(-1)  # per-token query
    if q.dim() == 1:
        return v @ q  # [B, T]
    return (v @ q.transpose(1, 2)).squeeze(-1)  # [B, T, 1] -> [B, T]


class _RecomputedNorm(torch.autograd.Function):
    """``LayerNorm(h)`` (no affine) for a routed input ``h = sum_i alpha_i v_i`` that it does
    not keep: the backward rebuilds ``h`` from the weights and the sources, which the routing
    keeps anyway, so the routed input costs no memory between the passes (a residual model
    keeps its stream there: with this, DAR's kept tensors match residual's). Only ``h`` gets
    a gradient here; the weights and sources get theirs through ``h``'s own graph."""

    @staticmethod
    def forward(ctx, h: Tensor, eps: float, alpha: Tensor, *values: Tensor) -> Tensor:
        mean = h.mean(-1, keepdim=True)  # [B, T, 1]
        rstd = torch.rsqrt((h - mean).square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(alpha, mean, rstd, *values)
        return (h - mean) * rstd

    @staticmethod
    def backward(ctx, gy: Tensor):
        alpha, mean, rstd, *values = ctx.saved_tensors
        h = values[0] * alpha[0].unsqueeze(-1)
        for j, v in enumerate(values[1:], 1):
            h = h + v * alpha[j].unsqueeze(-1)  # the forward's sum, in the forward's order
        xhat = (h - mean) * rstd
        gh = rstd * (gy - gy.mean(-1, keepdim=True) - xhat * (gy * xhat).mean(-1, keepdim=True))
        return (gh, None, None) + (None,) * len(values)


class History:
    """The routing state of one forward pass (see the module docstring)."""

    fused = False  # FusedHistory: one pass over the sources in a Triton kernel

    def __init__(self, v0: Tensor, slices: list, eps: float):
        self.slices, self.eps = slices, eps
        self.recompute = True  # read_normed rebuilds the routed input in the backward
        self.values: list[Tensor] = []  # v_l, [B, T, d], at least float32
        self.rstd: list[Tensor] = []  # 1 / rms(v_l), [B, T]
        self.weights: list[Tensor] = []  # alpha of every read, [N, B, T]
        self.write(v0)

    def write(self, v: Tensor) -> None:
        self.newest = v  # the autograd-tracked newest output (the dynamic query reads it)
        va = _acc(v)
        self.values.append(va)
        self.rstd.append(torch.rsqrt(va.square().mean(-1) + self.eps))

    def _sources(self, k: int) -> list[int]:
        """History indices of aggregator ``k``'s sources (its strided slices)."""
        return [i for s in self.slices[k] for i in range(len(self.values))[s]]

    def read(self, k: int, raw_query: Tensor, norm_weight: Tensor | None) -> Tensor:
        """Input of aggregator ``k`` (0-indexed), ``[B, T, d]`` (at least float32);
        ``norm_weight=None``: ``raw_query`` is already folded (``Router.folded_query``)."""
        idx = self._sources(k)
        with torch.autocast(raw_query.device.type, enabled=False):  # routing math in float32
            q = _acc(raw_query) if norm_weight is None else fold_query(_acc(raw_query),
                                                                       _acc(norm_weight))
            if self.fused:  # one pass over the sources (backends/torch/triton_route.py)
                from .triton_route import fused_mix

                h, alpha = fused_mix([self.values[i] for i in idx],
                                     [self.rstd[i] for i in idx], q, self.eps)
                self.weights.append(alpha.detach())
                return h
            logits = torch.stack([self.rstd[i] * _dot(self.values[i], q) for i in idx])
            alpha = torch.softmax(logits, dim=0)  # [N, B, T]
            h = self.values[idx[0]] * alpha[0].unsqueeze(-1)
            for j, i in enumerate(idx[1:], 1):
                h = h + self.values[i] * alpha[j].unsqueeze(-1)
        self.weights.append(alpha.detach())
        return h

    def read_normed(self, k: int, raw_query: Tensor, norm_weight: Tensor | None,
                    ln_eps: float) -> Tensor:
        """``LayerNorm(read(k, ...))`` (no affine, ``ln_eps``) with the routed input rebuilt in
        the backward instead of kept (``_RecomputedNorm``); the fused kernel's reads are
        normalized as they are."""
        h = self.read(k, raw_query, norm_weight)
        if self.fused or not self.recompute or not torch.is_grad_enabled():
            return F.layer_norm(h, h.shape[-1:], eps=ln_eps)
        idx = self._sources(k)
        with torch.autocast(raw_query.device.type, enabled=False):
            return _RecomputedNorm.apply(h, ln_eps, self.weights[-1],
                                         *[self.values[i].detach() for i in idx])


class FusedHistory(History):
    """``History`` whose reads run the one-pass Triton kernel (``triton_route.fused_mix``):
    compiled on CUDA, run by Triton's interpreter on CPU tensors. Sources are kept in their
    own dtype (bf16 under autocast: half the bytes the kernel reads), their inverse RMS in
    float32; the kernel accumulates in float32. ``routing_impl="fused"`` asks for it,
    ``"auto"`` takes it on CUDA once it has passed its self-check (``fused_checked``)."""

    fused = True

    def __init__(self, v0: Tensor, slices: list, eps: float):
        check_fused(v0.device)
        super().__init__(v0, slices, eps)

    def write(self, v: Tensor) -> None:
        self.newest = v
        self.values.append(v)
        self.rstd.append(torch.rsqrt(_acc(v).square().mean(-1) + self.eps))


def check_fused(device: torch.device) -> None:
    """``routing_impl='fused'`` can run on ``device``: triton installed, and a CUDA device or
    Triton's interpreter (``TRITON_INTERPRET=1`` before the kernels were imported)."""
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("routing_impl='fused' needs triton (pip install "
                          "'dar-core[kernels]'); 'history' works everywhere")
    from .triton_route import interpreted

    if device.type != "cuda" and not interpreted():
        raise ConfigError(f"routing_impl='fused' runs the Triton kernel on CUDA, got device "
                          f"{device} (Triton's interpreter: TRITON_INTERPRET=1); use 'auto' "
                          "or 'history'")


def resolve_impl(impl: str, v0: Tensor) -> str:
    """The routing implementation a forward pass with ``v_0`` runs: ``impl``, or for
    ``"auto"`` the fused kernel on a CUDA device where triton is installed, the sources are not
    float64 and the kernel passed its self-check there, else ``"history"``."""
    if impl != "auto":
        return impl
    if (v0.device.type != "cuda" or v0.dtype == torch.float64
            or importlib.util.find_spec("triton") is None):
        return "history"
    return "fused" if fused_checked(v0.device) else "history"


_CHECKED: dict[str, bool] = {}


def fused_checked(device: torch.device) -> bool:
    """Whether the fused kernel agrees with the per-source path on ``device``
    (``dar_core.conformance.kernel_check``), checked once per device and process; a failure
    is reported once as a warning naming it, and ``"auto"`` keeps the per-source path. The
    trainer asks before it compiles, so a compiled forward only reads the cached answer."""
    key = str(device)
    if key not in _CHECKED:
        # disabled for torch.compile at call time: importing dynamo with this module would
        # import triton before a test process can ask for its interpreter
        _CHECKED[key] = torch.compiler.disable(_run_check)(device)
    return _CHECKED[key]


def _run_check(device: torch.device) -> bool:
    from dar_core.conformance.kernel_check import passes

    return passes(functools.partial(_check_read, device), device.type, str(device))


def _check_read(device: torch.device, impl: str, v, q, w, g, dtype: str) -> list:
    """One read of all sources ``v [N, B, T, d]`` through ``impl``'s history with the loss
    ``sum(h * g)``: ``[h, alpha, dv, dq, dw]`` as NumPy (``kernel_check``'s ``run``)."""
    cls = FusedHistory if impl == "fused" else History
    vs = [torch.tensor(x, device=device).to(getattr(torch, dtype)).requires_grad_() for x in v]
    qt, wt = (torch.tensor(a, device=device, requires_grad=True) for a in (q, w))
    with torch.enable_grad():
        state = cls(vs[0], [(slice(0, len(vs)),)], 1e-6)
        for x in vs[1:]:
            state.write(x)
        h = state.read(0, qt, wt)
        (h * torch.tensor(g, device=device)).sum().backward()
    out = (h, state.weights[-1], torch.stack([x.grad for x in vs]), qt.grad, wt.grad)
    return [a.detach().double().cpu().numpy() for a in out]
