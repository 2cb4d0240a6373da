"""IDX files (MNIST, Fashion-MNIST; ``.gz`` or raw)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset
from .download import download_files

__all__ = ["load_idx", "load_idx_dataset", "IDX_FILES", "FASHION_MNIST_CLASSES", "MNIST_CLASSES"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def load_idx(path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into an array, checking magic number, dims and size.

    Layout: 2 zero bytes, a dtype code, the number of dims, one big-endian uint32 per dim, then the
    data, big-endian, C order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as e:  # truncated or corrupt gzip stream
        raise ValueError(f"{path}: cannot decompress ({type(e).__name__}: {e}); "
                         "the file is corrupt or truncated, delete it and fetch it again") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: expected an IDX header of at least 4 bytes, got {len(raw)} bytes")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file: magic bytes {raw[:4].hex()}, expected 0000 then a "
                         f"dtype code in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and ndim >= 1")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: header declares {ndim} dims ({header} bytes) but the file has "
                         f"{len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        raise ValueError(f"{path}: dims {dims} of {dtype} need {expected} data bytes, got {got} "
                         f"({'truncated' if got < expected else 'trailing data'})")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)  # native order, writable


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem, root / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(name: str, root: Path, split: str, download: bool, limit: int | None) -> ImageDataset:
    stems = IDX_FILES[split]
    paths = [_find_idx(root, s) for s in stems]
    if any(p is None for p in paths) and download:
        download_files([_IDX_URLS[name] + s + ".gz" for s in stems], root, name)
        paths = [_find_idx(root, s) for s in stems]
    if any(p is None for p in paths):
        missing = [f"{s}.gz" for s, p in zip(stems, paths) if p is None]
        hint = (" On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` puts them in "
                "/usr/share/datasets/fashion-mnist." if name == "fashion-mnist" else "")
        raise FileNotFoundError(
            f"{name} {split} split: expected {', '.join(missing)} (gzipped or not) in {root}, "
            f"not found. Fetch them with `glowflow download --dataset {name} --data {root}` (in Python: "
            f"download=True), or place them there yourself.{hint}")
    images, labels = load_idx(paths[0]), load_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{paths[0]}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{paths[1]}: expected {images.shape[0]} labels [N], got shape {labels.shape}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images[:, None])),
                        torch.from_numpy(labels.astype(np.int64)), list(classes), name)
