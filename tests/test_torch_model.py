"""PyTorch DARTransformer against the float64 reference, and its efficient routing's gradients."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dar_core.backends.torch import DARTransformer  # noqa: E402
from dar_core.errors import CheckpointError, InputError  # noqa: E402
from dar_core.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dar_core.spec.config import RoutingConfig, model_config  # noqa: E402
from dar_core.spec.reference import forward  # noqa: E402
from dar_core.spec.schema import init_params, param_shapes, random_params  # noqa: E402
from dar_core.testing import PARITY_VARIANTS, parity_inputs, rel_err  # noqa: E402

VARIANTS = PARITY_VARIANTS


_inputs = parity_inputs


def _torch(x, t, y, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype), torch.tensor(t, dtype=dtype), torch.tensor(y)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_reference(name):
    cfg = model_config("tiny", routing=VARIANTS[name])
    p = random_params(cfg, seed=1)
    x, t, y = _inputs(cfg)
    ref = forward(p, cfg, x, t, y)
    model = DARTransformer(cfg)
    model.load_weights({k: v.astype(np.float32) for k, v in p.items()})
    with torch.no_grad():
        out = model(*_torch(x, t, y)).numpy()
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "residual"])
def test_history_routing_gradients_match_naive(name):
    """float64: the custom-autograd history path against autograd through the core ``route``."""
    cfg = model_config("tiny", routing=VARIANTS[name])
    p = random_params(cfg, seed=2)
    x, t, y = _inputs(cfg)
    grads, outs = [], []
    for impl in ("history", "naive"):
        m = DARTransformer(cfg, routing_impl=impl).double()
        m.load_weights(p)
        out = m(*_torch(x, t, y, torch.float64))
        (out.square().mean() + out.mean()).backward()
        outs.append(out.detach())
        grads.append({k: v.grad for k, v in m.named_parameters()})
    assert rel_err(outs[0], outs[1]) < 1e-12
    routers = [k for k in grads[0] if "router" in k]
    assert routers and any(grads[0][k].abs().max() > 0 for k in routers)
    for k in grads[0]:
        assert rel_err(grads[0][k], grads[1][k]) < 1e-10, k


def test_routing_gradcheck_of_the_read():
    """torch.autograd.gradcheck of one routed read w.r.t. sources and query (float64)."""
    from dar_core.backends.torch.routing import History
    from dar_core.spec.routing import source_slices

    r = RoutingConfig(chunk_size=2)
    slices = source_slices(5, r)
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
          for _ in range(5)]
    q = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4, generator=gen, dtype=torch.float64)).requires_grad_()

    def f(q, w, *vs):
        hist = History(vs[0], slices, 1e-6)
        for v in vs[1:]:
            hist.write(v)
        return hist.read(4, q, w)  # final aggregator over {0, 2, 4} u {3, 4}... per slices

    assert torch.autograd.gradcheck(f, (q, w, *vs))


def test_parameter_names_are_the_core_schema():
    for r in VARIANTS.values():
        cfg = model_config("tiny", routing=r)
        sd = DARTransformer(cfg).state_dict()
        shapes = param_shapes(cfg)
        assert sorted(sd) == sorted(shapes)
        assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    model = DARTransformer(model_config("tiny"))
    trainable = {n for n, p in model.named_parameters()}
    assert "pos_embed" not in trainable


def test_init_matches_core_init():
    cfg = model_config("tiny", routing=RoutingConfig(query="static_t"))
    sd = DARTransformer(cfg, seed=5).state_dict()
    for k, v in init_params(cfg, seed=5).items():
        np.testing.assert_array_equal(sd[k].numpy(), v)


def test_core_checkpoint_loads_with_load_state_dict(tmp_path):
    cfg = model_config("tiny", routing=RoutingConfig(query="dynamic", chunk_size=2))
    p = random_params(cfg, seed=3, dtype=np.float32)
    path = save_checkpoint(tmp_path / "c.safetensors", cfg, p)
    model = DARTransformer(load_checkpoint(path).config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_checkpoint(path).params.items()})
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        assert rel_err(model(*_torch(x, t, y)).numpy(), forward(p, cfg, x, t, y)) < 1e-4


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(3, 4, 16, 16)), r"\[B, 3, 16, 16\].*\[3, 4, 16, 16\]"),
    (dict(x=torch.zeros(3, 3, 32, 32)), r"\[3, 3, 32, 32\]"),
    (dict(x=torch.zeros(3, 16, 16)), r"\[3, 16, 16\]"),
    (dict(y=torch.tensor([0, 1, 11])), "label 11"),
    (dict(y=torch.tensor([0.0, 1.0, 2.0])), "integer"),
    (dict(t=torch.tensor([0.1, 1.2, 0.3])), "1.2"),
    (dict(t=torch.tensor([0.1, -0.5, 0.3])), "-0.5"),
    (dict(x=torch.full((3, 3, 16, 16), float("nan"))), "NaN"),
])
def test_bad_inputs_name_the_value(change, match):
    model = DARTransformer(model_config("tiny"))
    args = dict(x=torch.zeros(3, 3, 16, 16), t=torch.tensor([0.1, 0.5, 0.9]),
                y=torch.tensor([0, 1, 10]))
    args.update(change)
    with pytest.raises(InputError, match=match):
        model(**args)


def test_mismatched_checkpoint_names_the_key(tmp_path):
    cfg = model_config("tiny")
    path = save_checkpoint(tmp_path / "c.safetensors", cfg, init_params(cfg))
    model = DARTransformer(cfg.replace(depth=5))
    with pytest.raises(CheckpointError, match="blocks.4"):
        model.load_weights(load_checkpoint(path).params)


def test_bf16_autocast_forward_close_to_fp32():
    cfg = model_config("tiny", routing=RoutingConfig(query="static_t"))
    model = DARTransformer(cfg)
    model.load_weights(random_params(cfg, 4, dtype=np.float32))
    x, t, y = _torch(*_inputs(cfg))
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert rel_err(out.float(), ref) < 5e-2


@pytest.mark.parametrize("query", ["static_t", "dynamic"])
def test_bf16_autocast_backward_runs_and_is_finite(query):
    """Under CPU autocast the gradient reaching the final aggregator can arrive in bf16."""
    cfg = model_config("tiny", routing=RoutingConfig(query=query, chunk_size=4))
    model = DARTransformer(cfg)
    model.load_weights(random_params(cfg, 4, dtype=np.float32))
    x, t, y = _torch(*_inputs(cfg))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name




@pytest.mark.parametrize("query", ["static_t", "dynamic"])
def test_rebuilding_the_routed_input_in_the_backward_changes_no_gradient(query):
    """``recompute_routing`` (on by default) keeps neither the routed input nor the unfolded
    dynamic query; the loss and every gradient match the path that keeps the routed input
    (``recompute_routing=False``) to float32 rounding of the same sums."""
    cfg = model_config("micro", routing=RoutingConfig(query=query, chunk_size=2))
    params = random_params(cfg, seed=3, scale=0.5)  # non-zero gates: every path is exercised
    xn, tn, yn = parity_inputs(cfg, b=3, seed=1)
    x, t = torch.from_numpy(xn.astype(np.float32)), torch.from_numpy(tn.astype(np.float32))
    y = torch.from_numpy(yn.astype(np.int64))
    grads = {}
    for recompute in (True, False):
        model = DARTransformer(cfg, recompute_routing=recompute).load_weights(params)
        loss = model(x, t, y).square().mean()
        loss.backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads[recompute]["loss"] = loss.detach()
    # two float32 LayerNorms (torch's kernel, the two-pass formula of _RecomputedNorm) differ
    # by ulps per element; the dynamic query's gradient is a cancellation (~1e-8 from O(1)
    # terms) and shows them at ~1e-5 relative. A wrong backward is off by O(1).
    for name, g in grads[True].items():
        assert rel_err(g.numpy(), grads[False][name].numpy()) < 1e-4, name
    assert any(float(g.abs().max()) > 0 for n, g in grads[True].items() if "router" in n)
