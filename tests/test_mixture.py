"""The mixture-of-logistics map: hand-checkable cases, its slope against autograd, its inverse."""
from __future__ import annotations

import math

import pytest
import torch

from glowflow.mixture import LOG_SCALE_MIN, mixture_logit, mixture_logit_inverse

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 3, 4, 4)  # [B, C, H, W]
K = 3


def _params(seed: int = 0, spread: float = 1.0):
    """Random ``(logit_pi, mu, log_s)``, each ``[B, K, C, H, W]``, float64."""
    g = torch.Generator().manual_seed(seed)

    def draw():
        return torch.randn(SHAPE[0], K, *SHAPE[1:], generator=g, dtype=torch.float64)
    return draw(), spread * 2.0 * draw(), spread * 0.7 * draw()


def _x(seed: int = 1) -> torch.Tensor:
    return 3.0 * torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_zero_parameters_are_the_identity():
    x = _x()
    zeros = torch.zeros(SHAPE[0], K, *SHAPE[1:], dtype=torch.float64)
    y, log_slope = mixture_logit(x, zeros, zeros, zeros)
    assert torch.allclose(y, x, atol=1e-12) and log_slope.abs().max().item() < 1e-12


def test_one_component_is_an_affine_map():
    """K = 1: logit(sigmoid((x - m) / s)) = (x - m) / s, slope 1/s."""
    x = _x()
    m, log_s = torch.full((SHAPE[0], 1, *SHAPE[1:]), 0.7, dtype=torch.float64), torch.full(
        (SHAPE[0], 1, *SHAPE[1:]), math.log(2.5), dtype=torch.float64)
    y, log_slope = mixture_logit(x, torch.zeros_like(m), m, log_s)
    assert torch.allclose(y, (x - 0.7) / 2.5, atol=1e-12)
    assert torch.allclose(log_slope, torch.full_like(x, -math.log(2.5)), atol=1e-12)


def test_two_components_match_the_written_out_cdf():
    """pi = (1/4, 3/4), locations -1 and 2, scales 1 and 0.5, at a few points, by hand."""
    x = torch.tensor([-3.0, 0.0, 1.5, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    shape = (1, 2, 1, 1, 4)
    logit_pi = torch.tensor([math.log(0.25), math.log(0.75)], dtype=torch.float64).view(1, 2, 1, 1, 1).expand(shape)
    mu = torch.tensor([-1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1, 1).expand(shape)
    log_s = torch.tensor([0.0, math.log(0.5)], dtype=torch.float64).view(1, 2, 1, 1, 1).expand(shape)
    y, log_slope = mixture_logit(x, logit_pi, mu, log_s)
    for i, xi in enumerate(x.flatten().tolist()):
        sig = [1 / (1 + math.exp(-(xi + 1))), 1 / (1 + math.exp(-(xi - 2) / 0.5))]
        cdf = 0.25 * sig[0] + 0.75 * sig[1]
        pdf = 0.25 * sig[0] * (1 - sig[0]) + 0.75 * sig[1] * (1 - sig[1]) / 0.5
        assert y.flatten()[i].item() == pytest.approx(math.log(cdf / (1 - cdf)), abs=1e-12)
        assert log_slope.flatten()[i].item() == pytest.approx(math.log(pdf / (cdf * (1 - cdf))), abs=1e-12)


def test_log_slope_is_the_derivative():
    params = _params()
    x = _x().requires_grad_(True)
    y, log_slope = mixture_logit(x, *params)
    (grad,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the Jacobian is diagonal
    assert torch.allclose(log_slope, grad.log(), atol=1e-10)
    assert log_slope.std().item() > 0.1  # a map whose slope varies: the check is not vacuous


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0])
def test_inverse_recovers_x(spread):
    """Exact up to the map's conditioning: an error in x, times the slope there, is an error in y
    of rounding size. (Wide spreads make plateaus of slope ~1e-9, where no float64 y pins x down
    better than 1e-7; at unit spread x itself comes back to 1e-10.)"""
    params = _params(seed=2, spread=spread)
    x = _x()
    y, log_slope = mixture_logit(x, *params)
    err = (mixture_logit_inverse(y, *params) - x).abs()
    assert (err * log_slope.exp()).max().item() < 1e-12
    if spread <= 1.0:
        assert err.max().item() < 1e-10


def test_far_tails_stay_finite_and_invert():
    """Where F rounds to 0 or 1 in float64 (|x| = 60 against unit-scale components), y and its
    slope are still finite, and the inverse finds x."""
    params = _params(seed=3)
    x = torch.full(SHAPE, 60.0, dtype=torch.float64)
    x[0] = -60.0
    y, log_slope = mixture_logit(x, *params)
    assert torch.isfinite(y).all() and torch.isfinite(log_slope).all()
    assert (mixture_logit_inverse(y, *params) - x).abs().max().item() < 1e-8


def test_narrow_components_are_clamped():
    logit_pi, mu, _ = _params()
    x = _x()
    narrow = torch.full_like(mu, -30.0)
    assert torch.equal(mixture_logit(x, logit_pi, mu, narrow)[0],
                       mixture_logit(x, logit_pi, mu, torch.full_like(mu, LOG_SCALE_MIN))[0])


def test_non_finite_targets_come_back_non_finite():
    params = _params()
    y = torch.zeros(SHAPE, dtype=torch.float64)
    y[0, 0, 0, 0], y[0, 0, 0, 1] = float("nan"), float("inf")
    x = mixture_logit_inverse(y, *params)
    assert not torch.isfinite(x[0, 0, 0, :2]).any() and torch.isfinite(x.flatten()[2:]).all()


def test_shapes_are_checked():
    logit_pi, mu, log_s = _params()
    with pytest.raises(ValueError, match=r"\[B, K, \*x.shape\[1:\]\]"):
        mixture_logit(_x()[:, :2], logit_pi, mu, log_s)


def test_inverse_is_differentiable():
    """Through the inverse, gradients are those of the inverse function (finite differences)."""
    small = (1, 2, 1, 2)
    g = torch.Generator().manual_seed(4)
    y = torch.randn(small, generator=g, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(1, 2, *small[1:], generator=g, dtype=torch.float64).requires_grad_(True)
              for _ in range(3)]
    assert torch.autograd.gradcheck(mixture_logit_inverse, (y, *params), atol=1e-6)
    x = mixture_logit_inverse(y, *params)
    (grad,) = torch.autograd.grad(x.sum(), y)
    assert torch.allclose(grad, torch.exp(-mixture_logit(x.detach(), *params)[1]), atol=1e-10)
