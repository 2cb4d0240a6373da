"""glowflow.restore: each forward operator against a hand-checked case and its adjoint, the MAP
solver (exact recovery of a complete noiseless observation, a lower data misfit, finite latents,
clear errors) and the Langevin posterior sampler."""
from __future__ import annotations

import pytest
import torch

from glowflow import Glow
from glowflow.restore import (OPERATORS, Blur, CompressedSensing, Denoise, Downsample, Inpaint, make_operator,
                              posterior_samples, psnr, restore)

SHAPE = (1, 8, 8)


def _model(seed=0):
    torch.manual_seed(seed)
    model = Glow(image_shape=SHAPE, levels=2, steps=2, hidden_channels=8).double()
    model.initialize(torch.rand(16, *SHAPE, dtype=torch.float64))
    with torch.no_grad():  # a flow that is not the identity: perturb the zero-initialised outputs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _images(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.2 + 0.6 * torch.rand(n, *SHAPE, generator=g)).double()


ALL = [Denoise(SHAPE), Inpaint.centre(SHAPE, 0.3), Inpaint.random(SHAPE, 0.5, seed=3), Downsample(SHAPE, 2),
       Blur(SHAPE, 1.0), CompressedSensing(SHAPE, ratio=0.4, seed=0)]


def test_every_registered_operator_is_exercised():
    assert set(OPERATORS) == {type(op).name for op in ALL}


@pytest.mark.parametrize("op", ALL, ids=lambda op: type(op).__name__)
def test_each_adjoint_satisfies_the_inner_product_identity(op):
    op = op.to(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randn(2, *op.observation_shape(), generator=g, dtype=torch.float64)
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10), (lhs, rhs)
    assert op.naive(op(x.clamp(0, 1))).shape == x.shape


def test_operators_on_hand_checked_cases():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert Downsample((1, 4, 4), 2)(x).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    op = Inpaint.box((1, 4, 4), 1, 1, 2, 2)
    assert op(x)[0, 0].tolist() == [[0, 1, 2, 3], [4, 0, 0, 7], [8, 0, 0, 11], [12, 13, 14, 15]]
    filled = op.naive(op(x / 15))  # missing pixels take the mean of the observed ones
    assert torch.allclose(filled[0, 0, 1, 1], (x / 15)[op.mask.bool()[None]].mean())
    assert int((1 - Inpaint.centre((1, 10, 10), 0.36).mask).sum()) == 36
    assert int((1 - Inpaint.random((1, 10, 10), 0.3, seed=1).mask).sum()) == 30
    blur = Blur((1, 9, 9), 1.0)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1
    assert torch.allclose(blur(impulse).sum(), torch.tensor(1.0)) and blur(impulse)[0, 0, 4, 4] == blur(impulse).max()
    cs = CompressedSensing((1, 4, 4), measurements=16, seed=0)  # complete: the naive estimate is exact
    assert torch.allclose(cs.naive(cs(x / 15)), x / 15, atol=1e-4)
    assert torch.equal(CompressedSensing((1, 4, 4), 0.5, seed=2).matrix, CompressedSensing((1, 4, 4), 0.5, seed=2).matrix)
    assert Denoise(SHAPE)(x.view(1, 1, 4, 4).expand(1, 1, 4, 4).repeat(1, 1, 2, 2)).shape == (1, 1, 8, 8)


@pytest.mark.parametrize("make,match", [
    (lambda: Inpaint(SHAPE, torch.zeros(8, 8)), "observes no pixel"),
    (lambda: Inpaint(SHAPE, torch.full((8, 8), 0.5)), "0 \\(missing\\) and 1"),
    (lambda: Inpaint(SHAPE, torch.ones(4, 4)), "the mask must be"),
    (lambda: Inpaint.box(SHAPE, 6, 6, 4, 4), "does not lie inside"),
    (lambda: Inpaint.centre(SHAPE, 1.5), "fraction"),
    (lambda: Downsample(SHAPE, 3), "must divide"),
    (lambda: Downsample(SHAPE, 1), "integer >= 2"),
    (lambda: Blur(SHAPE, 0), "sigma"),
    (lambda: CompressedSensing(SHAPE, ratio=0), "measurements"),
    (lambda: make_operator("sharpen", SHAPE), "unknown task"),
])
def test_bad_operators_are_refused_with_a_clear_message(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_complete_noiseless_observation_is_recovered_exactly():
    model, x = _model(), _images()
    op = Denoise(SHAPE)
    result = restore(model, op(x), op, noise_std=0.0, gamma=1.0, steps=10, init="zero")
    assert psnr(result.images, x).min() > 45, psnr(result.images, x)


@pytest.mark.parametrize("op", ALL[1:], ids=lambda op: type(op).__name__)
def test_a_restoration_lowers_the_data_misfit_and_keeps_the_latents_finite(op):
    model, x = _model(), _images()
    op = op.to(dtype=torch.float64)
    y = op(x) + 0.02 * torch.randn(op(x).shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    start = restore(model, y, op, noise_std=0.02, steps=1, optimizer="adam", lr=1e-12)  # the naive start
    result = restore(model, y, op, noise_std=0.02, gamma=0.5, steps=5)
    assert torch.isfinite(result.latents).all() and (result.misfit < start.misfit).all()
    assert result.history == sorted(result.history, reverse=True)
    again = restore(model, y, op, noise_std=0.02, gamma=0.5, steps=5)
    assert torch.equal(again.images, result.images)  # deterministic


def test_the_likelihood_prior_and_adam_also_restore():
    model, x = _model(), _images(2)
    op = Inpaint.centre(SHAPE, 0.3).to(dtype=torch.float64)
    start = restore(model, op(x), op, noise_std=0.01, steps=1, optimizer="adam", lr=1e-12, init="zero")
    for kwargs in ({"prior": "likelihood", "gamma": 0.01}, {"optimizer": "adam", "lr": 0.02}):
        result = restore(model, op(x), op, noise_std=0.01, steps=20, init="zero", **kwargs)
        assert (result.misfit < start.misfit).all(), kwargs


@pytest.mark.parametrize("kwargs,match", [
    ({"noise_std": -0.1}, "noise_std"), ({"noise_std": float("nan")}, "noise_std"), ({"gamma": -1}, "gamma"),
    ({"prior": "tv"}, "prior"), ({"optimizer": "sgd"}, "optimizer"), ({"init": "random"}, "init"),
    ({"steps": 0}, "steps"),
])
def test_bad_solver_settings_are_refused(kwargs, match):
    model, x = _model(), _images(1)
    with pytest.raises(ValueError, match=match):
        restore(model, x, Denoise(SHAPE), **kwargs)


def test_observations_of_the_wrong_shape_or_values_are_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"expected observations \[B, 1, 4, 4\]"):
        restore(model, _images(1), Downsample(SHAPE, 2))
    with pytest.raises(ValueError, match="finite"):
        restore(model, torch.full((1, *SHAPE), float("nan"), dtype=torch.float64), Denoise(SHAPE))
    with pytest.raises(ValueError, match="the operator is for images"):
        restore(model, torch.rand(1, 1, 4, 4), Denoise((1, 4, 4)))


def test_posterior_samples_are_uncertain_where_the_observation_is_missing():
    model, x = _model(), _images(2)
    op = Inpaint.box(SHAPE, 2, 2, 4, 4).to(dtype=torch.float64)
    y = op(x)
    start = restore(model, y, op, noise_std=0.1, steps=5).latents
    post = posterior_samples(model, y, op, 0.1, start, num_samples=16, thin=10, burn_in=50, seed=0)
    assert post.samples.shape == (16, 2, *SHAPE) and torch.isfinite(post.std).all()
    missing = op.mask == 0
    # observed pixels are held near y (their spread below the noise's), missing ones only by the prior
    assert (post.std[:, ~missing].mean(1) < 0.1).all()
    assert (post.std[:, missing].mean(1) > 1.3 * post.std[:, ~missing].mean(1)).all(), post.std
    assert ((post.acceptance > 0.2) & (post.acceptance < 0.95)).all(), post.acceptance
    again = posterior_samples(model, y, op, 0.1, start, num_samples=16, thin=10, burn_in=50, seed=0)
    assert torch.equal(again.samples, post.samples)


def test_the_modules_example_runs():
    import doctest

    import glowflow.restore

    assert doctest.testmod(glowflow.restore).failed == 0
