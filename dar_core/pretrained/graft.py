"""Grafting DAR routing onto a trained model (docs/spec.md §3.1, §7 item 9).

``graft_params(params, src_cfg, dst_cfg)`` maps the parameters of one model onto another
config of the same architecture (every ``ModelConfig`` field equal but ``routing`` and
``name``), with routing added, changed or removed. Everything outside the routers is copied.
Each router parameter of the destination takes the value that reproduces the source's
routing where the source has one, and the uniform-routing value where it has none:

=====================  ================================  ==================================
destination parameter  source has it (a DAR source)      source lacks it
=====================  ================================  ==================================
``norm.weight``        copied                            1
``query``              copied                            0
``query_proj.weight``  copied                            0
``time_gain``          copied                            1 if the source is ``static_t``
                                                         (its implicit gain), else 0
=====================  ================================  ==================================

So a residual model grafted with ``S = 1`` routes uniformly: ``LayerNorm(mean)`` in place of
``LayerNorm(sum)``, the same function up to the LayerNorm eps (§7 item 8), for every query
(``static_t`` through its zero time gain, so the pretrained ``e(t)`` keeps feeding adaLN and
nothing else). A ``static_t`` destination without ``time_gain`` is refused unless the source
already routes with ``e(t)``: its query would use the pretrained ``e(t)`` at full weight.
With ``S > 1`` the uniform start is the closest this parameterisation has (the missing
outputs of earlier chunks cannot be put back); ``graft_deviation`` measures the gap.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from dar_core.errors import ConfigError
from dar_core.io.checkpoint import load_checkpoint, save_checkpoint, writable_parent
from dar_core.spec.config import ModelConfig, RoutingConfig
from dar_core.spec.routing import source_sets
from dar_core.spec.schema import check_params, param_shapes


def graft_config(src: ModelConfig, query: str, chunk_size: int,
                 final_aggregator: bool = True) -> ModelConfig:
    """``src``'s architecture with DAR routing; ``static_t`` gets ``time_gain`` (§3.1)."""
    routing = RoutingConfig(mode="dar", query=query, chunk_size=chunk_size,
                            final_aggregator=final_aggregator, norm_eps=src.routing.norm_eps,
                            time_gain=query == "static_t")
    return src.replace(routing=routing)


def check_same_architecture(src: ModelConfig, dst: ModelConfig) -> None:
    """ConfigError naming the first field (other than routing and name) that differs."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("routing", "name"):
            continue
        a, b = getattr(src, f.name), getattr(dst, f.name)
        if a != b:
            raise ConfigError(f"cannot graft between architectures: {f.name} is {a!r} in the "
                              f"source and {b!r} in the destination")


def _has_time_term(r: RoutingConfig) -> bool:
    return r.is_dar and r.query == "static_t"


def graft_params(params: dict[str, np.ndarray], src_cfg: ModelConfig, dst_cfg: ModelConfig,
                 notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """``dst_cfg``'s parameters from ``src_cfg``'s ``params`` (module docstring); arrays
    outside the routers are shared, not copied. ``notes``, when given, receives one line per
    decision (what was copied, initialised or dropped, and whether the function is kept)."""
    check_same_architecture(src_cfg, dst_cfg)
    check_params(src_cfg, params, where="graft source")
    src, dst = src_cfg.routing, dst_cfg.routing
    if dst.is_dar and dst.query == "static_t" and not dst.time_gain and not _has_time_term(src):
        raise ConfigError("grafting into query='static_t' needs routing.time_gain=True: "
                          "without it the query w + e(t) uses the trained e(t) at full weight "
                          "and the graft changes the function (docs/spec.md §3.1)")
    log = notes if notes is not None else []
    like = params["x_embedder.proj.bias"]
    start = {"norm.weight": 1.0, "query": 0.0, "query_proj.weight": 0.0,
             "time_gain": 1.0 if _has_time_term(src) else 0.0}  # a missing router parameter
    out: dict[str, np.ndarray] = {}
    made: dict[str, int] = {}
    for name, shape in param_shapes(dst_cfg).items():
        if name in params and tuple(params[name].shape) == shape:
            out[name] = params[name]
            continue
        kind = next((k for k in start if name.endswith("." + k)), None)
        if kind is None:  # unreachable for equal architectures; loud if the schema grows
            raise ConfigError(f"the source has no parameter {name!r} of shape {shape}")
        out[name] = np.full(shape, start[kind], dtype=like.dtype)
        what = f"{kind} = {start[kind]:g}"
        made[what] = made.get(what, 0) + 1
    for what, n in made.items():
        log.append(f"initialised {n} router parameters: {what}")
    dropped = [k for k in params if k not in out]
    if dropped:
        log.append(f"dropped {len(dropped)} router parameters the destination has no use for "
                   f"(e.g. {dropped[0]!r})")
    log.append(_verdict(src_cfg, dst_cfg))
    check_params(dst_cfg, out, where="graft result")
    return out


def _verdict(src_cfg: ModelConfig, dst_cfg: ModelConfig) -> str:
    """Whether the graft keeps the function, and why (docs/spec.md §7 item 9)."""
    src, dst = src_cfg.routing, dst_cfg.routing
    L = src_cfg.num_sublayers
    if not dst.is_dar:
        return ("function kept exactly" if not src.is_dar else
                "function NOT kept: the routers are removed and the residual sum replaces "
                "the learned mix")
    if not src.is_dar:
        dense = source_sets(L, RoutingConfig(chunk_size=1))
        if source_sets(L, dst) == dense:  # S = 1, or every sublayer in the first chunk
            return ("function kept up to the LayerNorm eps: dense routing starts uniform and "
                    "feeds LayerNorm(mean) for LayerNorm(sum) (docs/spec.md §7 item 8)")
        return (f"function NOT kept: with chunk_size={dst.chunk_size} the sublayers past the "
                "first chunk no longer see the earlier chunks' non-last outputs; routing starts "
                "uniform, the closest start there is (graft_deviation measures the gap)")
    same_sets = source_sets(L, src) == source_sets(L, dst)
    lost_gain = src.time_gain and not dst.time_gain  # a learned gain replaced by 1
    same_query = (src.query == dst.query and not lost_gain) or (
        src.query == "static" and dst.query == "static_t" and dst.time_gain)
    if same_sets and same_query:
        return "function kept exactly: the same source sets and the source's queries"
    return ("function NOT kept: the routing changed (source sets or query kind); the routers "
            "keep what the destination can use")


def probe_batch(cfg: ModelConfig, n: int = 4, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed inputs for ``graft_deviation``: N(0, 1) images, times spread over [0, 1] (both
    ends), labels drawn over every class and the null class."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.in_channels, cfg.input_size, cfg.input_size))
    t = np.linspace(0.0, 1.0, n)
    y = rng.integers(0, cfg.num_classes + 1, n)
    return x, t, y


def graft_deviation(src_params: dict[str, Any], src_cfg: ModelConfig,
                    dst_params: dict[str, Any], dst_cfg: ModelConfig, n: int = 4,
                    seed: int = 0) -> float:
    """``max|out_dst - out_src| / max|out_src|`` of the float64 reference forward on
    ``probe_batch`` (slow for XL models: float64 NumPy)."""
    from dar_core.spec.reference import forward

    x, t, y = probe_batch(src_cfg, n, seed)
    out, ref = forward(dst_params, dst_cfg, x, t, y), forward(src_params, src_cfg, x, t, y)
    scale = float(np.abs(ref).max())
    diff = float(np.abs(out - ref).max())
    return diff / scale if scale > 0 else diff


def graft_file(src_path: str | os.PathLike, out: str | os.PathLike, query: str,
               chunk_size: int, final_aggregator: bool = True, measure: int = 0
               ) -> tuple[ModelConfig, list[str], float | None]:
    """Graft a dar checkpoint's ``params`` (and ``ema``, when present) into DAR routing and
    save the result at ``out`` (no optimizer state: it no longer fits). ``measure > 0``
    reports ``graft_deviation`` on that many probe inputs, for the weights sampling uses."""
    writable_parent(out)
    ck = load_checkpoint(src_path)
    dst_cfg = graft_config(ck.config, query, chunk_size, final_aggregator)
    notes: list[str] = []
    params = graft_params(ck.params, ck.config, dst_cfg, notes)
    ema = graft_params(ck.ema, ck.config, dst_cfg) if ck.ema is not None else None
    if ck.opt:
        notes.append("dropped the optimizer state (its shapes follow the source's routers)")
    deviation = None
    if measure > 0:
        deviation = graft_deviation(ck.weights("ema"), ck.config,
                                    ema if ema is not None else params, dst_cfg, n=measure)
    meta = {"graft": {"from": str(src_path), "notes": notes, "deviation": deviation,
                      "source_routing": dataclasses.asdict(ck.config.routing)}}
    if "import" in ck.meta:
        meta["import"] = ck.meta["import"]
    save_checkpoint(out, dst_cfg, params, ema=ema, meta=meta)
    return dst_cfg, notes, deviation
