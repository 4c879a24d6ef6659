"""One DAR aggregation as a fused Triton kernel, forward and backward (docs/spec.md §2.2, §8.2).

The same function as ``dar_core.spec.routing.route`` (and the torch ``History.read`` math)::

    rstd_i = 1 / sqrt(mean(v_i^2) + eps)        logit_i = rstd_i * (v_i . q~)
    alpha  = softmax_i(logit)                   h       = sum_i alpha_i v_i

with ``q~ = fold_query(q, w)`` (RMSNorm weight and 1/sqrt(d) folded into the query). Each
program owns a block of rows (sample, token) and walks the ``N`` sources once:

- **forward**: one read of every source. The row block of ``v_i`` is loaded once, its inverse
  RMS (unless a cached one is passed), its logit and an online-softmax update of the running
  max ``m``, normaliser ``l`` and accumulator ``acc`` (all float32) come from that one load.
  Saved for the backward: the ``[N, M]`` weights, the ``[N, M]`` inverse RMS and ``h``.
- **backward**: one read of every source (the bound is two). With ``g = dL/dh`` and the
  upstream ``dL/dalpha = ga`` (zero when unused), ``sum_j alpha_j s_j = g . h + sum_j alpha_j
  ga_j`` is known before the loop, so each source needs a single visit::

      s_i     = g . v_i + ga_i                  beta_i = alpha_i (s_i - sum_j alpha_j s_j)
      dv_i    = alpha_i g + beta_i rstd_i q~ [- beta_i logit_i rstd_i^2 / d * v_i]
      dq~    += beta_i rstd_i v_i               drstd_i = beta_i (v_i . q~)  (cached rstd)

  The bracketed term is the inverse RMS's own gradient, taken in-kernel when the kernel
  computed the inverse RMS; with a cached one its gradient ``drstd`` is returned instead and
  autograd carries it through whatever computed the cache.

Sources are a list of same-shape, same-dtype tensors (bf16, fp16 or fp32; rows contiguous in
``d``) addressed through a table of their data pointers, so the torch ``History``'s
write-once list is read in place: no stacking. Query shapes: ``[d]`` (static), ``[B, 1, d]``
(per sample, ``static_t``), ``[B, T, d]`` (per token, ``dynamic``). Accumulation is float32;
``h`` is returned in float32 and each ``dv_i`` in its source's dtype.

Block sizes are a first guess (the whole ``d`` of a row in one block; rows per program so that
a block holds about 4096 floats): no GPU was at hand to tune them. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (the tests do that).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dar_core.errors import InputError
from dar_core.spec.routing import fold_query, query_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels need triton; importing this module without it is an error
    triton = None

__all__ = ["available", "fused_mix", "fused_route", "interpreted"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """Whether triton is importable (the kernels need it; a CUDA device or the interpreter)."""
    return triton is not None


if triton is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                 torch.float16: tl.float16}

    @triton.jit
    def _route_fwd(v_tab, r_tab, q_ptr, h_ptr, alpha_ptr, rstd_ptr, lse_ptr, N, M, D,
                   stride_vm, stride_qm, q_div, eps, inv_d,
                   DTYPE: tl.constexpr, HAS_RSTD: tl.constexpr,
                   BM: tl.constexpr, BD: tl.constexpr):
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # [BM]
        cols = tl.arange(0, BD)  # [BD]
        rmask = rows < M
        mask = rmask[:, None] & (cols < D)[None, :]  # [BM, BD]
        q = tl.load(q_ptr + (rows // q_div)[:, None] * stride_qm + cols[None, :], mask=mask,
                    other=0.0)  # [BM, BD] float32, the folded query
        offs = rows[:, None] * stride_vm + cols[None, :]
        m = tl.full([BM], float("-inf"), tl.float32)  # running max of the logits
        lsum = tl.zeros([BM], tl.float32)  # running sum of exp(logit - m)
        acc = tl.zeros([BM, BD], tl.float32)  # running sum of exp(logit - m) v
        for i in range(N):
            vp = tl.load(v_tab + i).to(tl.pointer_type(DTYPE))
            v = tl.load(vp + offs, mask=mask, other=0.0).to(tl.float32)  # the one read
            if HAS_RSTD:
                rp = tl.load(r_tab + i).to(tl.pointer_type(tl.float32))
                r = tl.load(rp + rows, mask=rmask, other=1.0)
            else:
                r = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) * inv_d + eps)
            tl.store(rstd_ptr + i * M + rows, r, mask=rmask)
            z = r * tl.sum(v * q, axis=1)  # [BM] logits
            tl.store(alpha_ptr + i * M + rows, z, mask=rmask)  # logits now, weights below
            m_new = tl.maximum(m, z)
            scale = tl.exp(m - m_new)
            p = tl.exp(z - m_new)
            lsum = lsum * scale + p
            acc = acc * scale[:, None] + p[:, None] * v
            m = m_new
        tl.store(h_ptr + rows[:, None] * D + cols[None, :], acc / lsum[:, None], mask=mask)
        lse = m + tl.log(lsum)
        for i in range(N):  # logits -> weights: [N, BM] floats, no source is read
            z = tl.load(alpha_ptr + i * M + rows, mask=rmask, other=0.0)
            tl.store(alpha_ptr + i * M + rows, tl.exp(z - lse), mask=rmask)
        tl.store(lse_ptr + rows, lse, mask=rmask)

    @triton.jit
    def _route_bwd(v_tab, dv_tab, q_ptr, g_ptr, h_ptr, alpha_ptr, galpha_ptr, rstd_ptr,
                   drstd_ptr, dq_ptr, N, M, D, stride_vm, stride_qm, q_div, inv_d,
                   DTYPE: tl.constexpr, HAS_RSTD: tl.constexpr, HAS_GALPHA: tl.constexpr,
                   BM: tl.constexpr, BD: tl.constexpr):
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        cols = tl.arange(0, BD)
        rmask = rows < M
        mask = rmask[:, None] & (cols < D)[None, :]
        q = tl.load(q_ptr + (rows // q_div)[:, None] * stride_qm + cols[None, :], mask=mask,
                    other=0.0)
        dense = rows[:, None] * D + cols[None, :]
        g = tl.load(g_ptr + dense, mask=mask, other=0.0)  # [BM, BD] float32
        c = tl.sum(g * tl.load(h_ptr + dense, mask=mask, other=0.0), axis=1)  # g . h
        if HAS_GALPHA:
            for i in range(N):  # + sum_j alpha_j ga_j: [N, BM] floats
                c += (tl.load(alpha_ptr + i * M + rows, mask=rmask, other=0.0)
                      * tl.load(galpha_ptr + i * M + rows, mask=rmask, other=0.0))
        offs = rows[:, None] * stride_vm + cols[None, :]
        dq = tl.zeros([BM, BD], tl.float32)
        for i in range(N):
            vp = tl.load(v_tab + i).to(tl.pointer_type(DTYPE))
            v = tl.load(vp + offs, mask=mask, other=0.0).to(tl.float32)  # the one read
            r = tl.load(rstd_ptr + i * M + rows, mask=rmask, other=0.0)
            a = tl.load(alpha_ptr + i * M + rows, mask=rmask, other=0.0)
            s = tl.sum(g * v, axis=1)
            if HAS_GALPHA:
                s += tl.load(galpha_ptr + i * M + rows, mask=rmask, other=0.0)
            beta = a * (s - c)  # dL/dlogit_i
            u = tl.sum(v * q, axis=1)  # v_i . q~
            dv = a[:, None] * g + (beta * r)[:, None] * q
            if HAS_RSTD:
                tl.store(drstd_ptr + i * M + rows, beta * u, mask=rmask)
            else:
                dv -= (beta * u * r * r * r * inv_d)[:, None] * v
            dvp = tl.load(dv_tab + i).to(tl.pointer_type(DTYPE))
            tl.store(dvp + offs, dv.to(DTYPE), mask=mask)
            dq += (beta * r)[:, None] * v
        tl.store(dq_ptr + dense, dq, mask=mask)


def interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` set
    when this module was imported)."""
    return triton is not None and type(_route_fwd).__name__ == "InterpretedFunction"


def _blocks(d: int) -> tuple[int, int]:
    bd = triton.next_power_of_2(d)
    return max(1, min(64, 4096 // bd)), bd


def _table(ts: list[Tensor], device: torch.device) -> Tensor:
    return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)


class _FusedMix(torch.autograd.Function):
    """``(qt [Q, d], q_div, eps, n, v_1..v_n [M, d], [rstd_1..rstd_n [M]]) -> (h [M, d],
    alpha [N, M])``; row ``m`` uses query row ``m // q_div``."""

    @staticmethod
    def forward(ctx, qt, q_div, eps, n, *tensors):
        values, rstd = list(tensors[:n]), list(tensors[n:]) or None
        v0 = values[0]
        M, D = v0.shape
        N = len(values)
        h = torch.empty(M, D, dtype=torch.float32, device=v0.device)
        alpha = torch.empty(N, M, dtype=torch.float32, device=v0.device)
        rs = torch.empty(N, M, dtype=torch.float32, device=v0.device)
        lse = torch.empty(M, dtype=torch.float32, device=v0.device)
        v_tab = _table(values, v0.device)
        r_tab = _table(rstd, v0.device) if rstd else v_tab  # unused without a cache
        bm, bd = _blocks(D)
        _route_fwd[(triton.cdiv(M, bm),)](
            v_tab, r_tab, qt, h, alpha, rs, lse, N, M, D, v0.stride(0), qt.stride(0), q_div,
            eps, 1.0 / D, DTYPE=_TL_DTYPE[v0.dtype], HAS_RSTD=rstd is not None, BM=bm, BD=bd)
        ctx.save_for_backward(qt, h, alpha, rs, *values)
        ctx.q_div, ctx.n, ctx.cached = q_div, N, rstd is not None
        ctx.set_materialize_grads(False)
        return h, alpha

    @staticmethod
    def backward(ctx, gh, galpha):
        qt, h, alpha, rs, *values = ctx.saved_tensors
        v0 = values[0]
        M, D = v0.shape
        N = ctx.n
        gh = torch.zeros_like(h) if gh is None else gh.float().contiguous()
        dvs = [torch.empty_like(v) for v in values]
        drstd = torch.empty(N, M, dtype=torch.float32, device=v0.device)
        dq_rows = torch.empty(M, D, dtype=torch.float32, device=v0.device)
        ga = galpha.float().contiguous() if galpha is not None else alpha  # unused if None
        bm, bd = _blocks(D)
        _route_bwd[(triton.cdiv(M, bm),)](
            _table(values, v0.device), _table(dvs, v0.device), qt, gh, h, alpha, ga, rs,
            drstd, dq_rows, N, M, D, v0.stride(0), qt.stride(0), ctx.q_div, 1.0 / D,
            DTYPE=_TL_DTYPE[v0.dtype], HAS_RSTD=ctx.cached, HAS_GALPHA=galpha is not None,
            BM=bm, BD=bd)
        dqt = dq_rows.view(qt.shape[0], -1, D).sum(1)  # rows of one query row are adjacent
        drs = list(drstd.unbind(0)) if ctx.cached else []
        return (dqt, None, None, None, *dvs, *drs)


@torch.compiler.disable  # the launch reads data pointers: compiled graphs break around it
def fused_mix(values: list[Tensor], rstd: list[Tensor] | None, qw: Tensor,
              eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Softmax-mix same-shape sources ``values`` (each ``[..., d]``) with the folded query
    ``qw`` (``fold_query``; ``[d]``, ``[B, 1, d]`` or ``[B, T, d]``) and the cached inverse
    RMS ``rstd`` (each ``[...]``, float32) or ``None`` (computed in the kernel with ``eps``):
    ``(h [..., d] float32, alpha [N, ...] float32)``. The hook of the torch ``History.read``;
    under ``torch.compile`` it runs eagerly between the compiled graphs."""
    if triton is None:
        raise InputError("fused routing needs triton (pip install 'dar[kernels]'), not installed")
    if not values:
        raise InputError("fused routing needs at least one source, got an empty list")
    shape, dtype, dev = tuple(values[0].shape), values[0].dtype, values[0].device
    if dtype not in _DTYPES:
        raise InputError(f"fused routing takes float32/bfloat16/float16 sources, got {dtype}")
    for v in values:
        if tuple(v.shape) != shape or v.dtype != dtype or v.device != dev:
            raise InputError(f"sources differ: {tuple(v.shape)} {v.dtype} {v.device} beside "
                             f"{shape} {dtype} {dev}")
    if len(shape) < 1 or qw.shape[-1] != shape[-1]:
        raise InputError(f"query {tuple(qw.shape)} and sources {shape} disagree on d")
    if rstd is not None and (len(rstd) != len(values) or any(
            tuple(r.shape) != shape[:-1] for r in rstd)):
        raise InputError(f"rstd must be {len(values)} x {shape[:-1]}, got "
                         f"{[tuple(r.shape) for r in rstd]}")
    if dev.type != "cuda" and not interpreted():
        raise InputError(f"fused routing runs on CUDA tensors (or any under TRITON_INTERPRET=1 "
                         f"set before this module is imported), got device {dev}")
    d, lead = shape[-1], shape[:-1]
    Q, q_div = query_rows(tuple(qw.shape), lead, d)
    rows = [v.reshape(-1, d) for v in values]  # views for row-contiguous sources
    stride = rows[0].stride(0)
    rows = [r if r.stride() == (stride, 1) else r.contiguous() for r in rows]
    if any(r.stride() != rows[0].stride() for r in rows):
        rows = [r.contiguous() for r in rows]
    qt = qw.float().reshape(Q, d).contiguous()
    extra = [r.float().reshape(-1).contiguous() for r in rstd] if rstd is not None else []
    h, alpha = _FusedMix.apply(qt, q_div, float(eps), len(rows), *rows, *extra)
    return h.view(*lead, d), alpha.view(len(values), *lead)


def _shape_of(sources: Tensor | list[Tensor]) -> object:
    if isinstance(sources, Tensor):
        return tuple(sources.shape)
    return [tuple(v.shape) for v in sources]


def fused_route(sources: Tensor | list[Tensor], query: Tensor, norm_weight: Tensor, *,
                eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``dar_core.spec.routing.route`` fused: ``sources`` ``[N, ..., d]`` (or a list of
    ``[..., d]``), ``query`` ``[d]`` / ``[B, 1, d]`` / ``[B, T, d]``, ``norm_weight`` ``[d]``
    -> ``(h [..., d], alpha [N, ...])`` in float32, inverse RMS computed in the kernel."""
    values = list(sources.unbind(0)) if isinstance(sources, Tensor) else list(sources)
    if not values or values[0].dim() < 1:
        raise InputError(f"sources must be [N>=1, ..., d], got {_shape_of(sources)}")
    d = values[0].shape[-1]
    if tuple(norm_weight.shape) != (d,):
        raise InputError(f"norm_weight must be [{d}], got {tuple(norm_weight.shape)}")
    return fused_mix(values, None, fold_query(query.float(), norm_weight.float()), eps)
