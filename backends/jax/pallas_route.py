"""One DAR aggregation as a fused Pallas kernel, forward and backward (docs/spec.md §2.2, §8.2).

The same function as ``dar_core.spec.routing.route`` and the JAX ``mix``/``route`` of
``routing.py``; the math and the one-read-per-source schedule are those of the torch Triton
kernel (``backends/torch/triton_route.py`` has the derivation)::

    forward  (one read of each v_i): r_i = rsqrt(mean(v_i^2) + eps) (or the cached one),
             z_i = r_i (v_i . q~), online softmax (m, l, acc) -> h = acc / l, alpha_i
    backward (one read of each v_i): c = g . h + sum_j alpha_j ga_j,
             beta_i = alpha_i (g . v_i + ga_i - c),
             dv_i = alpha_i g + beta_i r_i q~ [- beta_i z_i r_i^2 / d v_i],  dq~ += beta_i r_i v_i,
             drstd_i = beta_i (v_i . q~) when the inverse RMS was passed in (cached)

Differentiated by ``jax.custom_vjp`` whose backward is the second Pallas kernel. Sources are the
``History``'s list of ``[B, T, d]`` arrays, each a separate kernel operand (no stacking); the
kernel is traced for its source count, like the rest of a JAX forward pass. The grid runs over
blocks of rows (``BM`` rows of one sample when the query is per sample, so its query row is one
block). Query shapes ``[d]``, ``[B, 1, d]``, ``[B, T, d]``; bf16/fp16/fp32 sources, float32
accumulation, ``h`` in float32, ``dv_i`` in the source dtype.

Tested with ``interpret=True`` on CPU (the default off an accelerator). Its GPU (Triton) and
TPU (Mosaic) lowerings have not been compiled: no accelerator was at hand, and both constrain
block shapes (TPU: the last two block dimensions multiples of (8, 128) or whole).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dar_core.errors import InputError
from dar_core.spec.routing import fold_query, query_rows

__all__ = ["fused_mix", "fused_route"]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_F32 = jnp.float32


def _fwd_kernel(n, cached, eps, q_ref, *refs):
    v_refs, r_refs = refs[:n], refs[n:2 * n] if cached else ()
    h_ref, alpha_ref, rstd_ref = refs[-3:]
    q = q_ref[...].astype(_F32)  # [1 or BM, D]: the folded query
    m = lsum = acc = None
    zs = []
    for k in range(n):  # the one read of each source
        v = v_refs[k][...].astype(_F32)  # [BM, D]
        r = r_refs[k][...] if cached else lax.rsqrt(jnp.mean(v * v, axis=-1) + eps)  # [BM]
        rstd_ref[k, :] = r
        z = r * jnp.sum(v * q, axis=-1)  # [BM] logits
        zs.append(z)
        if k == 0:
            m, lsum, acc = z, jnp.ones_like(z), v
            continue
        m_new = jnp.maximum(m, z)
        scale, p = jnp.exp(m - m_new), jnp.exp(z - m_new)
        lsum = lsum * scale + p
        acc = acc * scale[:, None] + p[:, None] * v
        m = m_new
    h_ref[...] = acc / lsum[:, None]
    lse = m + jnp.log(lsum)
    for k in range(n):
        alpha_ref[k, :] = jnp.exp(zs[k] - lse)


def _bwd_kernel(n, cached, inv_d, q_ref, g_ref, h_ref, alpha_ref, ga_ref, rstd_ref, *refs):
    v_refs = refs[:n]
    dv_refs, dq_ref = refs[n:2 * n], refs[2 * n]
    drstd_ref = refs[2 * n + 1] if cached else None
    q = q_ref[...].astype(_F32)
    g = g_ref[...].astype(_F32)  # [BM, D]
    alpha, ga = alpha_ref[...], ga_ref[...]  # [N, BM]
    c = jnp.sum(g * h_ref[...], axis=-1) + jnp.sum(alpha * ga, axis=0)  # [BM]
    dq = jnp.zeros(g.shape, _F32)
    for k in range(n):  # the one read of each source
        v = v_refs[k][...].astype(_F32)
        r, a = rstd_ref[k, :], alpha[k]
        beta = a * (jnp.sum(g * v, axis=-1) + ga[k] - c)  # dL/dlogit_k
        u = jnp.sum(v * q, axis=-1)
        dv = a[:, None] * g + (beta * r)[:, None] * q
        if cached:
            drstd_ref[k, :] = beta * u
        else:
            dv = dv - (beta * u * r * r * r * inv_d)[:, None] * v
        dv_refs[k][...] = dv.astype(dv_refs[k].dtype)
        dq = dq + (beta * r)[:, None] * v
    dq_ref[...] = dq


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static layout of one call (hashable: ``custom_vjp``'s non-differentiable argument):
    rows ``M``, width ``D``, query rows ``Q`` (row ``m`` uses query row ``m // q_div``),
    source count ``n`` and dtype, whether the inverse RMS is passed in (``cached``)."""

    n: int
    M: int
    D: int
    Q: int
    q_div: int
    dtype: jnp.dtype
    cached: bool
    eps: float
    interpret: bool

    @property
    def bm(self) -> int:
        """Rows per block: the largest power of two <= 128 dividing ``M`` (a block stays
        inside one sample when the query is per sample)."""
        return math.gcd(self.q_div if 1 < self.Q < self.M else self.M, 128)

    @property
    def grid(self) -> tuple[int]:
        return (self.M // self.bm,)

    def rows(self):
        return pl.BlockSpec((self.bm, self.D), lambda i: (i, 0))

    def per_source(self):
        return pl.BlockSpec((self.n, self.bm), lambda i: (0, i))

    def vec(self):
        return pl.BlockSpec((self.bm,), lambda i: (i,))

    def query(self):
        if self.Q == 1:
            return pl.BlockSpec((1, self.D), lambda i: (0, 0))
        if self.Q == self.M:
            return self.rows()
        return pl.BlockSpec((1, self.D), lambda i: (i * self.bm // self.q_div, 0))


def _forward(plan, qt, values, rstd):
    shapes = [jax.ShapeDtypeStruct((plan.M, plan.D), _F32),
              jax.ShapeDtypeStruct((plan.n, plan.M), _F32),
              jax.ShapeDtypeStruct((plan.n, plan.M), _F32)]
    in_specs = [plan.query()] + [plan.rows()] * plan.n + ([plan.vec()] * plan.n if
                                                          plan.cached else [])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan.n, plan.cached, plan.eps), grid=plan.grid,
        in_specs=in_specs, out_specs=[plan.rows(), plan.per_source(), plan.per_source()],
        out_shape=shapes, interpret=plan.interpret)(qt, *values, *rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mix(plan, qt, values, rstd):
    h, alpha, _ = _forward(plan, qt, values, rstd)
    return h, alpha


def _mix_fwd(plan, qt, values, rstd):
    h, alpha, rs = _forward(plan, qt, values, rstd)
    return (h, alpha), (qt, values, h, alpha, rs)


def _mix_bwd(plan, res, cts):
    qt, values, h, alpha, rs = res
    gh, ga = cts
    shapes = ([jax.ShapeDtypeStruct((plan.M, plan.D), plan.dtype)] * plan.n
              + [jax.ShapeDtypeStruct((plan.M, plan.D), _F32)]
              + ([jax.ShapeDtypeStruct((plan.n, plan.M), _F32)] if plan.cached else []))
    out_specs = [plan.rows()] * (plan.n + 1) + ([plan.per_source()] if plan.cached else [])
    in_specs = ([plan.query(), plan.rows(), plan.rows(), plan.per_source(), plan.per_source(),
                 plan.per_source()] + [plan.rows()] * plan.n)
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, plan.n, plan.cached, 1.0 / plan.D), grid=plan.grid,
        in_specs=in_specs, out_specs=out_specs, out_shape=shapes,
        interpret=plan.interpret)(qt, gh.astype(_F32), h, alpha, ga.astype(_F32), rs, *values)
    dvs, dq_rows = tuple(outs[:plan.n]), outs[plan.n]
    dqt = dq_rows.reshape(plan.Q, -1, plan.D).sum(1)  # the rows of one query row are adjacent
    drstd = tuple(outs[plan.n + 1]) if plan.cached else ()  # no cache: no cotangent
    return dqt, dvs, drstd


_mix.defvjp(_mix_fwd, _mix_bwd)


def fused_mix(values: list[jax.Array], rstd: list[jax.Array] | None, qw: jax.Array,
              acc: jnp.dtype = _F32, *, eps: float = 1e-6,
              interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """The fused form of ``routing.mix``: sources ``values`` (each ``[..., d]``), their cached
    inverse RMS ``rstd`` (each ``[...]``) or ``None`` (computed in the kernel with ``eps``), the
    folded query ``qw`` -> ``(h [..., d] float32, alpha [N, ...] float32)``. ``acc`` must be
    float32 (the kernel's accumulation); ``interpret`` defaults to True on the CPU."""
    if not values:
        raise InputError("fused routing needs at least one source, got an empty list")
    shape, dtype = tuple(values[0].shape), jnp.dtype(values[0].dtype)
    if dtype not in [jnp.dtype(t) for t in _DTYPES] or jnp.dtype(acc) != jnp.float32:
        raise InputError(f"fused routing takes float32/bfloat16/float16 sources accumulated in "
                         f"float32, got {dtype} accumulated in {jnp.dtype(acc)}")
    if any(tuple(v.shape) != shape or jnp.dtype(v.dtype) != dtype for v in values):
        raise InputError(f"sources differ: {[(tuple(v.shape), str(v.dtype)) for v in values]}")
    if len(shape) < 1 or qw.shape[-1] != shape[-1]:
        raise InputError(f"query {tuple(qw.shape)} and sources {shape} disagree on d")
    if rstd is not None and (len(rstd) != len(values)
                             or any(tuple(r.shape) != shape[:-1] for r in rstd)):
        raise InputError(f"rstd must be {len(values)} x {shape[:-1]}, got "
                         f"{[tuple(r.shape) for r in rstd]}")
    d, lead = shape[-1], shape[:-1]
    Q, q_div = query_rows(tuple(qw.shape), lead, d)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    plan = _Plan(len(values), math.prod(lead), d, Q, q_div, dtype, rstd is not None,
                 float(eps), bool(interpret))
    qt = qw.astype(_F32).reshape(Q, d)
    vs = tuple(v.reshape(plan.M, d) for v in values)
    rs = tuple(r.astype(_F32).reshape(plan.M) for r in rstd) if rstd is not None else ()
    h, alpha = _mix(plan, qt, vs, rs)
    return h.reshape(*lead, d), alpha.reshape(len(values), *lead)


def fused_route(values: list[jax.Array] | jax.Array, query: jax.Array, norm_weight: jax.Array,
                eps: float = 1e-6, *, interpret: bool | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """The fused form of ``routing.route`` (and ``dar_core.spec.routing.route``): sources as a
    list of ``[..., d]`` or stacked ``[N, ..., d]``, an unfolded query, the RMSNorm weight
    ``[d]``; the inverse RMS is computed in the kernel."""
    vals = list(values) if not hasattr(values, "shape") else [values[i] for i in
                                                               range(values.shape[0])]
    if not vals or vals[0].ndim < 1:
        raise InputError("sources must be [N>=1, ..., d], got none or a scalar")
    d = vals[0].shape[-1]
    if tuple(norm_weight.shape) != (d,):
        raise InputError(f"norm_weight must be [{d}], got {tuple(norm_weight.shape)}")
    qw = fold_query(query.astype(_F32), norm_weight.astype(_F32))
    return fused_mix(vals, None, qw, eps=eps, interpret=interpret)
