"""glowflow.restore: each forward operator against a hand-checked case and its adjoint, the MAP
solver (exact recovery of a complete noiseless observation, a lower data misfit, finite latents,
clear errors) and the Langevin posterior sampler."""
from __future__ import annotations

import pytest
import torch

from glowflow import Glow
from glowflow import restore as rs
from glowflow.restore import (OPERATORS, VIEWS, Blur, CompressedSensing, Denoise, Downsample, Inpaint, degrade,
                              make_operator, posterior_samples, psnr, restore, ssim)

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
    start = restore(model, y, op, noise_std=0.02, steps=1, optimizer="adam", lr=1e-12, init="zero")  # the start
    result = restore(model, y, op, noise_std=0.02, gamma=0.5, steps=5, init="zero")
    assert torch.isfinite(result.latents).all() and (result.misfit < start.misfit).all()
    assert result.history == sorted(result.history, reverse=True)
    again = restore(model, y, op, noise_std=0.02, gamma=0.5, steps=5, init="zero")
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
    ({"steps": 0}, "steps"), ({"views": 0}, "views"), ({"views": 9}, "views"),
    ({"views": 5, "mirror": False}, "without mirroring"),
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


def test_views_are_pixel_permutations_and_their_inverses():
    x = torch.arange(2 * 8 * 8, dtype=torch.float64).view(2, 1, 8, 8)
    assert len({repr(v) for v in VIEWS}) == len(VIEWS) == 8
    for view in VIEWS:
        seen = view(x)
        assert torch.equal(view.inverse(seen), x)
        assert torch.equal(seen.flatten(1).sort(1).values, x.flatten(1))  # the same pixels, moved
    assert torch.equal(VIEWS[1](x), x.flip(3)) and torch.equal(VIEWS[2](x), x.roll((1, 1), (2, 3)))


def test_restoring_through_views_averages_one_map_estimate_per_view():
    model, x = _model(), _images(2)
    op = Inpaint.centre(SHAPE, 0.3).to(dtype=torch.float64)
    y = degrade(x, op, 0.02, seed=4)
    one = restore(model, y, op, noise_std=0.02, steps=4, views=1)
    three = restore(model, y, op, noise_std=0.02, steps=4, views=3)
    assert three.view_images.shape == (3, 2, *SHAPE)
    torch.testing.assert_close(three.images, three.view_images.mean(0))
    torch.testing.assert_close(three.view_images[0], one.images)  # the first view is the image as it is
    assert not torch.equal(three.view_images[1], three.view_images[0])
    shifted = restore(model, y, op, noise_std=0.02, steps=4, views=2, mirror=False)
    assert not torch.equal(shifted.view_images[1], three.view_images[1])  # a shift, not the mirror


def test_a_step_into_non_finite_latents_is_retried_from_the_best_one(monkeypatch):
    """A decode that overflows mid-solve sends the solver back to its best iterate with shorter
    steps; it goes on improving instead of stopping there."""
    model, x = _model(), _images(2)
    op = Denoise(SHAPE)
    real, calls = model.decode, {"n": 0}

    def overflowing(z, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise ValueError("latents contain NaN or inf")
        return real(z, *args, **kwargs)
    monkeypatch.setattr(model, "decode", overflowing)
    result = restore(model, op(x), op, noise_std=0.01, steps=6, init="zero")
    assert calls["n"] > 20 and len(result.history) == 6 and result.history[-1] < result.history[0]


def test_degrade_adds_seeded_noise_and_leaves_missing_pixels_empty():
    x = _images(2)
    op = Inpaint.centre(SHAPE, 0.3).to(dtype=torch.float64)
    y = degrade(x, op, 0.1, seed=7)
    assert torch.equal(y, degrade(x, op, 0.1, seed=7)) and not torch.equal(y, degrade(x, op, 0.1, seed=8))
    assert (y[:, op.mask == 0] == 0).all()
    assert 0.05 < (y - x)[:, op.mask == 1].std() < 0.15
    with pytest.raises(ValueError, match="noise_std"):
        degrade(x, op, -1.0)


def test_named_regions_hide_a_band_where_faces_have_eyes_and_mouths():
    shape = (1, 64, 64)
    for region, rows in [("eyes", range(22, 32)), ("mouth", range(46, 56))]:
        hidden = Inpaint.region(shape, region).mask[0] == 0
        hidden_rows = hidden.any(1).nonzero().flatten().tolist()
        assert set(hidden_rows) <= set(rows) and len(hidden_rows) >= 8, (region, hidden_rows)
        assert 0.4 < hidden.any(0).float().mean() < 0.8  # across the middle of the face, not to the edges
    assert torch.equal(Inpaint.region(shape, "centre", 0.3).mask, Inpaint.centre(shape, 0.3).mask)
    with pytest.raises(ValueError, match="unknown region 'nose'"):
        Inpaint.region(shape, "nose")


def test_ssim_against_hand_checked_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    flat_a, flat_b = torch.full((1, 1, 11, 11), 0.2), torch.full((1, 1, 11, 11), 0.6)
    # constant images: the luminance term alone, (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(flat_a, flat_b).item() == pytest.approx(expected, rel=1e-6)
    assert ssim(1 - x, x).mean() < 0.0  # a negative image: structure reversed
    with pytest.raises(ValueError, match="window"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 24, 20, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(y, x)
    for i in range(2):
        theirs = metrics.structural_similarity(y[i, 0].numpy(), x[i, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False, data_range=1)
        assert ours[i].item() == pytest.approx(theirs, abs=1e-9)


def test_the_defaults_are_the_documented_ones():
    assert (rs.DEFAULT_GAMMA, rs.DEFAULT_STEPS, rs.DEFAULT_INIT) == (1.5, 12, "zero")


# ----------------------------------------------------------------------------------- Tweedie
def _noisy_model(noise_std=0.1, seed=0):
    torch.manual_seed(seed)
    model = Glow(image_shape=SHAPE, levels=2, steps=2, hidden_channels=8, noise_std=noise_std).double()
    model.initialize(torch.rand(16, *SHAPE, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _log_density(model, u):
    """log p_s(u) of noisy images u (any real values): what denoise differentiates."""
    from glowflow import numerics
    eps, logdet, _ = model._encode(u, None)
    return numerics.gaussian_log_prob(model._flatten(eps)) + logdet


def test_denoise_is_tweedies_formula_with_the_score_by_finite_differences():
    model, s = _noisy_model(0.1), 0.1
    y = _images(2) + s * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h, score = 1e-5, torch.zeros_like(y)
    with torch.no_grad():
        for i in range(y[0].numel()):
            e = torch.zeros(y[0].numel(), dtype=torch.float64)
            e[i] = h
            e = e.view(1, *SHAPE)
            score.view(2, -1)[:, i] = (_log_density(model, y + e) - _log_density(model, y - e)) / (2 * h)
    expected = (y + s * s * score).clamp(0, 1)
    assert torch.allclose(rs.denoise(model, y, shift=0, mirror=False), expected, atol=1e-7)
    # mirrored: each view's estimate in the image's own frame
    mirrored = rs.denoise(model, y.flip(3), shift=0, mirror=False).flip(3)
    assert torch.allclose(rs.denoise(model, y, shift=0), (expected + mirrored) / 2, atol=1e-7)


def _tweedie(model, u, s):
    u = u.detach().requires_grad_(True)
    grad, = torch.autograd.grad(_log_density(model, u).sum(), u)
    return (u + s * s * grad).detach()


def test_denoise_averages_each_pixel_over_the_moves_that_keep_it_in_the_frame(monkeypatch):
    model, s = _noisy_model(0.1), 0.1
    y = _images(2) + s * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    padded = torch.nn.functional.pad(y, (1, 1, 1, 1), mode="replicate")
    # moved[(dy, dx)][i + dy, j + dx] == y[i, j]; the border filled with the edge pixels
    moved = {(dy, dx): padded[..., 1 - dy:9 - dy, 1 - dx:9 - dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert torch.equal(moved[(1, 0)][..., 1:, :], y[..., :-1, :]) and torch.equal(moved[(1, 0)][..., 0, :], y[..., 0, :])
    est = {k: _tweedie(model, u, s) for k, u in moved.items()}
    got = rs.denoise(model, y, shift=1, mirror=False)
    # a corner pixel is in the frame in 4 of the 9 moves, an edge pixel in 6, an inner one in all 9
    corner = sum(est[(dy, dx)][..., dy, dx] for dy in (0, 1) for dx in (0, 1)) / 4
    edge = sum(est[(dy, dx)][..., dy, 3 + dx] for dy in (0, 1) for dx in (-1, 0, 1)) / 6
    inner = sum(est[(dy, dx)][..., 4 + dy, 3 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    for value, (i, j) in ((corner, (0, 0)), (edge, (0, 3)), (inner, (4, 3))):
        assert torch.allclose(got[..., i, j], value.clamp(0, 1), atol=1e-7)
    # the views go through the model a few at a time; how many does not change the result
    monkeypatch.setattr(rs, "DENOISE_BATCH", 2)
    assert torch.allclose(rs.denoise(model, y, shift=1, mirror=False), got, atol=1e-10)


def test_denoise_tops_up_quieter_observations_and_is_deterministic():
    model = _noisy_model(0.2)
    y = _images(2)
    a, b = rs.denoise(model, y, noise_std=0.1, shift=0, seed=3), rs.denoise(model, y, noise_std=0.1, shift=0, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, rs.denoise(model, y, noise_std=0.1, shift=0, seed=4))  # the top-up is drawn
    assert not torch.equal(a, rs.denoise(model, y, shift=0))
    assert torch.equal(rs.denoise(model, y, shift=0, seed=1), rs.denoise(model, y, shift=0, seed=2))  # none drawn


def test_denoise_and_restore_refuse_the_wrong_model_or_noise():
    clean, noisy = _model(), _noisy_model(0.1)
    y = _images(1)
    with pytest.raises(ValueError, match="model of noisy images"):
        rs.denoise(clean, y, 0.1)
    with pytest.raises(ValueError, match="cannot denoise noisier"):
        rs.denoise(noisy, y, 0.2)
    for bad in (-1, 8, 1.5, True, "1"):
        with pytest.raises(ValueError, match="shift must be an integer 0..7"):
            rs.denoise(noisy, y, shift=bad)
    assert torch.equal(rs.denoise(noisy, y), rs.denoise(noisy, y, shift=rs.DEFAULT_DENOISE_SHIFT))
    with pytest.raises(ValueError, match="expected observations"):
        rs.denoise(noisy, torch.rand(1, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="of noisy images"):
        restore(noisy, y, Denoise(SHAPE), 0.1, steps=1)
