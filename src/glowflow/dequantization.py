"""Variational dequantization (Ho et al. 2019, "Flow++", section 3.1).

Uniform dequantization trains the flow on ``(x_bins + u) / K`` with ``u ~ U(0, 1)^D``, which bounds
the discrete log-likelihood by ``E_u[log p((x_bins + u) / K)] - D log K``. The flow then has to put
a flat density inside every bin, which a smooth flow does poorly (on Fashion-MNIST half the pixels
are the same black bin). A learned noise distribution ``q(u | x)`` gives the tighter bound

    log P(x_bins) >= E_q[log p((x_bins + u) / K) - log q(u | x)] - D log K,

and reduces to the uniform one when ``q`` is uniform (``log q = 0``). Here ``u = sigmoid(v)`` with
``v = g(eps; x)``, ``eps ~ N(0, I)`` and ``g`` a few affine couplings on the squeezed noise whose
networks also see the image, so

    log q(u | x) = log N(eps) - log|det dg/deps| - sum log sigmoid'(v).

The noise ``eps`` is made from the same uniform draws the training loop already makes for uniform
dequantization (``eps = Phi^-1(noise)``), so batches, resume and ranks stay reproducible.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Squeeze
from .networks import CouplingNet
from .numerics import gaussian_log_prob

__all__ = ["VariationalDequantizer", "ConditionalCoupling", "gaussian_from_uniform"]

# Uniform draws are clamped this far from 0 and 1 before Phi^-1: eps stays within about 6.1 sigma.
_UNIFORM_EDGE = 1e-9


def gaussian_from_uniform(noise: torch.Tensor) -> torch.Tensor:
    """``Phi^-1(noise)``: standard normal values from uniform ones in [0, 1)."""
    u = noise.clamp(_UNIFORM_EDGE, 1.0 - _UNIFORM_EDGE)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


class ConditionalCoupling(nn.Module):
    """Affine coupling whose network sees the pass-through half and a context:
    ``y2 = (x2 + shift) * sigmoid(h + 2)``, ``(shift, h) = net([x1, context])``. Halves alternate
    between layers with ``swap``."""

    def __init__(self, channels: int, context_channels: int, hidden_channels: int, swap: bool = False):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got {channels}")
        self.swap = swap
        self.num_pass = channels // 2 if swap else channels - channels // 2
        num_change = channels - self.num_pass
        self.net = CouplingNet(self.num_pass + context_channels, 2 * num_change, hidden_channels)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, : self.num_pass], x[:, self.num_pass:]

    def _shift_scale(self, x1: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(torch.cat([x1, context], 1)).to(x1.dtype)
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = self._halves(x)
        shift, scale = self._shift_scale(x1, context)
        return torch.cat([x1, (x2 + shift) * scale], 1), torch.log(scale).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        y1, y2 = self._halves(y)
        shift, scale = self._shift_scale(y1, context)
        return torch.cat([y1, y2 / scale - shift], 1)


class VariationalDequantizer(nn.Module):
    """``q(u | x)`` for images of ``channels`` channels: ``(x_centred, eps) -> (u in (0, 1), log q(u | x))``.

    ``x_centred`` is the quantised image as ``x_bins / K - 0.5`` ``[B, C, H, W]``; ``eps`` standard
    normal noise of the same shape. H and W must be even (the noise is squeezed to 4C channels).
    """

    def __init__(self, channels: int, hidden_channels: int = 32, steps: int = 2):
        super().__init__()
        if steps < 1:
            raise ValueError(f"the dequantizer needs at least one coupling, got {steps}")
        c4 = 4 * channels
        self.squeeze = Squeeze()
        self.context = nn.Sequential(
            nn.Conv2d(c4, hidden_channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1), nn.ReLU(),
        )
        self.couplings = nn.ModuleList(ConditionalCoupling(c4, hidden_channels, hidden_channels, swap=i % 2 == 1)
                                       for i in range(steps))

    def forward(self, x_centred: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.context(self.squeeze(x_centred)[0])
        z, _ = self.squeeze(eps)
        logdet = z.new_zeros(z.shape[0])
        for coupling in self.couplings:
            z, ld = coupling(z, context)
            logdet = logdet + ld
        v = self.squeeze.inverse(z)
        log_q = gaussian_log_prob(eps) - logdet - (F.logsigmoid(v) + F.logsigmoid(-v)).flatten(1).sum(1)
        return torch.sigmoid(v), log_q
