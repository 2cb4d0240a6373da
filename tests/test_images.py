"""Reading images: an explicit allow-list of formats everywhere, clear errors, one decoding path."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from glowflow.data import get_dataset
from glowflow.images import IMAGE_FORMATS, ImageError, load_image, open_image, read_image

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
       b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_postscript_never_reaches_a_decoder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    (tmp_path / "face.eps").write_bytes(EPS)
    with pytest.raises(ImageError, match="not a readable image.*PNG, JPEG"):
        open_image(EPS)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "face.eps", (1, 8, 8))
    assert calls == []
    assert "EPS" not in IMAGE_FORMATS


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "ICO", "SGI", "IM"])
def test_formats_outside_the_list_are_refused(fmt):
    data = _encode(Image.new("RGB", (8, 8), (10, 20, 30)), fmt)
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(data)


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                                      ("WEBP", "RGB"), ("TIFF", "L"), ("PPM", "L"), ("PPM", "RGB")])
def test_listed_formats_are_read(fmt, mode):
    img = Image.new(mode, (12, 10), 128 if mode in ("L", "P") else (128, 128, 128, 255)[: len(mode)])
    x = load_image(_encode(img, fmt), (1, 8, 8))
    assert x.shape == (1, 8, 8) and torch.isfinite(x).all()


def test_a_pgm_face_is_cropped_to_the_centre_and_16_bit_grey_reduced():
    arr = np.zeros((112, 92), np.uint8)
    arr[10:102, :] = 200  # a bright centre band, dark top and bottom margins
    square = read_image(_encode(Image.fromarray(arr), "PPM"), 1, (64, 64))
    assert square.shape == (1, 64, 64) and square.min() >= 190  # the crop drops the margins
    deep = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    got = read_image(_encode(deep, "PNG"), 1, None)
    assert got.dtype == np.uint8 and got[0, 7, 7] == (63 * 1000) >> 8


def test_a_decompression_bomb_in_a_training_folder_is_one_clear_error(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / split / "ok.png")
    bomb = Image.new("1", (20000, 20000))  # 4e8 pixels in a file of a few kB
    bomb.save(tmp_path / "train" / "bomb.png")
    with pytest.raises(ValueError, match="bomb.png.*cannot be decoded.*the limit is") as e:
        get_dataset("folder", tmp_path, "train", image_size=8)
    assert "\n" not in str(e.value)


def _no_large_resizes(monkeypatch, limit: int):
    """Make every PIL resize to more than ``limit`` pixels fail, before it allocates them."""
    resize = Image.Image.resize

    def bounded(self, size, *args, **kwargs):
        assert size[0] * size[1] <= limit, f"resize of {self.size} to {size}: {size[0] * size[1]} pixels"
        return resize(self, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", bounded)


@pytest.mark.parametrize("wide", [False, True])
def test_an_extreme_aspect_ratio_is_fitted_from_the_pixels_it_keeps(monkeypatch, wide):
    """A 1 x 1,000,000 PNG (a few kB, within the pixel limit) used to be resized to cover 8x8 whole,
    8 x 8,000,000 pixels (3 GB, seconds of a demo's event loop) before the crop kept 64 of them. The
    fit resizes only the part of the image the crop keeps: never more pixels than the result."""
    arr = np.zeros((1_000_000, 1), np.uint8)
    arr[500_000 - 8:500_000 + 8] = 200  # the middle rows, which the centre crop keeps
    img = Image.fromarray(arr.T.copy() if wide else arr)
    _no_large_resizes(monkeypatch, 8 * 8)
    got = read_image(_encode(img, "PNG"), 1, (8, 8))
    assert got.shape == (1, 8, 8) and (got == 200).all()  # the middle, enlarged; nothing of the rest


@pytest.mark.parametrize("mode,size,target", [("L", (12, 10), (8, 8)), ("L", (92, 112), (64, 64)),
                                              ("RGB", (37, 53), (16, 16)), ("RGB", (300, 41), (10, 24)),
                                              ("L", (5, 7), (20, 20))])
def test_the_fit_is_a_cover_resize_then_a_centre_crop(mode, size, target):
    """Resizing only what the crop keeps gives the pixels of resizing the whole image and cropping."""
    g = np.random.default_rng(0)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    img = Image.fromarray(g.integers(0, 256, shape, dtype=np.uint8), mode)
    th, tw = target
    scale = max(tw / size[0], th / size[1])
    nw, nh = max(tw, round(size[0] * scale)), max(th, round(size[1] * scale))
    left, top = (nw - tw) // 2, (nh - th) // 2
    whole = img.resize((nw, nh), Image.Resampling.LANCZOS).crop((left, top, left + tw, top + th))
    expected = np.asarray(whole, np.int16)
    expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
    got = read_image(_encode(img, "PNG"), 3 if mode == "RGB" else 1, target).astype(np.int16)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1
