"""The elementwise map of the neural spline coupling: a monotonic rational-quadratic spline with
linear tails (Durkan et al. 2019, "Neural Spline Flows", section 3; Gregory & Delbourgo 1982).

On ``[-B, B]`` (``B = tail_bound``) the map passes through ``K + 1`` knots ``(x_k, y_k)`` with
slopes ``d_k`` at them; outside it is the identity, so the boundary slopes are 1 and the map is
continuous with a continuous slope. In bin ``k``, with ``w = x_{k+1} - x_k``, ``h = y_{k+1} - y_k``,
``s = h / w`` and ``t = (x - x_k) / w`` in ``[0, 1]``::

    y     = y_k + h (s t^2 + d_k t (1 - t)) / (s + (d_{k+1} + d_k - 2 s) t (1 - t))
    dy/dx = s^2 (d_{k+1} t^2 + 2 s t (1 - t) + d_k (1 - t)^2) / (s + (d_{k+1} + d_k - 2 s) t (1 - t))^2

which is increasing for positive slopes. The inverse solves a quadratic in ``t`` in closed form.

Unnormalised parameters are ``[..., 3K - 1]`` per element: K widths, K heights (softmax, each
bin at least ``MIN_BIN`` of the interval) and the K - 1 inner slopes (softplus, at least
``MIN_SLOPE``), shifted so that all-zero parameters give equal bins and unit slopes: the identity,
where a zero-initialised network starts the coupling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rational_quadratic", "rational_quadratic_inverse", "MIN_BIN", "MIN_SLOPE"]

# Each bin keeps at least this share of the interval and each knot at least this slope, so that no
# bin collapses and the inverse stays well conditioned.
MIN_BIN = 1e-3
MIN_SLOPE = 1e-3
_SLOPE_SHIFT = math.log(math.expm1(1.0 - MIN_SLOPE))  # softplus(0 + shift) + MIN_SLOPE = 1


def _knots(raw: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised bin sizes ``[..., K]`` -> (knot positions ``[..., K + 1]`` from -bound to bound,
    bin sizes ``[..., K]``)."""
    k = raw.shape[-1]
    sizes = MIN_BIN + (1.0 - MIN_BIN * k) * torch.softmax(raw, -1)
    knots = F.pad(torch.cumsum(sizes, -1), (1, 0))
    knots = 2.0 * bound * knots - bound
    knots = torch.cat([knots[..., :1].clamp(max=-bound), knots[..., 1:-1], knots[..., -1:].clamp(min=bound)], -1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _spline(params: torch.Tensor, bound: float):
    """(x knots, widths, y knots, heights, slopes at the K + 1 knots) from ``[..., 3K - 1]``."""
    k = (params.shape[-1] + 1) // 3
    xk, widths = _knots(params[..., :k], bound)
    yk, heights = _knots(params[..., k: 2 * k], bound)
    inner = MIN_SLOPE + F.softplus(params[..., 2 * k:] + _SLOPE_SHIFT)
    slopes = F.pad(inner, (1, 1), value=1.0)  # the linear tails' slope at the two ends
    return xk, widths, yk, heights, slopes


def _bin(knots: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The bin ``[..., 1]`` holding ``v [...]``: how many inner knots lie at or below it."""
    return (v[..., None] >= knots[..., 1:-1]).sum(-1, keepdim=True)


def _at(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.gather(-1, index)[..., 0]


def _piece(params: torch.Tensor, tail_bound: float, v: torch.Tensor, by_output: bool):
    """The bin holding ``v`` (an input, or an output when ``by_output``): its width ``w``, height
    ``h``, left knot ``(x0, y0)``, the slopes ``d0, d1`` at its ends and its mean slope ``s``."""
    xk, widths, yk, heights, slopes = _spline(params, tail_bound)
    i = _bin(yk if by_output else xk, v)
    w, h = _at(widths, i), _at(heights, i)
    return w, h, _at(xk, i), _at(yk, i), _at(slopes, i), _at(slopes, i + 1), h / w


def rational_quadratic(x: torch.Tensor, params: torch.Tensor, tail_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, log dy/dx)``, both shaped like ``x``; ``params`` is ``[*x.shape, 3K - 1]``."""
    inside = x.abs() < tail_bound
    xc = x.clamp(-tail_bound, tail_bound)
    w, h, x0, y0, d0, d1, s = _piece(params, tail_bound, xc, by_output=False)
    t = ((xc - x0) / w).clamp(0.0, 1.0)
    tt = t * (1 - t)
    denom = s + (d1 + d0 - 2 * s) * tt
    y = y0 + h * (s * t * t + d0 * tt) / denom
    log_slope = 2 * torch.log(s) + torch.log(d1 * t * t + 2 * s * tt + d0 * (1 - t) ** 2) - 2 * torch.log(denom)
    return torch.where(inside, y, x), torch.where(inside, log_slope, torch.zeros_like(log_slope))


def rational_quadratic_inverse(y: torch.Tensor, params: torch.Tensor, tail_bound: float) -> torch.Tensor:
    """The ``x`` with ``rational_quadratic(x, params, tail_bound)[0] == y``."""
    inside = y.abs() < tail_bound
    yc = y.clamp(-tail_bound, tail_bound)
    w, h, x0, y0, d0, d1, s = _piece(params, tail_bound, yc, by_output=True)
    dy = yc - y0
    c2 = d1 + d0 - 2 * s
    a = h * (s - d0) + dy * c2
    b = h * d0 - dy * c2
    c = -s * dy
    # the root in [0, 1], in the form that does not cancel when a is near 0
    t = (2 * c) / (-b - torch.sqrt((b * b - 4 * a * c).clamp_min(0.0)))
    return torch.where(inside, x0 + t.clamp(0.0, 1.0) * w, y)
