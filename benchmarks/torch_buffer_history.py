"""The torch routing state the backend used before ``History`` became a plain list of sources
on ordinary autograd (``backends/torch/routing.py``): kept here, unchanged in its math, as the
measured alternative of ``benchmarks/bench_torch_history.py``.

One preallocated history buffer, read through strided views.

Forward: ``History.write(v_l)`` copies ``v_l`` into row ``l`` of a ``[L+1, B, T, d]`` buffer and
caches its inverse RMS once (``rstd``, a ``[L+1, B, T]`` buffer). ``History.read`` mixes the
rows named by ``dar_core.spec.routing.source_slices`` (at most two strided views, never a gather):

    logit_i = rstd_i * (v_i . q~)      with the folded query q~ = q * w_norm / sqrt(d)
    alpha   = softmax over the sources of logit
    h       = sum_i alpha_i v_i

Backward: writes into a buffer that autograd has saved would break autograd's version checks,
so the buffer lives outside autograd. Two small Functions carry the gradient instead:
``_Write`` returns a scalar *token* per source and takes the previous token, and every ``_Read``
takes the newest token. The tokens form a chain, so autograd runs the writer of ``v_l`` only
after every later write and every read that came after it: all readers of ``v_l``. Readers
accumulate ``dL/dv_i`` in place into a per-row gradient (the first reader creates it); the
writer hands row ``l``'s to ``v_l`` and drops it.
Per source the gradient of one read is (``s_i = v_i . q~``, ``beta = alpha * (dalpha -
sum alpha dalpha)``, ``dalpha_i = g . v_i``)::

    dv_i = alpha_i g + beta_i rstd_i q~ - (beta_i s_i rstd_i^3 / d) v_i
    dq~  = sum_i beta_i rstd_i v_i
    dq   = dq~ * w_norm / sqrt(d)          dw_norm = sum over B, T of dq~ * q / sqrt(d)

The query is folded inside the read, so autograd keeps only the raw query (one ``[B, T, d]``
tensor per aggregator fewer for the dynamic query).

The history is stored, and the routing math runs, in at least float32 whatever the autocast
dtype. Built as ``BufferHistory(v0, slices, eps)``, the backend's routing-state interface.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function


def _acc(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 activations are routed in float32, float64 stays)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _dots(v: Tensor, q: Tensor) -> Tensor:
    """``[n, B, T, d] . q -> [n, B, T]`` for a query of shape ``[d]``, ``[B, 1, d]`` or
    ``[B, T, d]``. Source by source (each row of the history is contiguous): a matrix-vector
    product per sample for the shared queries, a broadcast multiply and reduction for the
    per-token one. On the strided views of the history as a whole, einsum/matmul lower to
    copies or batches of tiny matrix products, 2-5x slower (CPU, n = 5, B = T = d = 64)."""
    if q.dim() == 3 and q.shape[1] > 1:
        return (v * q).sum(-1)
    with torch.autocast(v.device.type, enabled=False):  # routing math stays in float32
        if q.dim() == 1:
            return torch.stack([vj @ q for vj in v])
        qt = q.transpose(1, 2)  # [B, d, 1]
        return torch.stack([torch.bmm(vj, qt).squeeze(-1) for vj in v])


def _mix(alpha: Tensor, pieces: list[Tensor]) -> Tensor:
    """``sum_i alpha_i v_i`` over the sources of every piece: one multiply-add per source."""
    h = None
    start = 0
    for v in pieces:
        for j in range(v.shape[0]):
            a = alpha[start + j].unsqueeze(-1)  # [B, T, 1]
            h = v[j] * a if h is None else h.addcmul_(v[j], a)
        start += v.shape[0]
    return h


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _reduce_to(g: Tensor, q: Tensor) -> Tensor:
    """Sum a ``[B, T, d]`` gradient down to the broadcast shape of ``q``."""
    if q.dim() == 1:
        return g.sum(dim=(0, 1))
    if q.shape[1] == 1:
        return g.sum(dim=1, keepdim=True)
    return g


class _Write(Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, prev: Tensor | None, store: Storage, l: int) -> Tensor:
        store.write(v, l)
        ctx.store, ctx.l = store, l
        return store.buf.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _token_grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        # every reader of row l is done: hand its gradient over (a retained graph can run
        # again, it finds the row absent); None when no reader had a gradient for it
        return ctx.store.grads.pop(ctx.l, None), None, None, None


class _Read(Function):
    @staticmethod
    def forward(ctx: Any, raw_q: Tensor, norm_weight: Tensor, store: Storage, slices: tuple,
                *tokens: Tensor):
        q = fold_query(raw_q, norm_weight)  # folded here, so only the raw query is saved
        pieces = [store.buf[s] for s in slices]  # views, each [n_k, B, T, d]
        rstd = _cat([store.rstd[s] for s in slices])  # [N, B, T]
        dots = _cat([_dots(v, q) for v in pieces])  # [N, B, T]
        alpha = torch.softmax(rstd * dots, dim=0)  # [N, B, T]
        h = _mix(alpha, pieces)  # [B, T, d]
        ctx.save_for_backward(raw_q, norm_weight, alpha, dots)
        ctx.store, ctx.slices = store, slices
        ctx.rstd = rstd  # may be a view of the rstd buffer: its rows are never rewritten
        ctx.mark_non_differentiable(alpha)
        return h, alpha

    @staticmethod
    def backward(ctx: Any, g: Tensor, _alpha_grad: Tensor):
        raw_q, norm_weight, alpha, dots = ctx.saved_tensors
        store, rstd = ctx.store, ctx.rstd
        q = fold_query(raw_q, norm_weight)
        g = g.to(store.buf.dtype)  # autocast consumers may hand back a bf16 gradient
        pieces = [store.buf[s] for s in ctx.slices]
        d = g.shape[-1]
        dalpha = _cat([(v * g).sum(-1) for v in pieces])  # [N, B, T]
        beta = alpha * (dalpha - (alpha * dalpha).sum(0, keepdim=True))  # dL/dlogit
        br = (beta * rstd).unsqueeze(-1)  # [N, B, T, 1]
        coef_v = (beta * dots * rstd**3 / d).unsqueeze(-1)  # [N, B, T, 1]
        a = alpha.unsqueeze(-1)  # [N, B, T, 1]
        grads = store.grads
        dq = torch.zeros(g.shape, dtype=g.dtype, device=g.device)  # [B, T, d]
        i = 0
        for s, v in zip(ctx.slices, pieces):  # in-place multiply-adds, no [n, B, T, d] temps
            for j, row in enumerate(range(s.start, s.stop, s.step or 1)):
                gi = grads.get(row)  # [B, T, d], created by the first (latest) reader
                if gi is None:
                    gi = grads[row] = g * a[i]
                else:
                    gi.addcmul_(g, a[i])
                gi.addcmul_(q, br[i]).addcmul_(v[j], coef_v[i], value=-1)
                dq.addcmul_(v[j], br[i])
                i += 1
        dq = _reduce_to(dq, q)  # dL/dq~, in the shape of the query
        scale = _acc(norm_weight) / math.sqrt(d)
        d_raw = (dq * scale).to(raw_q.dtype)
        d_w = ((dq * _acc(raw_q)).reshape(-1, d).sum(0) / math.sqrt(d)).to(norm_weight.dtype)
        return (d_raw, d_w, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


class Storage:
    """The buffers of one forward pass: history ``[L+1, B, T, d]``, inverse RMS ``[L+1, B, T]``
    and, in the backward pass, the pending gradients ``dL/dv_l`` (``[B, T, d]`` each, created
    by the first reader to reach row ``l`` and handed to ``v_l`` by its writer, so only the
    rows between a reader and their writer are alive: for chunked routing about ``L/S + S``
    of the ``L+1``). The autograd contexts hold this object and nothing that points back into
    the graph, so the buffers are freed with the graph (a context holding the tokens would
    form a reference cycle through autograd and leak)."""

    def __init__(self, v0: Tensor, num_sublayers: int, eps: float):
        B, T, d = v0.shape
        dtype = _acc(v0).dtype
        self.eps = eps
        self.buf = v0.new_empty((num_sublayers + 1, B, T, d), dtype=dtype)
        self.rstd = v0.new_empty((num_sublayers + 1, B, T), dtype=dtype)
        self.grads: dict[int, Tensor] = {}

    def write(self, v: Tensor, l: int) -> None:
        with torch.no_grad():
            self.buf[l].copy_(v)
            self.rstd[l] = torch.rsqrt(self.buf[l].square().mean(-1) + self.eps)


class BufferHistory:
    """The buffer routing state of one forward pass (see the module docstring)."""

    def __init__(self, v0: Tensor, slices: list, eps: float):
        self.slices = slices
        self.storage = Storage(v0, len(slices) - 1, eps)
        self.tokens: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.newest = v0  # the autograd-tracked newest output (the dynamic query reads it)
        self.write(v0)

    def write(self, v: Tensor) -> None:
        l = len(self.tokens)
        self.newest = v
        if torch.is_grad_enabled() and v.requires_grad:
            prev = self.tokens[-1] if self.tokens else None
            self.tokens.append(_Write.apply(v, prev, self.storage, l))
        else:
            self.storage.write(v, l)
            self.tokens.append(self.storage.buf.new_zeros(()))

    def read(self, k: int, raw_query: Tensor, norm_weight: Tensor) -> Tensor:
        """Input of aggregator ``k`` (0-indexed), ``[B, T, d]`` (at least float32)."""
        h, alpha = _Read.apply(raw_query, norm_weight, self.storage, self.slices[k],
                               self.tokens[-1])
        self.weights.append(alpha)
        return h


def fold_query(raw_query: Tensor, norm_weight: Tensor) -> Tensor:
    """``q * w_norm / sqrt(d)``: the RMSNorm weight and the logit scale folded into the query."""
    return _acc(raw_query) * (_acc(norm_weight) / math.sqrt(norm_weight.shape[-1]))
