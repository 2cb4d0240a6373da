"""Conversions applied after loading (channels, size) and training-time augmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["adapt", "random_translate", "random_flip", "translate", "translation_offsets", "flip", "flip_mask"]


def adapt(images: torch.Tensor, image_size: int | None, channels: int | None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> requested channels and (square) size.

    A size larger than the native one by an even margin is reached by zero padding (what the
    official Glow code does to take MNIST from 28 to 32); any other size change resizes with
    antialiased bilinear interpolation.
    """
    c = images.shape[1]
    if channels is not None and channels != c:
        if (c, channels) == (1, 3):
            images = images.expand(-1, 3, -1, -1).contiguous()
        elif (c, channels) == (3, 1):  # ITU-R 601-2 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"channels must be 1 or 3, got {channels} (images have {c})")
    if image_size is not None:
        h, w = images.shape[-2:]
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        if (h, w) == (image_size, image_size):
            return images
        if h == w and image_size > h and (image_size - h) % 2 == 0:
            p = (image_size - h) // 2
            return F.pad(images, (p, p, p, p))
        out = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear",
                            antialias=True, align_corners=False)
        images = out.round_().clamp_(0, 255).to(torch.uint8)
    return images


def translation_offsets(batch: int, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image integer shifts for :func:`translate`: ``[2, batch]`` (rows, columns), each in
    ``[0, 2 max_shift]`` (``max_shift`` means no shift)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator, device=gen_device)


def translate(x: torch.Tensor, offsets: torch.Tensor, max_shift: int, mode: str = "replicate") -> torch.Tensor:
    """Shift image ``i`` of ``x`` ``[B, C, H, W]`` by ``offsets[:, i] - max_shift`` pixels."""
    b, c, h, w = x.shape
    if mode == "reflect" and max_shift >= min(h, w):
        raise ValueError(f"reflect padding needs max_shift < image side, got {max_shift} for {h}x{w}")
    s = max_shift
    offsets = offsets.to(x.device)
    work = x if x.is_floating_point() else x.float()
    padded = F.pad(work, (s, s, s, s), mode=mode)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols].to(x.dtype)


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                     mode: str = "replicate") -> torch.Tensor:
    """Shift each image of ``x`` ``[B, C, H, W]`` by its own integer (dy, dx) in [-max_shift, max_shift].

    The border is filled by ``mode`` ("replicate" = edge, or "reflect"). The official Glow code
    augments CIFAR-10 with Keras' width/height_shift_range=0.1 (edge fill, fractional shifts);
    shifts here are whole pixels so 8-bit data stays exactly on its grid. Shift 0 returns ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if mode not in ("replicate", "reflect"):
        raise ValueError(f"mode must be 'replicate' or 'reflect', got {mode!r}")
    if max_shift == 0:
        return x
    return translate(x, translation_offsets(x.shape[0], max_shift, generator), max_shift, mode)


def flip_mask(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which images :func:`random_flip` mirrors: ``[batch]`` booleans, each true with probability 1/2."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(batch, generator=generator, device=gen_device) < 0.5


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images of ``x`` ``[B, C, H, W]`` where ``mask`` ``[B]`` is true."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of ``x`` ``[B, C, H, W]`` left-right with probability 1/2 (its own coin)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    return flip(x, flip_mask(x.shape[0], generator))
