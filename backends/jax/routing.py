"""The history of sublayer outputs and DAR's aggregation over it, in JAX (docs/spec.md §2-§4).

``History`` is a plain Python object used while a forward pass is traced. It keeps

- ``values``: ``v_0 .. v_l`` (each ``[B, T, d]``), each appended ONCE when its sublayer
  produces it;
- ``rstd``: ``1 / sqrt(mean(v_l^2) + eps)`` ``[B, T]`` per source (at least float32), computed
  ONCE when it is written, instead of once per aggregator that reads it.

``read(k, raw_query, norm_weight)`` takes aggregator ``k``'s sources as the (at most two)
strided slices of ``dar_core.spec.routing.source_slices`` applied to the list (no gathers, no
stacking of sources) and mixes them with the RMSNorm weight and ``1/sqrt(d)`` folded into the
query::

    logit_i = rstd_i * (v_i . fold_query(q, w_norm))      # == q . RMSNorm(v_i) / sqrt(d)
    h       = sum_i softmax_i(logit)_i * v_i

Only the small ``[N, B, T]`` logits are stacked; the weighted sum is one fused N-input
expression. Why a list and not one ``[L+1, B, T, d]`` array: under XLA's value semantics an
array written with ``dynamic_update_slice`` between reads is copied whenever an older version
is still needed (by later reads or the backward pass), and each read's backward materializes
a buffer-sized gradient; per-source arrays have neither cost (see README.md for numbers).
Logits, softmax and the weighted sum accumulate in at least float32 (float64 stays float64).

``NaiveHistory`` (re-stacks the sources for the core's four-pass ``route``, tests) is the
core's; ``ResidualStream`` (routing off, the plain DiT/SiT stream) is the core's behind an
optimization barrier. All three
are built as ``(v0, slices, eps)`` and read as ``read(k, raw_query, norm_weight)``, the same
interface as the torch and MLX backends.
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dar_core.spec import routing as spec_routing
from dar_core.spec.config import RoutingConfig
from dar_core.spec.routing import NaiveHistory, fold_query, source_slices

__all__ = ["FusedHistory", "History", "NaiveHistory", "ResidualStream", "fused_checked", "mix",
           "resolve_impl", "route", "slices_of"]


@functools.lru_cache(maxsize=64)
def slices_of(num_sublayers: int, routing: RoutingConfig) -> tuple[tuple[slice, ...], ...]:
    """``source_slices`` of a config, computed once per config (forward passes are traced
    again for every new shape)."""
    return tuple(source_slices(num_sublayers, routing))


class History:
    """Sources ``v_0 .. v_L`` of one forward pass and the aggregators reading them."""

    def __init__(self, v0: jax.Array, slices: tuple, eps: float):
        self.slices, self.eps = slices, eps
        self.acc = jnp.promote_types(v0.dtype, jnp.float32)  # accumulation dtype
        self.values: list[jax.Array] = []  # v_0 .. v_l, each [B, T, d]
        self.rstd: list[jax.Array] = []  # 1 / RMS(v_l), each [B, T] in acc
        self.write(v0)

    @property
    def newest(self) -> jax.Array:
        return self.values[-1]

    def write(self, v: jax.Array) -> None:
        """Append ``v_l`` ``[B, T, d]`` and its inverse RMS."""
        va = v.astype(self.acc)
        self.rstd.append(lax.rsqrt(jnp.mean(va * va, axis=-1) + self.eps))  # [B, T]
        self.values.append(v)

    def read(self, k: int, raw_query: jax.Array, norm_weight: jax.Array) -> jax.Array:
        """Input ``[B, T, d]`` of aggregator ``k`` (0-indexed: sublayer ``k+1``; ``L`` is the
        final layer's), in the sources' dtype."""
        qw = fold_query(raw_query.astype(self.acc), norm_weight.astype(self.acc))
        values = [v for s in self.slices[k] for v in self.values[s]]  # N x [B, T, d]
        rstd = [r for s in self.slices[k] for r in self.rstd[s]]  # N x [B, T]
        return mix(values, rstd, qw, self.acc)[0].astype(self.newest.dtype)


class FusedHistory(History):
    """``History`` whose reads run the one-pass Pallas kernel (``pallas_route.fused_mix``)
    with the cached inverse RMS: lowered for GPU (Triton) or TPU (Mosaic), run by Pallas's
    interpreter on the CPU. float32 accumulation only: a float64 model reads through ``mix``.
    ``routing_impl="fused"`` asks for it, ``"auto"`` takes it on a GPU or TPU once it has
    passed its self-check there (``fused_checked``)."""

    def read(self, k: int, raw_query: jax.Array, norm_weight: jax.Array) -> jax.Array:
        if self.acc != jnp.float32:
            return super().read(k, raw_query, norm_weight)
        from .pallas_route import fused_mix

        qw = fold_query(raw_query.astype(self.acc), norm_weight.astype(self.acc))
        values = [v for s in self.slices[k] for v in self.values[s]]
        rstd = [r for s in self.slices[k] for r in self.rstd[s]]
        return fused_mix(values, rstd, qw, self.acc, eps=self.eps)[0].astype(self.newest.dtype)


def resolve_impl(impl: str, dtype: jnp.dtype) -> str:
    """The routing implementation a forward pass over ``dtype`` sources runs: ``impl``, or for
    ``"auto"`` the fused kernel on a GPU or TPU default backend where it passed its
    self-check and the accumulation is float32, else ``"history"``."""
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform == "cpu" or jnp.promote_types(dtype, jnp.float32) != jnp.float32:
        return "history"
    return "fused" if fused_checked(platform) else "history"


@functools.cache
def fused_checked(platform: str) -> bool:
    """Whether the fused kernel agrees with ``History`` on ``platform``
    (``dar_core.conformance.kernel_check``), checked once per platform and process; a failure
    is reported once as a warning naming it, and ``"auto"`` keeps ``History``. It runs in a
    thread of its own: ``resolve_impl`` is called while a forward pass is being traced, and
    JAX's tracing state is per thread, so the check computes concrete numbers."""
    from dar_core.conformance.kernel_check import passes

    kind = {"gpu": "cuda", "cuda": "cuda", "rocm": "cuda", "tpu": "tpu"}.get(platform, "cpu")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(passes, _check_read, kind, platform).result()


def _check_read(impl: str, v, q, w, g, dtype: str) -> list:
    """One read of all sources ``v [N, B, T, d]`` through ``impl``'s history with the loss
    ``sum(h * g)``: ``[h, alpha, dv, dq, dw]`` as NumPy (``kernel_check``'s ``run``)."""
    n = v.shape[0]

    def loss(vj, qj, wj):
        state = (FusedHistory if impl == "fused" else History)(vj[0], ((slice(0, n),),), 1e-6)
        for i in range(1, n):
            state.write(vj[i])
        values, rstd = state.values, state.rstd
        qw = fold_query(qj, wj)
        if impl == "fused":
            from .pallas_route import fused_mix

            h, alpha = fused_mix(values, rstd, qw, jnp.float32, eps=1e-6)
        else:
            h, alpha = mix(values, rstd, qw, jnp.float32)
        return jnp.sum(h * g), (h, alpha)

    args = (jnp.asarray(v, getattr(jnp, dtype)), jnp.asarray(q), jnp.asarray(w))
    (_, (h, alpha)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(*args)
    return [np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (h, alpha, *grads)]


class ResidualStream(spec_routing.ResidualStream):
    """Routing off (the core's running sum), each read behind an optimization barrier."""

    def read(self, k: int, raw_query: jax.Array | None = None,
             norm_weight: jax.Array | None = None) -> jax.Array:
        # A barrier on each read materializes the stream and its cotangent: left to itself,
        # XLA fuses the chain of adds into every consumer (each LayerNorm and its backward)
        # and recomputes it there, O(depth^2) work. SiT-S/2's training step took 24 s
        # instead of 4.8 s on CPU.
        return lax.optimization_barrier(self.total)


def mix(values: list[jax.Array], rstd: list[jax.Array], qw: jax.Array,
        acc: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Softmax-mix sources ``values`` (each ``[B, T, d]``) given their cached inverse RMS
    (each ``[B, T]``) and the folded query ``qw``: ``(h [B, T, d] in acc, alpha [N, B, T])``."""
    logits = jnp.stack([jnp.sum(v.astype(acc) * qw, axis=-1) * r
                        for v, r in zip(values, rstd, strict=True)])  # [N, B, T]
    alpha = jax.nn.softmax(logits, axis=0)  # [N, B, T]
    h = sum(alpha[i, ..., None] * v for i, v in enumerate(values))  # [B, T, d] in acc
    return h, alpha


def route(values: list[jax.Array], query: jax.Array, norm_weight: jax.Array,
          eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """The efficient form of ``dar_core.spec.routing.route`` on a list of ``[B, T, d]`` sources and
    an unfolded query (``[d]``, ``[B, 1, d]`` or ``[B, T, d]``): ``(h, alpha [N, B, T])``."""
    acc = jnp.promote_types(values[0].dtype, jnp.float32)
    rstd = [lax.rsqrt(jnp.mean(jnp.square(v.astype(acc)), axis=-1) + eps) for v in values]
    return mix(values, rstd, fold_query(query.astype(acc), norm_weight.astype(acc)), acc)
