import pytest

from dar_core.errors import ConfigError
from dar_core.spec.config import ModelConfig, RoutingConfig, model_config, preset_names
from dar_core.spec.schema import count_params, param_shapes
from dar_core.train.run import TrainConfig


@pytest.mark.parametrize("name,depth,hidden,heads", [
    ("SiT-S/2", 12, 384, 6), ("SiT-B/4", 12, 768, 12), ("SiT-L/8", 24, 1024, 16),
    ("SiT-XL/2", 28, 1152, 16), ("DiT-XL/2", 28, 1152, 16)])
def test_presets(name, depth, hidden, heads):
    cfg = model_config(name)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (depth, hidden, heads)
    assert cfg.num_sublayers == 2 * depth


def test_every_preset_builds_a_consistent_config():
    names = preset_names()
    assert {f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} | {
        "tiny", "small", "micro", "deep", "deep16", "deep24"} == set(names)
    for name in names:
        cfg = model_config(name)
        assert cfg.hidden_size % cfg.num_heads == 0, name
        assert cfg.input_size % cfg.patch_size == 0, name
        assert cfg.num_sublayers == 2 * cfg.depth, name
        assert cfg.grid_size == cfg.input_size // cfg.patch_size, name


def test_sit_xl2_parameter_count():
    # SiT-XL/2 with 4 output channels: 675M; DAR adds 2*57*d routing parameters (static).
    res = count_params(model_config("SiT-XL/2", routing="residual"))
    dar = count_params(model_config("SiT-XL/2", routing=RoutingConfig(query="static_t")))
    assert 674e6 < res < 676e6
    assert dar - res == 57 * 2 * 1152
    dyn = count_params(model_config("SiT-XL/2", routing=RoutingConfig(query="dynamic")))
    assert dyn - res == 57 * (1152 + 1152 * 1152)


def test_schema_uses_dit_names():
    s = param_shapes(model_config("SiT-B/2"))
    assert s["x_embedder.proj.weight"] == (768, 4, 2, 2)
    assert s["blocks.0.attn.qkv.weight"] == (3 * 768, 768)
    assert s["t_embedder.mlp.0.weight"] == (768, 256)
    assert s["y_embedder.embedding_table.weight"] == (1001, 768)
    assert s["final_layer.linear.weight"] == (2 * 2 * 4, 768)
    assert s["blocks.11.mlp_router.query"] == (768,)
    assert s["final_router.norm.weight"] == (768,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="dense"), "routing.mode.*'dense'"),
    (dict(query="learned"), "routing.query.*'learned'"),
    (dict(chunk_size=0), "chunk_size.*0"),
    (dict(chunk_size=2.5), "chunk_size.*2.5"),
    (dict(final_aggregator="yes"), "final_aggregator.*'yes'"),
    (dict(norm_eps=0.0), "norm_eps.*0.0"),
])
def test_bad_routing_names_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RoutingConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=66, num_heads=4), "hidden_size=66.*num_heads=4"),
    (dict(input_size=15, patch_size=2), "input_size=15.*patch_size=2"),
    (dict(depth=0), "depth.*0"),
    (dict(num_classes=-3), "num_classes.*-3"),
])
def test_bad_model_names_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="SiT-XXL/2"):
        model_config("SiT-XXL/2")
    with pytest.raises(ConfigError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="lr.*-1"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="precision.*'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match=r"routing_impl must be one of \['auto', 'history', "
                                          r"'fused'\], got 'triton'"):
        TrainConfig(routing_impl="triton")


def test_json_round_trip():
    cfg = model_config("tiny", routing=RoutingConfig(query="dynamic", chunk_size=3,
                                                     final_aggregator=False))
    assert ModelConfig.from_json(cfg.to_json()) == cfg
