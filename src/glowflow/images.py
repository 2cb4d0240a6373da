"""Image files <-> tensors: the one place images are decoded, and image grids written as PNG.

Every image glowflow reads (dataset folders, ``prepare``, uploads to the demo, the CLI's inputs)
goes through :func:`open_image` and :func:`fit`: an explicit allow-list of formats (Pillow would
otherwise hand, say, an EPS file to Ghostscript), a pixel limit checked from the header before
decoding, EXIF orientation, 16-bit grey reduced to 8 bits, transparency composited onto white,
conversion to grey or RGB, and a resize that covers the target then a centre crop. A bad file is an
:class:`ImageError` (a ``ValueError``) naming it.

Tensors are float ``[C, H, W]`` / ``[N, C, H, W]`` with values in ``[0, 1]`` (or uint8 0..255),
``C`` = 1 (grey) or 3 (RGB).
"""
from __future__ import annotations

import io as _bytes_io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from . import io
from .numerics import to_unit

__all__ = ["ImageError", "IMAGE_FORMATS", "IMAGE_EXTENSIONS", "DEFAULT_MAX_PIXELS", "open_image", "fit",
           "read_image", "load_image", "make_grid", "to_pil", "png_bytes", "save_grid", "as_uint8"]

# Pillow format names that are decoded; everything else is refused before a decoder runs.
# PPM covers the netpbm family (.pbm, .pgm, .ppm); JPEG includes MPO, the variant many cameras write.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
_FORMAT_TEXT = "PNG, JPEG, GIF, BMP, WebP, TIFF or PPM/PGM"
# Modes that convert to grey or RGB without guessing at colour spaces.
_ACCEPTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I;16", "I;16B", "I;16L", "I")
# Decoding cost is bounded by pixels, not file bytes (a few-KB PNG can declare 10^9 pixels).
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """A file is not a readable image, or one this code will not convert."""


def open_image(source, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) into a fully loaded PIL image, upright
    (EXIF orientation applied).

    Refuses, with a message naming the source: formats outside :data:`IMAGE_FORMATS`, images over
    ``max_pixels`` (checked from the header before decoding), animated images, and modes that do
    not convert to grey or RGB. ``draft = (W, H)`` lets a JPEG decode at a reduced scale no smaller
    than that (much faster for large photos that will be shrunk anyway).
    """
    from_bytes = isinstance(source, (bytes, bytearray))
    name = "uploaded data" if from_bytes else str(source)
    if from_bytes:
        if not source:
            raise ImageError(f"the file is empty; expected a {_FORMAT_TEXT} image")
        fp = _bytes_io.BytesIO(source)
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"image not found: {source}")
        fp = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=IMAGE_FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"{name}: image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
                if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":
                    raise ImageError(f"{name}: animated/multi-frame images are not supported "
                                     f"({img.n_frames} frames); use a single still image")
                if img.mode not in _ACCEPTED_MODES:
                    raise ImageError(f"{name}: unsupported image mode {img.mode!r} (8- or 16-bit grey, "
                                     "palette or RGB, optionally with alpha, are read)")
                if draft is not None and img.format in ("JPEG", "MPO"):
                    img.draft(img.mode, draft)
                img.load()
                return ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: declares too many pixels to decode safely (a decompression bomb?); "
                         f"the limit is {max_pixels}") from None
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}); expected a {_FORMAT_TEXT} "
                         "file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt image data
        raise ImageError(f"{name}: corrupt or truncated image, cannot be decoded ({e})") from None


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grey (``channels=1``) or RGB, 8 bits; transparency composited onto white (background)."""
    if img.mode.startswith("I"):  # 16-bit grey: keep the high byte
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def fit(img: Image.Image, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """A PIL image -> uint8 ``[channels, H, W]``: converted (:func:`_to_mode`), then, if ``size =
    (H, W)`` is given and differs, resized (Lanczos) to cover it and centre-cropped.

    Only the part of the image the crop keeps is resized, straight to ``size``: the work is bounded
    by the decoded image and the result, whatever the aspect ratio. (Resizing the whole image first
    turned a 1 x 1,000,000 PNG of a few kB into 8 x 8,000,000 pixels to keep 64 of them.)"""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _to_mode(img, channels)
    if size is not None:
        th, tw = size
        w, h = img.size
        if (w, h) != (tw, th):
            scale = max(tw / w, th / h)
            nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
            left, top = (nw - tw) // 2, (nh - th) // 2
            if (nw, nh) == (w, h):
                img = img.crop((left, top, left + tw, top + th))
            else:
                # The crop's box in the source's coordinates: Pillow samples it on the grid of the
                # whole resize (same scale, same filter support, reaching outside the box where the
                # image goes on), so the pixels are those of resizing everything, then cropping.
                sx, sy = w / nw, h / nh
                box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
                img = img.resize((tw, th), Image.Resampling.LANCZOS, box=box)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image(source, channels: int, size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file (path or bytes) -> uint8 ``[channels, H, W]`` (see :func:`fit`)."""
    draft = None if size is None else (size[1], size[0])
    return fit(open_image(source, max_pixels, draft), channels, size)


def load_image(source, image_shape: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image file (path or bytes) -> float ``[C, H, W]`` in [0, 1] of ``image_shape``."""
    c, h, w = tuple(image_shape)
    return to_unit(torch.from_numpy(read_image(source, c, (h, w), max_pixels).copy()))


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images ``[N, C, H, W]`` or ``[C, H, W]`` (float in [0, 1] or uint8) -> uint8 ``[N, C, H, W]``."""
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
    images = images.detach().float().cpu()
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf (a decode that diverged); nothing was drawn")
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 255,
              scale: int = 1) -> torch.Tensor:
    """Tile ``[N, C, H, W]`` images into one uint8 ``[C, H', W']``, ``nrow`` images per row, each
    enlarged ``scale`` times (nearest neighbour: a 28x28 image stays crisp at 4x)."""
    images = as_uint8(images)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if scale > 1:
        images = images.repeat_interleave(int(scale), 2).repeat_interleave(int(scale), 3)
    n, c, h, w = images.shape
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
    img = as_uint8(image)
    if img.shape[0] != 1:
        raise ValueError(f"to_pil takes one image, got a batch of {img.shape[0]}")
    img = img[0]
    array = img.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array[..., 0] if img.shape[0] == 1 else array, "L" if img.shape[0] == 1 else "RGB")


def png_bytes(image: torch.Tensor) -> bytes:
    """One image ``[C, H, W]`` -> PNG file bytes."""
    buf = _bytes_io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2, pad_value: int = 255,
              scale: int = 1) -> Path:
    """Write ``[N, C, H, W]`` images as one PNG grid (atomically), ``nrow`` per row, enlarged
    ``scale`` times; returns the path written."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"grids are written as PNG: the path must end in .png, got {path}")
    picture = to_pil(make_grid(images, nrow, padding, pad_value, scale))
    with io.atomic_file(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG")
    return path
