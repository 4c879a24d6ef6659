"""The history of sublayer outputs and DAR's aggregation over it, in JAX (docs/spec.md §2-§4).

``History`` is a plain Python object used while a forward pass is traced. It keeps

- ``values``: ``L+1`` preallocated slots for ``v_0 .. v_L`` (each ``[B, T, d]``), each written
  ONCE when its sublayer produces it;
- ``rstd``: ``1 / sqrt(mean(v_l^2) + eps)`` ``[B, T]`` per slot (at least float32), computed
  ONCE per source when it is written, instead of once per aggregator that reads it.

``read(agg)`` takes aggregator ``agg``'s sources as the (at most two) strided slices of
``dar_core.spec.routing.source_slices`` applied to the slot list (views: no gathers, no stacking of
sources) and mixes them with the RMSNorm weight and ``1/sqrt(d)`` folded into the query::

    logit_i = rstd_i * (v_i . (q * w_norm / sqrt(d)))      # == q . RMSNorm(v_i) / sqrt(d)
    h       = sum_i softmax_i(logit)_i * v_i

Only the small ``[N, B, T]`` logits are stacked; the weighted sum is one fused N-input
expression. Why slots and not one ``[L+1, B, T, d]`` array: under XLA's value semantics an
array written with ``dynamic_update_slice`` between reads is copied whenever an older version
is still needed (by later reads or the backward pass), and each read's backward materializes
a buffer-sized gradient; per-source arrays have neither cost (see README.md for numbers).
Logits, softmax and the weighted sum accumulate in at least float32 (float64 stays float64).
Residual mode is the same object with routing off: ``read`` returns the running sum of every
output so far (the plain DiT/SiT stream), materialized after every add.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from dar_core.spec import reference
from dar_core.spec.config import ModelConfig, RoutingConfig
from dar_core.spec.routing import route as spec_route
from dar_core.spec.routing import source_sets, source_slices
from dar_core.spec.schema import router_prefixes


@functools.lru_cache(maxsize=64)
def _slices(num_sublayers: int, routing: RoutingConfig) -> tuple[tuple[slice, ...], ...]:
    return tuple(source_slices(num_sublayers, routing))


def router_query(cfg: ModelConfig, params: dict, prefix: str, t_emb: jax.Array,
                 newest: jax.Array) -> jax.Array:
    """``q_l(t)`` (docs/spec.md §3), broadcastable to ``[B, T, d]``."""
    kind = cfg.routing.query
    if kind == "static":
        return params[f"{prefix}.query"]  # [d]
    if kind == "static_t":
        return params[f"{prefix}.query"] + t_emb[:, None, :]  # [B, 1, d]
    return newest @ params[f"{prefix}.query_proj.weight"].T  # dynamic, from v_{l-1}: [B, T, d]


class History:
    """Sources ``v_0 .. v_L`` of one forward pass and the aggregators reading them."""

    def __init__(self, cfg: ModelConfig, params: dict, v0: jax.Array, t_emb: jax.Array):
        self.cfg, self.params, self.t_emb = cfg, params, t_emb
        self.routing = cfg.routing
        self.slices = _slices(cfg.num_sublayers, cfg.routing)
        self.prefixes = router_prefixes(cfg)
        self.acc = jnp.promote_types(v0.dtype, jnp.float32)  # accumulation dtype
        self.values: list[jax.Array | None] = [None] * (cfg.num_sublayers + 1)
        self.rstd: list[jax.Array | None] = [None] * (cfg.num_sublayers + 1)
        self.count = 0  # slots written so far
        self.total = None  # residual mode: the running sum [B, T, d]
        self.write(v0)

    def write(self, v: jax.Array) -> None:
        """Fill slot ``l`` (= slots written so far) with ``v_l`` ``[B, T, d]``."""
        if self.routing.is_dar:
            va = v.astype(self.acc)
            self.rstd[self.count] = lax.rsqrt(jnp.mean(va * va, axis=-1)
                                              + self.routing.norm_eps)  # [B, T]
        else:
            self.total = v if self.total is None else self.total + v  # [B, T, d]
        self.values[self.count] = v
        self.count += 1

    def read(self, agg: int) -> jax.Array:
        """Input ``[B, T, d]`` of aggregator ``agg`` (0-indexed: sublayer ``agg+1``; ``L``
        is the final layer's)."""
        if not self.routing.is_dar:
            # A barrier on each read materializes the stream and its cotangent: left to
            # itself, XLA fuses the chain of adds into every consumer (each LayerNorm and its
            # backward) and recomputes it there, O(depth^2) work. SiT-S/2's training step
            # took 24 s instead of 4.8 s on CPU.
            return lax.optimization_barrier(self.total)
        prefix = self.prefixes[agg]
        newest = self.values[self.count - 1]  # v_{l-1}: the dynamic query's input
        q = router_query(self.cfg, self.params, prefix, self.t_emb, newest)
        norm_w = self.params[f"{prefix}.norm.weight"]  # [d]
        qw = (q * norm_w).astype(self.acc) / math.sqrt(newest.shape[-1])  # [d]|[B,1,d]|[B,T,d]
        values = [v for s in self.slices[agg] for v in self.values[s]]  # N x [B, T, d]
        rstd = [r for s in self.slices[agg] for r in self.rstd[s]]  # N x [B, T]
        return mix(values, rstd, qw, self.acc)[0].astype(newest.dtype)


class NaiveHistory:
    """Routing the plain way, for tests: a Python list of sources, re-stacked for every
    aggregator, with the core's array-API query and ``route`` (the readable specification)."""

    def __init__(self, cfg: ModelConfig, params: dict, v0: jax.Array, t_emb: jax.Array):
        self.cfg, self.params, self.t_emb = cfg, params, t_emb
        self.items = [v0]
        self.sets = source_sets(cfg.num_sublayers, cfg.routing)
        self.prefixes = router_prefixes(cfg)

    def write(self, v: jax.Array) -> None:
        self.items.append(v)

    def read(self, agg: int) -> jax.Array:
        idx = self.sets[agg]
        if not self.cfg.routing.is_dar:
            return sum(self.items[i] for i in idx)
        prefix = self.prefixes[agg]
        q = reference.router_query(self.cfg, self.params, prefix, self.t_emb, self.items[-1])
        h, _ = spec_route(jnp.stack([self.items[i] for i in idx]), q,
                          self.params[f"{prefix}.norm.weight"], eps=self.cfg.routing.norm_eps)
        return h


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
    qw = (query * norm_weight).astype(acc) / math.sqrt(values[0].shape[-1])
    return mix(values, rstd, qw, acc)
