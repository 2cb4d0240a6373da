"""Image files <-> tensors: read and validate one image, write image grids as PNG.

Tensors are float ``[C, H, W]`` / ``[N, C, H, W]`` with values in ``[0, 1]`` (or uint8 0..255),
``C`` = 1 (grey) or 3 (RGB). Reading is strict about what it accepts, so the CLI and the web demo
can turn any bad file into one clear message: :class:`ImageError` (a ``ValueError``).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image, ImageOps

# Modes that convert to grey or RGB without guessing at colour spaces or bit depths.
ACCEPTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")
# Decoding cost is bounded by pixels, not file bytes (a few-KB PNG can declare 10^9 pixels).
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """A file is not a readable image, or one this code will not convert."""


def open_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) into a fully loaded PIL image.

    Rejects, with a message saying what came: non-images, images over ``max_pixels`` (checked from
    the header before decoding), animated images and modes outside :data:`ACCEPTED_MODES`.
    """
    name = "uploaded data" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("the file is empty; expected a PNG, JPEG, GIF, BMP or WebP image")
        fp = io.BytesIO(source)
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"image not found: {source}")
        fp = source
    try:
        with Image.open(fp) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
            if getattr(img, "n_frames", 1) > 1:
                raise ImageError(f"{name}: animated/multi-frame images are not supported "
                                 f"({img.n_frames} frames); upload a single still image")
            if img.mode not in ACCEPTED_MODES:
                raise ImageError(f"{name}: unsupported image mode {img.mode!r}; expected one of "
                                 f"{', '.join(ACCEPTED_MODES)} (8-bit grey or RGB, optionally with alpha)")
            img.load()
    except ImageError:
        raise
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}); expected a PNG, JPEG, "
                         "GIF, BMP or WebP file") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt image data
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from e
    return img


def pil_to_tensor(img: Image.Image, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """A PIL image -> float ``[C, H, W]`` in [0, 1] of ``image_shape``.

    Alpha is dropped; grey <-> RGB is converted; a different size is center-cropped to the target
    aspect ratio and resized with Lanczos filtering.
    """
    c, h, w = image_shape
    if c not in (1, 3):
        raise ValueError(f"image_shape must have 1 or 3 channels, got {image_shape}")
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = ImageOps.fit(img, (w, h), method=Image.Resampling.LANCZOS)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(h, w, c).permute(2, 0, 1).float().div_(255.0)


def load_image(source, image_shape: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read an image file (path or bytes) as float ``[C, H, W]`` in [0, 1] matching ``image_shape``."""
    return pil_to_tensor(open_image(source, max_pixels), tuple(image_shape))


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] or [C, H, W] with C in (1, 3), got {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images.cpu()
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    images = torch.nan_to_num(images.detach().float().cpu(), nan=0.0)  # a diverged decode shows black
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """Tile ``[N, C, H, W]`` images into one uint8 ``[C, H', W']``, ``nrow`` images per row."""
    images = _as_uint8(images)
    n, c, h, w = images.shape
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.full((c, padding + rows * (h + padding), padding + cols * (w + padding)), pad_value,
                      dtype=torch.uint8)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image ``[C, H, W]`` (float in [0, 1] or uint8) -> a PIL image (mode L or RGB)."""
    img = _as_uint8(image)
    if img.shape[0] != 1:
        raise ValueError(f"to_pil takes one image, got a batch of {img.shape[0]}")
    img = img[0]
    array = img.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array[..., 0] if img.shape[0] == 1 else array, "L" if img.shape[0] == 1 else "RGB")


def png_bytes(image: torch.Tensor) -> bytes:
    """One image ``[C, H, W]`` -> PNG file bytes."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> Path:
    """Write ``[N, C, H, W]`` images as one PNG grid, ``nrow`` per row; returns the path written."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"grids are written as PNG: the path must end in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(make_grid(images, nrow, padding, pad_value)).save(path, format="PNG")
    return path
