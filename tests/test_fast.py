"""The CPU fast paths equal the reference paths: the thin-side 3x3 convolutions equal F.conv2d
(values and gradients, float64), the coupling network takes them where it says it does (its values
on these routes: test_layers.py), the flow steps' weight-side tensors are prepared per level where
they should be and nowhere else, few-channel affine steps run as one node where they should (values
and gradients against the layers, float64, and against finite differences), and a whole model
computes the same log-density and gradients with the fast paths on and off."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glowflow import Glow
from glowflow import fast as convs
from glowflow.layers import ActNorm, Chain, CouplingNet, FlowStep, InvConv1x1

pytestmark = pytest.mark.usefixtures("single_thread")


def _rand(*shape, seed=0, channels_last=False):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("sign", [1, -1])
def test_shift_steps_are_each_others_adjoint(sign):
    """<shifted_copies(x, s), p> == <x, sum_shifted(p, -s)>: what makes each the other's backward."""
    x, p = _rand(2, 3, 5, 4, seed=1), _rand(2, 27, 5, 4, seed=2)
    lhs = (convs.shifted_copies(x, sign) * p).sum()
    rhs = (x * convs.sum_shifted(p, -sign)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_shifted_copies_is_the_3x3_neighbourhood():
    x = _rand(1, 2, 4, 5, seed=3)
    cols = convs.shifted_copies(x, 1)
    xp = F.pad(x, (1, 1, 1, 1))
    for k, (dh, dw) in enumerate(convs._TAPS):
        torch.testing.assert_close(cols[:, 2 * k:2 * k + 2], xp[:, :, 1 + dh:5 + dh, 1 + dw:6 + dw], rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fn,c_in,c_out", [(convs.conv3x3_thin_in, 2, 7), (convs.conv3x3_thin_out, 7, 3)])
def test_thin_convolutions_equal_conv2d(fn, c_in, c_out, with_bias, channels_last):
    x = _rand(2, c_in, 5, 6, seed=4, channels_last=channels_last).requires_grad_(True)
    w = _rand(c_out, c_in, 3, 3, seed=5).requires_grad_(True)
    b = _rand(c_out, seed=6).requires_grad_(True) if with_bias else None
    torch.testing.assert_close(fn(x, w, b), F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)
    inputs = (x, w, b) if with_bias else (x, w)
    assert torch.autograd.gradcheck(lambda *a: fn(*a) if with_bias else fn(*a, None), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: fn(*a) if with_bias else fn(*a, None), inputs)


def _count_routes(monkeypatch):
    calls = {"in": 0, "out": 0}
    thin_in, thin_out = convs.conv3x3_thin_in, convs.conv3x3_thin_out

    def counted_in(*a):
        calls["in"] += 1
        return thin_in(*a)

    def counted_out(*a):
        calls["out"] += 1
        return thin_out(*a)

    monkeypatch.setattr(convs, "conv3x3_thin_in", counted_in)
    monkeypatch.setattr(convs, "conv3x3_thin_out", counted_out)
    return calls


@pytest.mark.parametrize("shape,w_shape,route", [
    ((2, 4, 10, 10), (128, 4, 3, 3), "in"),   # 32x more outputs, 128 of them, 100 pixels: thin input
    ((2, 64, 10, 10), (2, 64, 3, 3), "out"),  # 32x more inputs: thin output
    ((2, 2, 10, 10), (64, 2, 3, 3), None),    # a thin input to only 64 outputs: oneDNN
    ((2, 8, 10, 10), (128, 8, 3, 3), None),   # only 16x: oneDNN
    ((2, 4, 8, 8), (128, 4, 3, 3), None),     # 64 pixels: oneDNN
])
def test_conv2d_same_dispatch(monkeypatch, shape, w_shape, route):
    calls = _count_routes(monkeypatch)
    x, w, b = _rand(*shape, seed=7), _rand(*w_shape, seed=8), _rand(w_shape[0], seed=9)
    torch.testing.assert_close(convs.conv2d_same(x, w, b), F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)
    assert calls == {"in": int(route == "in"), "out": int(route == "out")}


def test_conv2d_same_under_autocast_is_plain_conv2d(monkeypatch):
    calls = _count_routes(monkeypatch)
    x, w = torch.randn(2, 4, 10, 10), torch.randn(128, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = convs.conv2d_same(x, w)
    assert y.dtype == torch.bfloat16 and calls == {"in": 0, "out": 0}


def test_coupling_net_takes_the_thin_routes(monkeypatch):
    """The shape test_layers.py checks against the literal network takes both thin routes
    (first and last convolution) once initialised."""
    calls = _count_routes(monkeypatch)
    net = CouplingNet(2, 2, 128).double()
    x = _rand(3, 2, 10, 10, seed=10)
    net(x)  # data-dependent init runs the unfolded layers
    calls.update({"in": 0, "out": 0})
    net(x)
    assert calls == {"in": 1, "out": 1}


@pytest.mark.parametrize("shape,levels,hidden,options", [
    ((2, 8, 8), 2, 8, {"permutation": "invconv"}),
    ((2, 8, 8), 2, 8, {"permutation": "invconv_lu", "steps": 3}),
    ((2, 8, 8), 2, 8, {"permutation": "invconv_lu", "gated_levels": 1, "attention_levels": 1, "attention_heads": 2}),
    ((2, 8, 8), 2, 8, {"permutation": "shuffle", "coupling": "additive"}),
    ((1, 20, 20), 1, 128, {"permutation": "invconv"})],
    ids=["plain-shapes", "lu", "gated-attention", "shuffle-additive", "thin-routes"])
def test_model_on_fast_paths_equals_reference_paths(shape, levels, hidden, options, perturb_zero_init):
    options = {"steps": 2, **options}
    model = Glow(image_shape=shape, levels=levels, hidden_channels=hidden, **options).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, *shape), generator=g) / 255.0
    model.initialize(x.double(), generator=g)
    perturb_zero_init(model, std=0.05)
    results = {}
    for fast_paths in (True, False):
        with convs.reference(active=not fast_paths):
            assert convs.enabled() == fast_paths
            model.zero_grad(set_to_none=True)
            logp = model.log_prob(x.double())
            logp.sum().backward()
            results[fast_paths] = (logp.detach(), [p.grad.clone() for p in model.parameters()])
    assert convs.enabled()
    (lp_fast, g_fast), (lp_ref, g_ref) = results[True], results[False]
    torch.testing.assert_close(lp_fast, lp_ref, rtol=1e-12, atol=1e-10)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_reference_paths_take_no_thin_route(monkeypatch):
    calls = _count_routes(monkeypatch)
    net = CouplingNet(2, 4, 128).double()
    x = torch.randn(2, 2, 10, 10, dtype=torch.float64)
    with convs.reference():
        net(x)
        net(x)
    assert calls == {"in": 0, "out": 0}
    net(x)
    assert calls["in"] == 1 and calls["out"] == 1


def _prepared_during_forward(model, x):
    """{layer class name: [whether each flow-step layer of that class ran on prepared tensors]}."""
    seen: dict = {}

    def hook(layer, args):
        seen.setdefault(type(layer).__name__, []).append(layer._prepared is not None)

    handles = [layer.register_forward_pre_hook(hook) for level in model.levels
               for layer in convs.weight_side_layers(level.steps)]
    try:
        model.log_prob(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_flow_steps_run_on_prepared_weights_and_release_them():
    # 12 channels at the first level: steps run layer by layer (few-channel steps: below)
    model = Glow(image_shape=(3, 8, 8), levels=2, steps=3, hidden_channels=8)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = _prepared_during_forward(model, x)  # the first forward initialises actnorm from x
    assert seen and not any(any(v) for v in seen.values())
    seen = _prepared_during_forward(model, x)
    assert set(seen) == {"ActNorm", "InvConv1x1", "_NormedConv", "ZeroConv2d"}
    assert all(all(v) for v in seen.values()) and len(seen["_NormedConv"]) == 2 * 2 * 3
    layers = [m for m in model.modules() if isinstance(m, convs.WeightSide)]
    assert layers and all(m._prepared is None for m in layers)  # nothing kept after the forward
    with convs.reference():
        seen = _prepared_during_forward(model, x)
    assert not any(any(v) for v in seen.values())
    model.memory = "checkpoint"  # recomputes each layer on its own: nothing to share
    assert not any(any(v) for v in _prepared_during_forward(model, x).values())


def test_prepared_weights_group_by_kind_and_shape(monkeypatch):
    """One computation per group of equal kind and shapes; a layer alone in its group computes its own."""
    calls = []
    compute = ActNorm.compute_weights
    monkeypatch.setattr(ActNorm, "compute_weights", staticmethod(lambda logs: calls.append(logs.shape) or compute(logs)))
    layers = torch.nn.ModuleList([ActNorm(3), ActNorm(3), ActNorm(3), ActNorm(5), InvConv1x1(3, lu=True)])
    for layer in layers[:4]:
        layer.initialize(torch.randn(4, layer.logs.shape[1], 2, 2))
    with convs.prepared_weights(layers):
        assert calls == [torch.Size([3, 1, 3, 1, 1])]
        assert layers[3]._prepared is None and layers[4]._prepared is None
        for layer in layers[:3]:
            torch.testing.assert_close(layer.weight_tensors()[0], torch.exp(layer.logs), rtol=0, atol=0)
    assert all(layer._prepared is None for layer in layers)


@pytest.mark.parametrize("path", ["prepared", "one-node"])
def test_fast_paths_benchmark_runs_both_ways_and_restores_the_switch(path):
    """benchmarks/fast_paths.py on a tiny model: both ways timed, the module left as found."""
    import importlib.util
    from pathlib import Path
    file = Path(__file__).resolve().parents[1] / "benchmarks" / "fast_paths.py"
    spec = importlib.util.spec_from_file_location("fast_paths_benchmark", file)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = convs.prepared_weights, convs.GEMM_STEP_MAX_CHANNELS
    row = bench.time_config((1, 8, 8), 2, (2, 1), 8, 2, iters=2, warmup=1, path=path)
    assert (convs.prepared_weights, convs.GEMM_STEP_MAX_CHANNELS) == before
    assert row["steps"] == [2, 1] and row["step_ms_on"] > 0 and row["step_ms_off"] > 0


# ------------------------------------------------------------------- few-channel affine steps
def _step(channels, permutation="invconv_lu", coupling="affine", hidden=8, seed=0, **options):
    """An initialised flow step in float64, moved off its zero init, and an input for it."""
    g = torch.Generator().manual_seed(seed)
    step = FlowStep(channels, hidden, coupling, permutation, g, **options).double()
    x = torch.randn(2, channels, 5, 6, generator=g, dtype=torch.float64) * 2.0 + 0.5
    step(x)  # data-dependent init
    with torch.no_grad():
        for p in step.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    return step, x


def _count_one_node(monkeypatch):
    calls = []
    step = convs.affine_step
    monkeypatch.setattr(convs, "affine_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    return calls


@pytest.mark.parametrize("channels,permutation,sliced", [(4, "invconv_lu", False), (3, "invconv_lu", False),
                                                         (8, "invconv", False), (4, "invconv_lu", True)])
def test_affine_step_equals_the_layers(monkeypatch, channels, permutation, sliced):
    """Output, log|det| and every gradient (input, parameters) of the one-node step equal the layers
    run one by one, for even and odd channel counts, both 1x1 parametrisations and an input that is
    a channel slice of a larger tensor (as after a split)."""
    calls = _count_one_node(monkeypatch)
    step, x = _step(channels, permutation)
    results = []
    for one_node in (True, False):
        step.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        xi = torch.cat([leaf, leaf], 1)[:, 1: channels + 1] if sliced else leaf
        assert xi.is_contiguous() != sliced
        y, logdet = step(xi) if one_node else Chain.forward(step, xi)
        (y.sin().sum() + (logdet * torch.tensor([0.7, -1.3], dtype=torch.float64)).sum()).backward()
        results.append([y, logdet, leaf.grad] + [p.grad for p in step.parameters()])
    assert calls == [1]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_affine_step_backward_is_the_derivative():
    """The written-out backward against finite differences (gradcheck) in every input."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    c, hidden = 3, 4
    x = rand(2, c, 3, 4, scale=1.0)
    scale = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = rand(c)
    w = (torch.eye(c, dtype=torch.float64) + rand(c, c, scale=0.2)).detach().requires_grad_(True)
    net = (rand(hidden, 2, 3, 3), rand(hidden), rand(hidden, hidden, 1, 1), rand(hidden), rand(2, hidden, 3, 3),
           rand(2))

    def fn(x, scale, bias, w, *net):
        return convs.affine_step(x, scale, bias, w, net, 2, 2.0)
    assert torch.autograd.gradcheck(fn, (x, scale, bias, w, *net))


def test_affine_step_only_where_it_applies(monkeypatch):
    """One node for initialised affine steps with a 1x1 convolution on at most
    GEMM_STEP_MAX_CHANNELS channels on the fast paths; layer by layer otherwise."""
    calls = _count_one_node(monkeypatch)

    def used(step, x):
        calls.clear()
        step(x)
        return len(calls) == 1
    step, x = _step(convs.GEMM_STEP_MAX_CHANNELS)
    assert used(step, x)
    assert not used(*_step(convs.GEMM_STEP_MAX_CHANNELS + 1))
    assert not used(*_step(4, coupling="additive"))
    assert not used(*_step(4, permutation="shuffle"))
    assert not used(*_step(4, gated=True))
    assert not used(*_step(4, attention_heads=2))
    with convs.reference():
        assert not used(step, x)
    step.memory = "checkpoint"
    assert not used(step, x)
    fresh = FlowStep(4, 8, "affine", "invconv_lu", torch.Generator().manual_seed(0)).double()
    assert not used(fresh, x[:, :4])  # the first call initialises the actnorms
    assert used(fresh, x[:, :4])
