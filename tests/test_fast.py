"""The CPU fast paths equal the reference paths: the thin-side 3x3 convolutions equal F.conv2d
(values and gradients, float64), the coupling network takes them where it says it does (its values
on these routes: test_layers.py), and a whole model computes the same log-density and gradients
with the fast paths on and off."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glowflow import Glow
from glowflow import fast as convs
from glowflow.layers import CouplingNet

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


@pytest.mark.parametrize("shape,levels,hidden", [((2, 8, 8), 2, 8), ((1, 20, 20), 1, 128)],
                         ids=["plain-shapes", "thin-routes"])
def test_model_on_fast_paths_equals_reference_paths(shape, levels, hidden, perturb_zero_init):
    model = Glow(image_shape=shape, levels=levels, steps=2, hidden_channels=hidden, permutation="invconv").double()
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
