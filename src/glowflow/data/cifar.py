"""CIFAR-10's python pickle batches, read by an unpickler that can only rebuild numpy arrays."""
from __future__ import annotations

import importlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset
from .download import download_files

__all__ = ["load_cifar10", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _numpy_attr(modules: tuple[str, ...], attr: str):
    for m in modules:
        try:
            return getattr(importlib.import_module(m), attr)
        except (ImportError, AttributeError):
            continue
    return None


# The only globals a pickled dict of numpy arrays needs; everything else (os.system, builtins.eval,
# subprocess...) is refused, so a crafted file cannot run code when loaded.
_PICKLE_ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _PICKLE_ALLOWED[(_mod, "_reconstruct")] = _numpy_attr(
        ("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _PICKLE_ALLOWED[(_mod, "_frombuffer")] = _numpy_attr(
        ("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1")
    if encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_PICKLE_ALLOWED[("_codecs", "encode")] = _latin1_encode
_PICKLE_ALLOWED = {k: v for k, v in _PICKLE_ALLOWED.items() if v is not None}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in a "
                "CIFAR batch file") from None


def _unpickle_numpy_only(path: Path):
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise ValueError(f"{path}: {e}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_numpy_only(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: expected keys 'data' and 'labels', got {sorted(map(str, batch))}")
    x, y = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data [N, 3072], got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
        raise ValueError(f"{path}: expected {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_cifar10(root: Path, split: str, download: bool, limit: int | None) -> ImageDataset:
    def locate() -> Path | None:
        for d in (root, root / _CIFAR_DIR):
            if all((d / f).is_file() for f in _CIFAR_FILES[split]):
                return d
        return None

    batch_dir = locate()
    if batch_dir is None and download:
        download_files([_CIFAR_URL], root, "cifar10")
        archive = root / _CIFAR_URL.rsplit("/", 1)[-1]
        if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 cannot extract safely
            raise RuntimeError(f"downloaded {archive}; unpack it with `tar xzf` in {root} (this Python "
                               "lacks tarfile's safe extraction filter)")
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        batch_dir = locate()
    if batch_dir is None:
        raise FileNotFoundError(
            f"cifar10 {split} split: expected {', '.join(_CIFAR_FILES[split])} (the python version, "
            f"{_CIFAR_URL.rsplit('/', 1)[-1]} unpacked) in {root} or {root / _CIFAR_DIR}, not found. "
            f"Fetch it with `glowflow download --dataset cifar10 --data {root}` (in Python: download=True), or "
            "place the files there yourself.")
    xs, ys, n = [], [], 0
    for fname in _CIFAR_FILES[split]:
        if limit is not None and n >= limit and xs:  # one batch even for limit=0: shapes
            break
        x, y = _load_cifar_batch(batch_dir / fname)
        xs.append(x)
        ys.append(y)
        n += len(x)
    x, y = np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]
    classes = list(CIFAR10_CLASSES)
    meta_path = batch_dir / "batches.meta"
    if meta_path.is_file():
        meta = _unpickle_numpy_only(meta_path)
        names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
        if names:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), classes, "cifar10")
