"""Quantisation, dequantisation and the bits/dim formula: the one place they are defined.

Training, evaluation, scoring and the tests all call these, so the number a user reads is the
number the objective optimises.
"""
from __future__ import annotations

import math

import torch

__all__ = ["to_unit", "as_image_batch", "n_bins", "quantize", "dequantize", "bin_centre", "discrete_log_likelihood", "bits_per_dim",
           "gaussian_log_prob", "to_flow_input", "from_flow_input", "LOG_2PI"]

LOG_2PI = math.log(2 * math.pi)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) -> float32 in [0, 1]: the form every model method takes."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255.0)


def as_image_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[C, H, W]`` or ``[B, C, H, W]`` -> float ``[B, C, H, W]`` (uint8 is divided by 255);
    ``name`` is the argument a wrong type is reported under."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [B, C, H, W] or [C, H, W], got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dtype == torch.uint8:
        x = to_unit(x)
    return x


def n_bins(n_bits: int) -> int:
    if not 1 <= int(n_bits) <= 8:
        raise ValueError(f"n_bits must be an integer in 1..8, got {n_bits!r}")
    return 2 ** int(n_bits)


def quantize(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Images in [0, 1] (8-bit values / 255) -> integer bins in [0, 2**n_bits), as float.

    The 8-bit value is recovered first (round(x * 255)) and its low bits dropped, as the Glow paper
    does for 5-bit CelebA-HQ.
    """
    x8 = torch.round(x * 255.0).clamp_(0, 255)
    return torch.floor(x8 / 2 ** (8 - int(n_bits)))


def dequantize(x_bins: torch.Tensor, n_bits: int, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """Integer bins -> continuous values in [0, 1): (bin + u) / n_bins with u ~ U(0, 1).

    ``noise`` (u, shaped like ``x_bins``) may be given, e.g. drawn for a global batch and sliced per rank.
    """
    if noise is None:
        gen_device = generator.device if generator is not None else x_bins.device
        noise = torch.rand(x_bins.shape, generator=generator, device=gen_device, dtype=x_bins.dtype)
    elif noise.shape != x_bins.shape:
        raise ValueError(f"noise must have the shape of x {list(x_bins.shape)}, got {list(noise.shape)}")
    noise = noise.to(device=x_bins.device, dtype=x_bins.dtype)
    return (x_bins + noise) / n_bins(n_bits)


def bin_centre(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Images in [0, 1] (8-bit values / 255) -> the centre of each value's ``n_bits`` bin,
    ``(bin + 1/2) / n_bins``: the point a discrete image stands for in the continuous space a model
    with uniform dequantisation was trained on (its training values spread over the whole bin). A
    pixel at 0 becomes 1/512 for 8 bits, not 0, which a logit input would stretch to its extreme."""
    return (quantize(x, n_bits) + 0.5) / n_bins(n_bits)


def discrete_log_likelihood(log_prob: torch.Tensor, num_dims: int, n_bits: int,
                            log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Density of dequantised data in [0,1]^D -> log-probability of the discrete image (nats).

    Each bin has volume (1 / n_bins)^D, so log P(bin) >= log p(x + u) - D log(n_bins) - log q(u)
    in expectation over the dequantisation noise u ~ q (the variational bound; uniform noise has
    log q = 0, the default).
    """
    out = log_prob - num_dims * math.log(n_bins(n_bits))
    return out if log_q is None else out - log_q


def bits_per_dim(log_prob: torch.Tensor, num_dims: int, n_bits: int, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's metric: -log P(discrete image) / (D ln 2), from a density on [0,1]^D (and, for a
    learned dequantization, the log-density ``log_q`` of its noise)."""
    return -discrete_log_likelihood(log_prob, num_dims, n_bits, log_q) / (num_dims * math.log(2.0))


def gaussian_log_prob(eps: torch.Tensor) -> torch.Tensor:
    """Standard normal log-density summed over every dimension but the first: [B, ...] -> [B]."""
    return -0.5 * (eps.pow(2) + LOG_2PI).flatten(1).sum(1)


def to_flow_input(x: torch.Tensor, logit_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] -> what the flow's first step sees, and ``log|det dz/dx|`` per image ``[B]``.

    ``logit_alpha`` 0: ``z = x - 0.5`` (the Glow paper; log-det 0). ``a`` in (0, 0.5):
    ``z = logit(s)`` with ``s = a + (1 - 2a) x`` (RealNVP, Dinh et al. 2017, section 4.1), which
    stretches the values near 0 and 1; per element ``dz/dx = (1 - 2a) / (s (1 - s))``.
    """
    if not logit_alpha:
        return x - 0.5, x.new_zeros(x.shape[0])
    s = logit_alpha + (1.0 - 2.0 * logit_alpha) * x
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    logdet = (math.log1p(-2.0 * logit_alpha) - log_s - log_1ms).flatten(1).sum(1)
    return log_s - log_1ms, logdet


def from_flow_input(z: torch.Tensor, logit_alpha: float = 0.0) -> torch.Tensor:
    """The inverse of :func:`to_flow_input`: the flow's input -> images (not clamped to [0, 1])."""
    if not logit_alpha:
        return z + 0.5
    return (torch.sigmoid(z) - logit_alpha) / (1.0 - 2.0 * logit_alpha)
