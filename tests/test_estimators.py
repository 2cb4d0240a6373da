"""Direction estimators on synthetic latents with a planted direction: each recovers it as the
number of labelled images grows, every estimator keeps the common contract, the paired one sees
through a confound that fools the others, and conditional projection keeps the other attributes."""
from __future__ import annotations

import pytest
import torch

from glowflow.estimators import ESTIMATORS, PairedDifference, estimator, project_out

SIZES = [96, 32]  # a fine level and the coarsest one, as Glow.latent_shapes orders them
D = sum(SIZES)


def planted(seed: int = 0) -> torch.Tensor:
    """A direction of length 2 on the coarsest level only (where an attribute lives)."""
    v = torch.zeros(D, dtype=torch.float64)
    v[SIZES[0]:] = torch.randn(SIZES[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 2.0 * v / v.norm()


def draw(n: int, shift: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def groups_for(n: int) -> torch.Tensor:
    return torch.arange(n) % max(1, n // 2)


def cosine(a, b) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_each_estimator_recovers_a_planted_direction_as_n_grows(name):
    v = planted()
    est = estimator(name)
    found = {}
    for n in (10, 100, 3000):
        pos, neg = draw(n, v, seed=1), draw(n, 0.0, seed=2)
        groups = groups_for(n)
        d = est.direction(pos, neg, SIZES, groups, groups)
        found[n] = (cosine(d, v), float(d.norm()))
    cosines = [c for c, _ in found.values()]
    assert cosines[0] < cosines[1] < cosines[2] and cosines[2] > 0.95, found
    assert abs(found[3000][1] - 2.0) < 0.2, found  # alpha 1: from the negatives' mean to the positives'


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_keeps_the_contract(name):
    """float32 [D]; alpha 1 moves the negatives' mean onto the positives' along the direction
    (the paired estimator: by the within-group difference); bad input refused."""
    v = planted(3)
    pos, neg = draw(40, v, seed=4), draw(50, 0.0, seed=5)
    est = estimator(name)
    d = est.direction(pos, neg, SIZES, groups_for(40), groups_for(50))
    assert d.dtype == torch.float32 and d.shape == (D,) and torch.isfinite(d).all()
    unit = d.double() / d.double().norm()
    if not isinstance(est, PairedDifference):
        assert float((pos.mean(0) - neg.mean(0)) @ unit) == pytest.approx(float(d.norm()), rel=1e-5)
    with pytest.raises(ValueError, match="latents must be"):
        est.direction(pos[:, :-1], neg[:, :-1], SIZES, groups_for(40), groups_for(50))
    bad = pos.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.direction(bad, neg, SIZES, groups_for(40), groups_for(50))
    if est.streams:  # the running-sum path gives what the latents give
        torch.testing.assert_close(est.from_means(pos.mean(0), neg.mean(0), SIZES), d, atol=1e-5, rtol=1e-5)


def test_the_coarse_estimator_drops_the_fine_levels_sampling_noise():
    v = planted(6)
    pos, neg = draw(10, v, seed=7), draw(10, 0.0, seed=8)
    mean, coarse = estimator("mean").direction(pos, neg, SIZES), estimator("coarse").direction(pos, neg, SIZES)
    assert torch.equal(coarse[:SIZES[0]], torch.zeros(SIZES[0]))
    assert cosine(coarse, v) > cosine(mean, v)  # 96 dimensions of pure noise left out
    with pytest.raises(ValueError, match="levels must be"):
        estimator("coarse", levels=0)


def test_shrinkage_drops_a_level_that_holds_only_noise():
    v = planted(9)
    pos, neg = draw(8, v, seed=10), draw(8, 0.0, seed=11)
    d = estimator("shrunk").direction(pos, neg, SIZES)
    assert float(d[:SIZES[0]].norm()) < 0.2 * float(d[SIZES[0]:].norm())
    with pytest.raises(ValueError, match="at least two images"):
        estimator("shrunk").direction(pos[:1], neg, SIZES)


def test_the_paired_estimator_sees_through_who_has_the_attribute():
    """Half the people never show the attribute and look alike (a shared offset): the mean
    difference mixes that offset into the direction; within-person differences do not."""
    v = planted(12)
    identity = torch.zeros(D, dtype=torch.float64)
    identity[SIZES[0]:] = 3.0 * torch.randn(SIZES[1], generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    people = torch.arange(40)
    offsets = torch.where((people < 20)[:, None], torch.zeros(1, D, dtype=torch.float64), identity)
    noise = lambda seed: 0.1 * torch.randn(40, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # noqa: E731
    neg = offsets + noise(14)
    pos = (offsets + v + noise(15))[:20]  # only the first 20 people appear with it
    paired = estimator("paired").direction(pos, neg, SIZES, people[:20], people)
    mean = estimator("mean").direction(pos, neg, SIZES)
    assert cosine(paired, v) > 0.95 > cosine(mean, v) + 0.3
    with pytest.raises(ValueError, match="no group has images on both sides"):
        estimator("paired").direction(pos, neg[20:], SIZES, people[:20], people[20:])
    with pytest.raises(ValueError, match="needs the group"):
        estimator("paired").direction(pos, neg, SIZES)


def test_conditional_projection_moves_one_attribute_and_keeps_the_others():
    g = torch.Generator().manual_seed(16)
    smile, glasses, beard = torch.randn(3, D, generator=g, dtype=torch.float64)
    conditioned = project_out(smile, [glasses, beard])
    z = torch.randn(D, generator=g, dtype=torch.float64)
    for other in (glasses, beard):
        assert float((z + 1.7 * conditioned) @ other) == pytest.approx(float(z @ other), abs=1e-9)
    assert cosine(conditioned, smile) > 0.5
    torch.testing.assert_close(project_out(smile, []), smile)


def test_an_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="unknown estimator 'median'; expected one of"):
        estimator("median")
