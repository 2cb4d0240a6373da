"""Variational dequantization: q(u | x) is a density whose log is exact, the bound is formed right,
and training with it works."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from glowflow import Glow, numerics
from glowflow.dequantization import VariationalDequantizer, gaussian_from_uniform

pytestmark = pytest.mark.usefixtures("single_thread")


def test_log_q_is_the_change_of_variables_of_eps_to_u(perturb_zero_init):
    torch.manual_seed(0)
    dq = perturb_zero_init(VariationalDequantizer(1, hidden_channels=6, steps=3).double(), std=0.02)
    x = torch.randint(0, 256, (2, 1, 4, 4), generator=torch.Generator().manual_seed(1)).double() / 256 - 0.5
    dq(x, torch.zeros_like(x))  # data-dependent init of the networks' actnorms
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, log_q = dq(x, eps)
    assert u.shape == x.shape and (u > 0).all() and (u < 1).all()
    for i in range(2):
        jac = jacobian(lambda e: dq(x[i:i + 1], e.view(1, 1, 4, 4))[0].flatten(), eps[i].flatten())
        expected = numerics.gaussian_log_prob(eps[i:i + 1]) - torch.linalg.slogdet(jac)[1]
        assert log_q[i].item() == pytest.approx(expected.item(), abs=1e-8)
    assert abs(log_q.mean().item() - numerics.gaussian_log_prob(eps).mean().item()) > 1.0  # not trivial


def test_gaussian_from_uniform_is_the_normal_quantile():
    u = torch.tensor([0.5, 0.975, 0.025, 0.0, 1.0 - 1e-12], dtype=torch.float64)
    z = gaussian_from_uniform(u)
    torch.testing.assert_close(z[:3], torch.tensor([0.0, 1.959964, -1.959964], dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.isfinite(z).all() and z[3] < -5.9


def test_the_model_reports_the_variational_bound(perturb_zero_init):
    model = Glow(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4, dequantization="variational",
                 dequant_hidden_channels=4).double()
    x = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(3)).double() / 255
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model.initialize(x, noise=noise)
    perturb_zero_init(model, std=0.1)
    out = model(x, noise=noise)
    x_bins = numerics.quantize(x, 8)
    u, log_q = model.dequantizer(x_bins / 256 - 0.5, gaussian_from_uniform(noise))
    x_deq = (x_bins + u) / 256
    expected = -(model.log_prob(x_deq) - 64 * math.log(256) - log_q) / (64 * math.log(2))
    torch.testing.assert_close(out.bits_per_dim, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.dequant_log_prob, log_q)
    uniform = Glow(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4).double()
    assert uniform(x, noise=noise).dequant_log_prob is None


def test_training_with_variational_dequantization_lowers_the_bound():
    torch.manual_seed(0)
    model = Glow(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=16, dequantization="variational",
                 dequant_hidden_channels=8)
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(32, 1, 8, 8)
    x[:, :, 2:6, 2:6] = torch.randint(128, 256, (32, 1, 1, 1), generator=g) / 255  # a bright square
    model.initialize(x, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = model(x, generator=g).bits_per_dim.mean()
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first - 1.0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.dequantizer.parameters())
