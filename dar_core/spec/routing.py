"""Routing math of DAR (docs/spec.md §2-§4): which sources each aggregator sees, and the
softmax aggregation over them.

History indices: 0 is ``v_0`` (the input embedding), ``l`` in 1..L is the output of sublayer
``l`` (1-indexed; block ``i`` holds sublayers ``2i+1`` (attention) and ``2i+2`` (MLP)).
Aggregator ``l`` in 1..L feeds sublayer ``l``; aggregator ``L+1`` feeds the final layer.

``route`` is written against the array API (numpy, array_api_strict, torch, jax) with a small
MLX shim. It is the plain four-pass form (norm, logit, softmax, sum), the readable
specification; backends implement a faster, numerically equivalent form.
"""

from __future__ import annotations

import math
from typing import Any

from dar_core.errors import ConfigError, InputError
from dar_core.spec.config import RoutingConfig
from dar_core.xp import namespace


def sublayer_sources(l: int, num_sublayers: int, chunk_size: int) -> tuple[int, ...]:
    """``S_l`` for sublayer ``l`` (1-indexed): summaries of earlier chunks + raw outputs of
    the earlier sublayers of its own chunk."""
    if not 1 <= l <= num_sublayers:
        raise ConfigError(f"sublayer index l={l} is outside 1..{num_sublayers}")
    n = (l - 1) // chunk_size + 1  # 1-indexed chunk of l
    summaries = [0] + [m * chunk_size for m in range(1, n)]  # c_0 .. c_{n-1}
    raw = list(range((n - 1) * chunk_size + 1, l))  # v_{(n-1)S+1} .. v_{l-1}
    return tuple(summaries + raw)


def final_sources(num_sublayers: int, chunk_size: int, final_aggregator: bool) -> tuple[int, ...]:
    """Sources of the final layer's aggregator.

    With ``final_aggregator``: ``{c_0..c_{N-1}}`` plus the raw outputs of the last chunk
    (which may be shorter than ``chunk_size``). Without: the chunk summaries alone, where the
    last chunk's summary is its last output ``v_L``.
    """
    L, S = num_sublayers, chunk_size
    last_start = ((L - 1) // S) * S  # history index of the summary before the last chunk
    summaries = [0] + list(range(S, last_start + 1, S))  # c_0 .. c_{N-1}
    if final_aggregator:
        return tuple(summaries + list(range(last_start + 1, L + 1)))
    return tuple(summaries + [L])


def source_sets(num_sublayers: int, routing: RoutingConfig) -> list[tuple[int, ...]]:
    """Sources of every aggregator: index ``l-1`` feeds sublayer ``l``, the last the final layer.

    Residual mode sees every earlier output (and sums them instead of mixing).
    """
    L = num_sublayers
    if not routing.is_dar:
        return [tuple(range(l)) for l in range(1, L + 2)]
    S = routing.chunk_size
    sets = [sublayer_sources(l, L, S) for l in range(1, L + 1)]
    sets.append(final_sources(L, S, routing.final_aggregator))
    return sets


def route(
    sources: Any,
    query: Any,
    norm_weight: Any,
    *,
    eps: float = 1e-6,
) -> tuple[Any, Any]:
    """Softmax-mix ``N`` sources (docs/spec.md §2).

    sources:     ``[N, ..., d]``: the values ``v_i`` stacked on axis 0 (e.g. ``[N, B, T, d]``)
    query:       broadcastable to ``[..., d]``: ``[d]`` (static), ``[B, 1, d]`` (static_t) or
                 ``[B, T, d]`` (dynamic)
    norm_weight: ``[d]``: the aggregator's RMSNorm weight

    Returns ``(h, alpha)``: ``h = sum_i alpha_i v_i`` of shape ``[..., d]`` and the weights
    ``alpha`` of shape ``[N, ...]`` (softmax over the source axis of
    ``q . RMSNorm(v_i) / sqrt(d)``).
    """
    xp = namespace(sources, query, norm_weight)
    if len(sources.shape) < 2 or sources.shape[0] < 1:
        raise InputError(f"sources must be [N>=1, ..., d], got shape {tuple(sources.shape)}")
    d = sources.shape[-1]
    if query.shape[-1] != d or tuple(norm_weight.shape) != (d,):
        raise InputError(
            f"feature sizes disagree: sources {tuple(sources.shape)} (d={d}), "
            f"query {tuple(query.shape)}, norm_weight {tuple(norm_weight.shape)}"
        )
    rstd = 1.0 / xp.sqrt(xp.mean(sources * sources, axis=-1, keepdims=True) + eps)  # [N,...,1]
    keys = sources * rstd * norm_weight  # [N, ..., d]
    logits = xp.sum(keys * query, axis=-1) / math.sqrt(d)  # [N, ...]
    logits = logits - xp.max(logits, axis=0, keepdims=True)
    e = xp.exp(logits)
    alpha = e / xp.sum(e, axis=0, keepdims=True)  # [N, ...]
    h = xp.sum(xp.expand_dims(alpha, axis=-1) * sources, axis=0)  # [..., d]
    return h, alpha


def router_query(kind: str, t_emb: Any, newest: Any, query: Any = None,
                 query_proj: Any = None, time_gain: Any = None) -> Any:
    """An aggregator's query ``q_l(t)`` (docs/spec.md §3), broadcastable to ``[B, T, d]``.

    ``static``: ``query`` ``[d]``; ``static_t``: ``query + e(t)`` with ``t_emb = e(t)`` ``[B, d]``
    -> ``[B, 1, d]``, or ``query + g e(t)`` with the router's ``time_gain`` ``g`` ``[1]`` when
    the config has one (§3.1; ``None``: no gain, the paper's form, not even a multiply by 1);
    ``dynamic``: ``newest @ query_proj^T`` per token, ``newest = v_{l-1}`` ``[B, T, d]``,
    ``query_proj`` ``[d, d]``. Written with operators only (``+``, ``*``, ``@``, ``.T``,
    indexing), so NumPy, torch, JAX and MLX arrays all go through the same code.
    """
    if kind == "static":
        return query  # [d]
    if kind == "static_t":
        if time_gain is None:
            return query + t_emb[:, None, :]  # [B, 1, d]
        return query + time_gain * t_emb[:, None, :]  # [1] * [B, 1, d] -> [B, 1, d]
    if kind == "dynamic":
        return newest @ query_proj.T  # [B, T, d]
    raise ConfigError(f"query must be one of ['static', 'static_t', 'dynamic'], got {kind!r}")


def fold_query(raw_query: Any, norm_weight: Any) -> Any:
    """``q * w / sqrt(d)``: the aggregator's RMSNorm weight and the logit scale folded into the
    query, so that ``logit_i = rstd_i * (v_i . fold_query(q, w))`` (docs/spec.md §8.2)."""
    return raw_query * (norm_weight / math.sqrt(norm_weight.shape[-1]))


def source_slices(num_sublayers: int, routing: RoutingConfig) -> list[tuple[slice, ...]]:
    """The same sets as ``source_sets``, each as at most two strided slices of the history
    axis (summaries every ``S``-th entry, then the raw outputs of the current chunk), so a
    backend reads sources as views of one preallocated history buffer, never by gathering."""
    L = num_sublayers
    if not routing.is_dar:
        return [(slice(0, l),) for l in range(1, L + 2)]
    S = routing.chunk_size

    def pieces(last_summary: int, raw_start: int, raw_stop: int) -> tuple[slice, ...]:
        out = [slice(0, last_summary + 1, S)]
        if raw_stop > raw_start:
            out.append(slice(raw_start, raw_stop))
        return tuple(out)

    result = []
    for l in range(1, L + 1):
        start = ((l - 1) // S) * S  # index of c_{n-1}
        result.append(pieces(start, start + 1, l))
    last_start = ((L - 1) // S) * S
    if routing.final_aggregator:
        result.append(pieces(last_start, last_start + 1, L + 1))
    elif L - last_start == S:  # the last chunk is full: v_L is the next summary on the stride
        result.append((slice(0, L + 1, S),))
    else:
        result.append(pieces(last_start, L, L + 1))
    return result


def expand_slices(slices: tuple[slice, ...]) -> tuple[int, ...]:
    """History indices covered by ``slices`` (in order)."""
    return tuple(i for s in slices for i in range(s.start, s.stop, s.step or 1))


class NaiveHistory:
    """The routing state written the plain way (docs/spec.md §8.2): a list of sources, re-stacked
    for every read and mixed by ``route``. The readable specification every backend's
    efficient ``History`` is tested against; any array library ``route`` takes.

    The routing-state interface (``dar_core.backend.RoutingState``): built as
    ``(v0, slices, eps)``; ``newest``; ``write(v)``; ``read(k, raw_query, norm_weight)``.
    ``weights`` keeps the routing weights ``[N, B, T]`` of every read.
    """

    def __init__(self, v0: Any, slices: list, eps: float):
        self.values, self.slices, self.eps = [v0], slices, eps
        self.weights: list[Any] = []

    @property
    def newest(self) -> Any:
        return self.values[-1]

    def write(self, v: Any) -> None:
        self.values.append(v)

    def read(self, k: int, raw_query: Any, norm_weight: Any) -> Any:
        xp = namespace(self.values[0])
        stacked = xp.stack([v for s in self.slices[k] for v in self.values[s]])  # [N, B, T, d]
        h, alpha = route(stacked, raw_query, norm_weight, eps=self.eps)
        self.weights.append(alpha)
        return h  # [B, T, d]


class ResidualStream:
    """Routing off, the same interface: every read is the running sum of all outputs so far
    (the plain DiT/SiT stream); ``slices`` and ``eps`` are unused."""

    def __init__(self, v0: Any, slices: list | None = None, eps: float = 0.0):
        self.total, self.newest = v0, v0
        self.weights: list[Any] = []

    def write(self, v: Any) -> None:
        self.total = self.total + v  # [B, T, d]
        self.newest = v

    def read(self, k: int, raw_query: Any = None, norm_weight: Any = None) -> Any:
        return self.total


def query_rows(query_shape: tuple, lead: tuple, d: int) -> tuple[int, int]:
    """How a folded query broadcasts over the sources' rows ``lead`` (the leading dims of a
    source ``[*lead, d]``), for kernels that walk flat rows: ``(Q, q_div)``, ``Q`` query rows
    and ``q_div`` source rows per query row (``[d]``: one query for all rows; ``[B, 1, d]``:
    one per sample; ``[B, T, d]``: one per row)."""
    M = math.prod(lead)
    if tuple(query_shape) == (d,):
        return 1, max(M, 1)
    if tuple(query_shape[:-1]) == tuple(lead):
        return M, 1
    if len(lead) >= 2 and tuple(query_shape[:-1]) == (*lead[:-1], 1):
        return M // lead[-1], lead[-1]
    raise InputError(f"query shape {tuple(query_shape)} does not broadcast per source over "
                     f"rows {tuple(lead)}: expected ({d},), {(*lead[:-1], 1, d)} or "
                     f"{(*lead, d)}")
