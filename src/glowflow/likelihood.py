"""Exact likelihood as a tool: per-image bits/dim and log p(x), the number a test set reports.

:func:`score` is the one loop that turns images into bits/dim; evaluation during training,
``glowflow eval`` and ``glowflow score`` all call it, so a dataset's mean bits/dim and an
image's score come from the same code and the same dequantisation noise.
"""
from __future__ import annotations

import math

import torch

from .data import ImageDataset
from .numerics import to_unit
from .progress import Progress

__all__ = ["score", "summarize_bits_per_dim"]


@torch.no_grad()
def score(model, images, labels: torch.Tensor | None = None, batch_size: int = 500, seed: int = 0,
          draws: int = 1, device: torch.device | str | None = None, progress: bool = False,
          desc: str = "score") -> dict[str, torch.Tensor]:
    """Per-image scores of uint8 images ``[N, C, H, W]`` (a tensor or an :class:`ImageDataset`).

    Returns float64 tensors ``[N]``: ``bits_per_dim`` (the paper's metric, of the image quantised to
    the model's bit depth and dequantised with uniform noise) and ``log_prob`` (nats, the density of
    the dequantised image on [0, 1]^D; ``bits_per_dim`` is a function of it). With ``draws`` > 1 both
    are averaged over that many noise draws. The noise comes from one generator seeded by ``seed``,
    drawn batch by batch, so the same call gives the same numbers.
    """
    if isinstance(images, ImageDataset):
        labels = images.labels if labels is None else labels
        dataset = images
    else:
        dataset = ImageDataset(images, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    n = len(dataset)
    conditional = bool(model.config.num_classes)
    if conditional and labels is None:
        raise ValueError("this model is class-conditional: scoring needs the images' labels")
    gen = torch.Generator().manual_seed(seed)
    bpd_out, logp_out = [], []
    bar = Progress(n, desc, enabled=progress, unit="img")
    for start in range(0, n, batch_size):
        x = to_unit(dataset.batch(slice(start, start + batch_size)))
        y = labels[start:start + batch_size].to(device) if conditional else None
        bpd = torch.zeros(len(x), dtype=torch.float64)
        logp = torch.zeros(len(x), dtype=torch.float64)
        for _ in range(draws):
            noise = torch.rand(x.shape, generator=gen)
            out = model(x.to(device), y, noise=noise.to(device))
            bpd += out.bits_per_dim.double().cpu()
            logp += out.log_prob.double().cpu()
        bpd_out.append(bpd / draws)
        logp_out.append(logp / draws)
        bar.update(len(x))
    bar.close()
    empty = torch.zeros(0, dtype=torch.float64)
    return {"bits_per_dim": torch.cat(bpd_out) if bpd_out else empty,
            "log_prob": torch.cat(logp_out) if logp_out else empty}


def summarize_bits_per_dim(bpd: torch.Tensor) -> dict:
    """Mean and standard error over images of per-image bits/dim."""
    n = bpd.numel()
    se = float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"bits_per_dim": float(bpd.mean()) if n else float("nan"), "bits_per_dim_se": se, "num_images": n}
