"""Hypothesis strategies drawing whole model configurations and the inputs that fit them.

Related dimensions are drawn together so that every draw is valid: hidden = heads x head_dim
(a multiple of 4), input_size = patch x grid, chunk sizes up to L + 1 (non-divisors of L
included), labels up to the null class, times including both ends.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from dar_core.spec.config import ModelConfig, RoutingConfig


@st.composite
def routing_configs(draw, depth: int) -> RoutingConfig:
    mode = draw(st.sampled_from(["residual", "dar", "dar", "dar"]))
    if mode == "residual":
        return RoutingConfig(mode="residual")
    query = draw(st.sampled_from(["static", "static_t", "dynamic"]))
    return RoutingConfig(
        query=query,
        chunk_size=draw(st.integers(1, 2 * depth + 1)),
        final_aggregator=draw(st.booleans()),
        time_gain=query == "static_t" and draw(st.booleans()),  # docs/spec.md §3.1
    )


@st.composite
def model_configs(draw, max_depth: int = 3) -> ModelConfig:
    depth = draw(st.integers(1, max_depth))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    patch = draw(st.sampled_from([1, 2, 4]))
    grid = draw(st.integers(1, 3))
    return ModelConfig(
        depth=depth,
        hidden_size=heads * head_dim,
        num_heads=heads,
        patch_size=patch,
        input_size=patch * grid,
        in_channels=draw(st.integers(1, 4)),
        num_classes=draw(st.integers(1, 6)),
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
        routing=draw(routing_configs(depth)),
    )


times = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0, allow_nan=False))


@st.composite
def batches(draw, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Inputs, noise, times and labels (null class included) drawn in NumPy."""
    b = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = (b, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = np.array([draw(times) for _ in range(b)])
    y = np.array([draw(st.integers(0, cfg.num_classes)) for _ in range(b)], dtype=np.int64)
    return {"x": rng.standard_normal(shape), "noise": rng.standard_normal(shape), "t": t,
            "y": y, "seed": seed}


param_seeds = st.integers(0, 2**32 - 1)
# Weight scale of ``random_params``: large scales push activations into the ranges where
# approximations differ (e.g. tanh vs exact GELU, LayerNorm eps on small variances).
param_scales = st.sampled_from([0.5, 2.0])
