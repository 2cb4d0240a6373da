"""The elementwise map of the mixture-of-logistics coupling (Ho et al. 2019, "Flow++", section 3.2).

Per element, with ``K`` logistic components of weights ``pi = softmax(logit_pi)``, locations
``mu`` and log-scales ``log_s``::

    F(x) = sum_k pi_k sigmoid((x - mu_k) / s_k)          (a CDF: increasing, onto (0, 1))
    y    = logit(F(x)) = log F(x) - log(1 - F(x))
    dy/dx = f(x) / (F(x) (1 - F(x))),   f = F' = sum_k pi_k sigmoid(z_k) sigmoid(-z_k) / s_k

All three logarithms are log-sum-exps of log-sigmoids, so ``y`` and ``log dy/dx`` stay finite
where ``F`` rounds to 0 or 1. At ``logit_pi = mu = log_s = 0`` every component is the standard
logistic and ``y = x``: a zero-initialised conditioner starts the map at the identity.

The inverse has no closed form; it is found by bisection, which cannot diverge: ``F`` lies
between ``sigmoid(min_k z_k)`` and ``sigmoid(max_k z_k)``, so the solution of ``logit F(x) = y``
lies between ``min_k (mu_k + s_k y)`` and ``max_k (mu_k + s_k y)``.

Parameters are ``[B, K, C, H, W]`` against ``x`` of ``[B, C, H, W]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mixture_logit", "mixture_logit_inverse", "LOG_SCALE_MIN", "MAX_BISECTIONS"]

# Component log-scales are clamped from below (as in Flow++): a component narrower than
# exp(-7) ~ 1e-3 of the unit scale would make the map's slope, and the inverse, ill-conditioned.
LOG_SCALE_MIN = -7.0
# The bisection stops when every bracket is down to a few ulps: about 50 halvings of a bracket a
# few units wide in float64, about 25 in float32, so this bound does not end a finite inverse.
MAX_BISECTIONS = 100


def _check(x: torch.Tensor, logit_pi: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor) -> None:
    want = (x.shape[0], logit_pi.shape[1], *x.shape[1:])
    if logit_pi.dim() != x.dim() + 1 or any(p.shape != want for p in (logit_pi, mu, log_s)):
        raise ValueError(f"mixture parameters must be [B, K, *x.shape[1:]] = {list(want)}; got "
                         f"{[list(p.shape) for p in (logit_pi, mu, log_s)]} for x of {list(x.shape)}")


def _standardise(x, mu, log_s):
    """``z_k = (x - mu_k) / s_k``, ``[B, K, ...]``, for clamped ``log_s``."""
    return (x.unsqueeze(1) - mu) * torch.exp(-log_s)


def _log_tails(x, log_pi, mu, log_s):
    """``(log F(x), log(1 - F(x)), log sigmoid(z), log sigmoid(-z))``, for clamped ``log_s``."""
    z = _standardise(x, mu, log_s)
    up, down = F.logsigmoid(z), F.logsigmoid(-z)
    return torch.logsumexp(log_pi + up, 1), torch.logsumexp(log_pi + down, 1), up, down


def mixture_logit(x: torch.Tensor, logit_pi: torch.Tensor, mu: torch.Tensor,
                  log_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logit F(x), log of d logit F / dx)``, both shaped like ``x``."""
    _check(x, logit_pi, mu, log_s)
    log_pi, log_s = F.log_softmax(logit_pi, dim=1), log_s.clamp_min(LOG_SCALE_MIN)
    log_cdf, log_sf, up, down = _log_tails(x, log_pi, mu, log_s)
    log_pdf = torch.logsumexp(log_pi + up + down - log_s, 1)
    return log_cdf - log_sf, log_pdf - log_cdf - log_sf


def mixture_logit_inverse(y: torch.Tensor, logit_pi: torch.Tensor, mu: torch.Tensor,
                          log_s: torch.Tensor) -> torch.Tensor:
    """The ``x`` with ``logit F(x) = y``, to a few ulps.

    Differentiable: when a graph is being built, the bisection's answer ``x*`` gets the gradients
    of the inverse function theorem (``1 / slope`` for ``y``, ``-(d logit F / d theta) / slope``
    for a parameter) through a term that is exactly zero in value.
    """
    _check(y, logit_pi, mu, log_s)
    with torch.no_grad():
        x = _bisect(y, logit_pi, mu, log_s)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, logit_pi, mu, log_s)):
        value, log_slope = mixture_logit(x, logit_pi, mu, log_s)
        residual = y - value
        x = x + (residual - residual.detach()) * torch.exp(-log_slope.detach())
    return x


def _bisect(y, logit_pi, mu, log_s):
    log_pi, log_s = F.log_softmax(logit_pi, dim=1), log_s.clamp_min(LOG_SCALE_MIN)
    ends = mu + torch.exp(log_s) * y.unsqueeze(1)
    lo, hi = ends.amin(1), ends.amax(1)
    tol = 4 * torch.finfo(y.dtype).eps
    for _ in range(MAX_BISECTIONS):
        mid = 0.5 * (lo + hi)
        # NaN or infinite brackets (latents far off the data) compare False here: they do not
        # keep the loop going, and come out as NaN or inf, for the caller to judge.
        if not bool(((hi - lo) > tol * (1.0 + mid.abs())).any()):
            break
        log_cdf, log_sf, _, _ = _log_tails(mid, log_pi, mu, log_s)
        above = log_cdf - log_sf > y
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return 0.5 * (lo + hi)
