"""Attribute direction estimators: from the latents of images with an attribute and without it,
the direction ``d [D]`` that :func:`glowflow.editing.manipulate` moves an image along.

Each estimator is one class with a name, registered when it is defined; ``estimator("coarse")``
makes one. Whatever the estimator, ``alpha = 1`` means the same thing: the direction's length is
how far the negative examples' mean lies from the positive examples' mean along it, so an image
at the negatives' mean is moved to the positives' (the paired estimator measures that distance
within each group instead). Latents are the model's standardised ones, ``[N, D]``, with the
levels' blocks in the order of ``Glow.latent_shapes`` (finest first, the coarsest last).

Example::

    >>> import torch
    >>> from glowflow.estimators import estimator
    >>> pos, neg = torch.randn(30, 8) + torch.tensor([2.0] + [0.0] * 7), torch.randn(30, 8)
    >>> d = estimator("mean").direction(pos, neg, level_sizes=[4, 4])
    >>> d.shape, bool(d[0] > 1)
    (torch.Size([8]), True)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

__all__ = ["Estimator", "MeanDifference", "CoarseMeanDifference", "ShrunkMeanDifference", "ClassifierNormal",
           "PairedDifference", "ESTIMATORS", "DEFAULT_ESTIMATOR", "estimator", "project_out"]

ESTIMATORS: dict[str, type["Estimator"]] = {}
DEFAULT_ESTIMATOR = "mean"  # the best on benchmarks/edits.py (docs/editing.md)


class Estimator:
    """The base: checks the inputs and sets the length of the direction. A subclass gives
    ``name``, a one-line ``description`` and :meth:`_unit` (the direction's orientation); one that
    needs only the two means also :meth:`from_means`, so that directions of large datasets can be
    computed from running sums (:class:`glowflow.directions.DirectionAccumulator`)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_groups: ClassVar[bool] = False  # paired estimators need a group (a person) per image

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            ESTIMATORS[cls.name] = cls

    def direction(self, positive: torch.Tensor, negative: torch.Tensor, level_sizes: Sequence[int],
                  positive_groups: torch.Tensor | None = None,
                  negative_groups: torch.Tensor | None = None) -> torch.Tensor:
        """``positive [P, D]`` and ``negative [Q, D]`` latents -> the direction ``[D]`` (float32)."""
        positive, negative = _check(positive, "positive"), _check(negative, "negative")
        if positive.shape[1] != negative.shape[1] or positive.shape[1] != sum(level_sizes):
            raise ValueError(f"latents must be [N, {sum(level_sizes)}] (the levels' sizes {list(level_sizes)}), got "
                             f"{list(positive.shape)} and {list(negative.shape)}")
        if self.needs_groups and (positive_groups is None or negative_groups is None):
            raise ValueError(f"the {self.name} estimator needs the group (e.g. the person) of every image")
        unit = self._unit(positive, negative, list(level_sizes), positive_groups, negative_groups)
        norm = unit.norm()
        if not norm > 0:
            raise ValueError(f"the {self.name} estimator found no direction: the two sets do not differ")
        unit = unit / norm
        return (unit * self._length(positive, negative, unit, positive_groups, negative_groups)).float()

    def from_means(self, mean_positive: torch.Tensor, mean_negative: torch.Tensor,
                   level_sizes: Sequence[int]) -> torch.Tensor:
        """The direction from the two means alone, where the estimator needs no more."""
        raise NotImplementedError(f"the {self.name} estimator needs the latents, not only their means")

    @property
    def streams(self) -> bool:
        """Whether :meth:`from_means` is enough (no latents need to be kept)."""
        return type(self).from_means is not Estimator.from_means

    def _unit(self, positive, negative, level_sizes, positive_groups, negative_groups) -> torch.Tensor:
        raise NotImplementedError

    def _length(self, positive, negative, unit, positive_groups, negative_groups) -> torch.Tensor:
        """How far the negatives' mean lies from the positives' along ``unit``."""
        return (positive.mean(0) - negative.mean(0)) @ unit


def _check(latents: torch.Tensor, what: str) -> torch.Tensor:
    latents = torch.as_tensor(latents)
    if latents.dim() != 2 or latents.shape[0] < 1:
        raise ValueError(f"{what} latents must be [N, D] with N >= 1, got {list(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{what} latents hold NaN or inf")
    return latents.detach().double()


def _blocks(v: torch.Tensor, level_sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(v, list(level_sizes), -1))


class MeanDifference(Estimator):
    """``mean(positive) - mean(negative)`` over every level: the paper's (section 5.2)."""

    name = "mean"
    description = "mean(z | with) - mean(z | without), every level (the paper's)"

    def _unit(self, positive, negative, level_sizes, *groups):
        return positive.mean(0) - negative.mean(0)

    def from_means(self, mean_positive, mean_negative, level_sizes):
        return (mean_positive - mean_negative).float()


class CoarseMeanDifference(Estimator):
    """The mean difference on the ``levels`` coarsest levels only, zero on the finer ones. A finer
    level's latent is what is left of an image once the coarser ones are known (its split prior
    predicts the rest), so an edit there changes what the image is, and the finer levels, drawn
    from the image itself, fill in its details; their share of a mean difference over few images
    is mostly sampling noise, of norm about ``sqrt(D_level (1/P + 1/Q))``."""

    name = "coarse"
    description = "the mean difference on the coarsest level only (finer levels left as the image has them)"

    def __init__(self, levels: int = 1):
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
        self.levels = levels

    def _keep_coarse(self, d: torch.Tensor, level_sizes) -> torch.Tensor:
        blocks = _blocks(d, level_sizes)
        cut = max(0, len(blocks) - self.levels)
        return torch.cat([torch.zeros_like(b) if i < cut else b for i, b in enumerate(blocks)])

    def _unit(self, positive, negative, level_sizes, *groups):
        return self._keep_coarse(positive.mean(0) - negative.mean(0), level_sizes)

    def from_means(self, mean_positive, mean_negative, level_sizes):
        return self._keep_coarse(mean_positive - mean_negative, level_sizes).float()


class ShrunkMeanDifference(Estimator):
    """The mean difference with each level's block shrunk towards zero by the positive-part
    James-Stein factor ``max(0, 1 - (p - 2) s^2 / |d|^2)`` (James & Stein 1961), ``p`` the block's
    size and ``s^2`` the variance of a coordinate of the difference of two means (pooled over the
    block): a level whose difference is no larger than its sampling noise is dropped, one far above
    it kept almost whole. Needs two or more images on each side."""

    name = "shrunk"
    description = "the mean difference, each level shrunk by its James-Stein factor (noise-dominated levels dropped)"

    def _unit(self, positive, negative, level_sizes, *groups):
        if len(positive) < 2 or len(negative) < 2:
            raise ValueError("the shrunk estimator needs at least two images on each side (a variance)")
        d = positive.mean(0) - negative.mean(0)
        noise = positive.var(0) / len(positive) + negative.var(0) / len(negative)
        out = []
        for db, nb in zip(_blocks(d, level_sizes), _blocks(noise, level_sizes)):
            p, energy = db.numel(), float(db.pow(2).sum())
            factor = max(0.0, 1.0 - (p - 2) * float(nb.mean()) / energy) if energy > 0 and p > 2 else 1.0
            out.append(db * factor)
        return torch.cat(out)


class ClassifierNormal(Estimator):
    """The normal of a linear classifier in latent space (Shen et al. 2020, InterFaceGAN): an
    L2-regularised logistic regression of with (1) against without (0), the classes weighted
    equally; the direction is its weight vector. ``l2`` is the penalty per image."""

    name = "classifier"
    description = "the normal of a logistic regression separating the two sets (InterFaceGAN)"

    def __init__(self, l2: float = 1.0, max_iter: int = 200):
        if not l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.l2, self.max_iter = float(l2), int(max_iter)

    def _unit(self, positive, negative, level_sizes, *groups):
        x = torch.cat([positive, negative])
        y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
        weight = torch.cat([torch.full((len(positive),), 0.5 / len(positive)),
                            torch.full((len(negative),), 0.5 / len(negative))]).double()
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none") * weight).sum() \
                + 0.5 * self.l2 * w.pow(2).sum() / len(x)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return w.detach()


class PairedDifference(Estimator):
    """The mean, over groups holding images on both sides (one person with and without glasses),
    of ``mean(positive in the group) - mean(negative in the group)``: what the attribute changes
    within a group, with what tells the groups apart (identity) left out. Its length is that mean
    difference's own."""

    name = "paired"
    description = "within-group differences (the same person with and without), averaged over groups"
    needs_groups = True

    def _pairs(self, positive, negative, positive_groups, negative_groups) -> torch.Tensor:
        pg, ng = torch.as_tensor(positive_groups).reshape(-1), torch.as_tensor(negative_groups).reshape(-1)
        if len(pg) != len(positive) or len(ng) != len(negative):
            raise ValueError(f"one group per image: got {len(pg)} and {len(ng)} groups for "
                             f"{len(positive)} and {len(negative)} images")
        both = sorted(set(pg.tolist()) & set(ng.tolist()))
        if not both:
            raise ValueError("no group has images on both sides; the paired estimator needs some (e.g. people "
                             "photographed with and without glasses)")
        return torch.stack([positive[pg == g].mean(0) - negative[ng == g].mean(0) for g in both])

    def _unit(self, positive, negative, level_sizes, positive_groups, negative_groups):
        return self._pairs(positive, negative, positive_groups, negative_groups).mean(0)

    def _length(self, positive, negative, unit, positive_groups, negative_groups):
        return self._pairs(positive, negative, positive_groups, negative_groups).mean(0) @ unit


def estimator(name: str | Estimator, **options) -> Estimator:
    """An estimator by name (:data:`ESTIMATORS`), with its options (``coarse``: ``levels``)."""
    if isinstance(name, Estimator):
        return name
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](**options)


def project_out(direction: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """``direction`` with its components along ``others`` removed (Gram-Schmidt): moving along the
    result leaves the projections on the others where they were, so one attribute moves and the
    others stay (InterFaceGAN's conditional manipulation)."""
    basis = []
    for v in others:
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        for u in basis:
            v = v - (v @ u) * u
        if v.norm() > 1e-12:
            basis.append(v / v.norm())
    d = torch.as_tensor(direction, dtype=torch.float64).reshape(-1)
    for u in basis:
        d = d - (d @ u) * u
    return d.to(torch.as_tensor(direction).dtype)
