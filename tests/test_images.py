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
