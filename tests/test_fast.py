"""The CPU fast paths equal the reference paths (the layers as written): the thin-side 3x3
convolutions equal F.conv2d (values and gradients, float64), a level takes them where it says it
does, each path alone and all together give a whole model's log-density and gradients, the
weight-side tensors are computed per group of one kind and shape, few-channel affine steps run as
one node where they should (values and gradients against the layers, float64, and against finite
differences), and no fast path leaves state on a layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glowflow import Glow, GlowConfig
from glowflow import fast as convs
from glowflow.blocks import FlowStep
from glowflow.layers import ActNorm, InvConv1x1, ZeroConv2d
from glowflow.networks import NormedConv

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


def _thin_model():
    """One level of 4 channels at 10x10 with width 128: the coupling network's first convolution
    (2 -> 128) and last (128 -> 4) are thin-side shapes. Initialised, in float64."""
    model = Glow(image_shape=(1, 20, 20), levels=1, steps=1, hidden_channels=128, permutation="invconv").double()
    model.initialize(torch.rand(3, 1, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(10)))
    return model


def test_a_level_takes_the_thin_routes(monkeypatch):
    """The shape above takes both thin routes (first and last convolution) once initialised,
    encoding and decoding, and none on the reference paths or with that path off."""
    model = _thin_model()
    x = torch.rand(3, 1, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    calls = _count_routes(monkeypatch)
    with convs.using(one_node_steps=False):
        model.log_prob(x)
    assert calls == {"in": 1, "out": 1}
    calls.update({"in": 0, "out": 0})
    model.sample(2)  # decoding: the coupling network of the inverse
    assert calls == {"in": 1, "out": 1}
    for block in (convs.reference(), convs.using(thin_convs=False, one_node_steps=False)):
        calls.update({"in": 0, "out": 0})
        with block:
            model.log_prob(x)
        assert calls == {"in": 0, "out": 0}


MODELS = {
    "plain-shapes": ((2, 8, 8), 2, 8, {"permutation": "invconv"}),
    "lu": ((2, 8, 8), 2, 8, {"permutation": "invconv_lu", "steps": 3}),
    "gated-attention": ((2, 8, 8), 2, 8, {"permutation": "invconv_lu", "gated_levels": 1, "attention_levels": 1,
                                          "attention_heads": 2}),
    "shuffle-additive": ((2, 8, 8), 2, 8, {"permutation": "shuffle", "coupling": "additive"}),
    "mixture-conditioned": ((2, 8, 8), 2, 8, {"coupling": "mixture", "num_classes": 3, "conditioned_couplings": True}),
    "thin-routes": ((1, 20, 20), 1, 128, {"permutation": "invconv"}),
}


@pytest.mark.parametrize("paths", ["all", *convs.PATHS])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_on_fast_paths_equals_reference_paths(name, paths, perturb_zero_init):
    """Each path alone, and all of them, against the layers as written: log-density, every
    parameter's gradient and a decode, float64."""
    shape, levels, hidden, options = MODELS[name]
    options = {"steps": 2, **options}
    model = Glow(image_shape=shape, levels=levels, hidden_channels=hidden, **options).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, *shape), generator=g) / 255.0
    y = torch.arange(3) % 3 if options.get("num_classes") else None
    model.initialize(x.double(), y, generator=g)
    perturb_zero_init(model, std=0.05)
    eps = 0.8 * torch.randn(3, model.num_dims, generator=g, dtype=torch.float64)
    on = convs.FastOptions() if paths == "all" else convs.FastOptions(**{p: p == paths for p in convs.PATHS})
    results = {}
    for label, fast_options in (("fast", on), ("reference", convs.FastOptions.none())):
        with convs.using(fast_options):
            assert convs.enabled() == (label == "fast")
            model.zero_grad(set_to_none=True)
            logp = model.log_prob(x.double(), y)
            logp.sum().backward()
            with torch.no_grad():
                decoded = model.decode(eps, y)
            results[label] = (logp.detach(), [p.grad for p in model.parameters()], decoded)
    assert convs.options() == convs.FastOptions()
    (lp_fast, g_fast, x_fast), (lp_ref, g_ref, x_ref) = results["fast"], results["reference"]
    torch.testing.assert_close(lp_fast, lp_ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(x_fast, x_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)  # a class head gets none from the log-density
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_unknown_fast_path_names_are_refused():
    with pytest.raises(ValueError, match="unknown fast paths.*grouped_weights"):
        with convs.using(grouped=False):
            pass


def test_no_fast_path_leaves_state_on_a_layer():
    """A forward and backward pass on every fast path leaves each module's attributes as it found
    them: the fast paths read the layers, they never write to them."""
    model = Glow(image_shape=(2, 8, 8), levels=2, steps=2, hidden_channels=8)
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    model.initialize(x)

    def state():
        return {name: {k: (id(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in vars(m).items()
                       if k not in ("_parameters", "_buffers", "_modules", "_forward_pre_hooks")}
                for name, m in model.named_modules()}
    before = state()
    model.log_prob(x).sum().backward()
    assert state() == before


def test_weight_side_tensors_are_computed_once_per_group(monkeypatch):
    """One computation per kind and shape in a level (stacked), equal to each layer's own; with
    ``grouped_weights`` off, one per layer."""
    model = Glow(image_shape=(3, 8, 8), levels=2, steps=3, hidden_channels=8, permutation="invconv_lu")
    model.initialize(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    steps = model.levels[0].steps
    calls = []
    compute = convs._compute
    monkeypatch.setattr(convs, "_compute", lambda kind, inputs, opts: calls.append(
        (kind, inputs[0].dim())) or compute(kind, inputs, opts))
    weights = convs._weight_tensors(steps, convs.FastOptions())
    # 12 channels: actnorms, 1x1 convs, the two hidden convs (3x3 and 1x1 shapes differ), the last conv
    assert sorted(k.__name__ for k, _ in calls) == sorted(["ActNorm", "InvConv1x1", "NormedConv", "NormedConv",
                                                            "ZeroConv2d"])
    assert len(weights) == 3 * (2 + 3)
    for step in steps:
        scale, logs_sum = weights[step.actnorm]
        torch.testing.assert_close(scale, torch.exp(step.actnorm.logs), rtol=0, atol=0)
        torch.testing.assert_close(weights[step.permute][0], step.permute.compose(*step.permute.factors())[0])
    calls.clear()
    convs._weight_tensors(steps, convs.FastOptions(grouped_weights=False))
    assert len(calls) == 3 * 5 and all(kind in (ActNorm, InvConv1x1, NormedConv, ZeroConv2d) for kind, _ in calls)


@pytest.mark.parametrize("path", ["grouped_weights", "one_node_steps"])
def test_fast_paths_benchmark_runs_both_ways_and_leaves_the_options_as_found(path):
    """benchmarks/fast_paths.py on a tiny model: both ways timed, the options left as found."""
    import importlib.util
    from pathlib import Path
    file = Path(__file__).resolve().parents[1] / "benchmarks" / "fast_paths.py"
    spec = importlib.util.spec_from_file_location("fast_paths_benchmark", file)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = convs.options()
    row = bench.time_config((1, 8, 8), 2, (2, 1), 8, 2, iters=2, warmup=1, path=path)
    assert convs.options() == before
    assert row["steps"] == [2, 1] and row["step_ms_on"] > 0 and row["step_ms_off"] > 0


# ------------------------------------------------------------------- few-channel affine steps
def _step(channels, permutation="invconv_lu", coupling="affine", hidden=8, seed=0, gated=False, attention_heads=0):
    """An initialised flow step of ``channels`` (a multiple of 4) in float64, moved off its zero
    init, and an input for it."""
    g = torch.Generator().manual_seed(seed)
    config = GlowConfig(image_shape=(channels // 4, 10, 12), levels=1, steps=1, hidden_channels=hidden,
                        permutation=permutation, coupling=coupling, gated_levels=int(gated),
                        attention_levels=int(attention_heads > 0), attention_heads=attention_heads or 4)
    step = FlowStep(config, 0, g).double()
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


@pytest.mark.parametrize("channels,permutation,sliced", [(4, "invconv_lu", False), (8, "invconv", False),
                                                         (4, "invconv_lu", True)])
def test_affine_step_equals_the_layers(monkeypatch, channels, permutation, sliced):
    """Output, log|det| and every gradient (input, parameters) of the one-node step equal the layers
    run one by one, for both 1x1 parametrisations and an input that is a channel slice of a larger
    tensor (as after a split)."""
    calls = _count_one_node(monkeypatch)
    step, x = _step(channels, permutation)
    results = []
    for one_node in (True, False):
        step.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        xi = torch.cat([leaf, leaf], 1)[:, 1: channels + 1] if sliced else leaf
        assert xi.is_contiguous() != sliced
        y, logdet = convs.step_forward(step, xi) if one_node else step(xi)
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
    """One node for initialised, unconditioned affine steps with the plain network after a 1x1
    convolution on at most GEMM_STEP_MAX_CHANNELS channels, with the path on; layer by layer
    otherwise, and never under the other memory modes."""
    calls = _count_one_node(monkeypatch)

    def used(step, x):
        calls.clear()
        convs.step_forward(step, x)
        return len(calls) == 1
    step, x = _step(convs.GEMM_STEP_MAX_CHANNELS)
    assert used(step, x)
    assert not used(*_step(convs.GEMM_STEP_MAX_CHANNELS + 4))
    assert not used(*_step(4, coupling="additive"))
    assert not used(*_step(4, permutation="shuffle"))
    assert not used(*_step(4, gated=True))
    assert not used(*_step(4, attention_heads=2))
    with convs.reference():
        assert not used(step, x)
    with convs.using(one_node_steps=False):
        assert not used(step, x)
    fresh = FlowStep(GlowConfig(image_shape=(2, 10, 12), levels=1, steps=1, hidden_channels=8), 0).double()
    assert not used(fresh, x)  # the first call initialises the actnorms
    assert used(fresh, x)
    model = Glow(image_shape=(1, 8, 8), levels=1, steps=2, hidden_channels=8)
    model.initialize(torch.rand(4, 1, 8, 8))
    for memory, expected in (("none", 2), ("checkpoint", 0), ("invertible", 0)):
        model.memory = memory
        calls.clear()
        model.log_prob(torch.rand(2, 1, 8, 8)).sum().backward()
        assert len(calls) == expected, memory
