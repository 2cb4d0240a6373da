"""A folder of images as a dataset (CelebA, LSUN, faces, your own photos).

Either ``ROOT/train`` and ``ROOT/test`` hold the two splits, or every image under ``ROOT`` is
assigned to one by a hash of its path (``test_fraction`` of them, 10% by default): deterministic,
and stable when images are added. Every file goes through :mod:`glowflow.images` (the format
allow-list, resize to cover and centre crop); files without an image extension are skipped.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from ..images import IMAGE_EXTENSIONS, ImageError, read_image
from .dataset import ImageDataset

__all__ = ["load_folder", "list_folder", "in_test_split", "decode_file", "DEFAULT_TEST_FRACTION"]

DEFAULT_TEST_FRACTION = 0.1


def _hash_unit(relpath: str) -> float:
    # the name's own bytes: a Linux name need not be UTF-8 (its other bytes come as surrogates), and
    # for one that is, these are the UTF-8 bytes, so no split changes
    return int(hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16) / 2**32


def in_test_split(relpath: str, fraction: float = DEFAULT_TEST_FRACTION) -> bool:
    """Whether a file of a folder without train/ and test/ is in its test split (by its path's hash)."""
    return _hash_unit(relpath) < fraction


def list_folder(root, split: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> tuple[Path, list[str]]:
    """``(base, sorted relative paths)`` of the images of ``split`` under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder dataset: {root} is not a directory of images")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / split if split_dirs else root
    rel = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not rel:
        raise FileNotFoundError(f"folder dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) for split "
                                f"{split!r} under {base}")
    if split_dirs:
        return base, rel
    if len(rel) < 2:
        raise ValueError(f"folder dataset: {base} holds one image; a train and a test split need at least "
                         f"two (or put them in {root / 'train'} and {root / 'test'})")
    test = [r for r in rel if in_test_split(r, test_fraction)]
    if not test or len(test) == len(rel):
        # a handful of images can all hash to one side: the test split is then the one image
        # with the smallest hash (or, if all hashed to test, all but the largest)
        ranked = sorted(rel, key=_hash_unit)
        test = ranked[:1] if not test else ranked[:-1]
        warnings.warn(f"folder dataset: of {len(rel)} images under {base}, the {test_fraction:.0%} hashed test "
                      f"split held {'none' if len(test) == 1 else 'all'}; using {len(test)} as the test split. "
                      f"For a split of your choosing, use {root / 'train'} and {root / 'test'}", stacklevel=3)
    chosen = set(test)
    return base, [r for r in rel if (r in chosen) == (split == "test")]


def decode_file(path: Path, image_size: int | None, channels: int) -> np.ndarray:
    """One image file -> uint8 ``[channels, S, S]`` (resized to cover S x S, centre crop), or a
    ``ValueError`` naming the file."""
    try:
        return read_image(path, channels, None if image_size is None else (image_size, image_size))
    except ImageError as e:
        raise ValueError(f"{path}: has an image extension but cannot be decoded ({e}); remove or fix it") from None


def load_folder(root, split: str, image_size: int | None, channels: int, limit: int | None,
                test_fraction: float = DEFAULT_TEST_FRACTION) -> ImageDataset:
    """Decode every image of ``split`` into memory (:mod:`glowflow.data.prepared` does it once,
    to disk, in parallel, for folders too large for that)."""
    base, rel = list_folder(root, split, test_fraction)
    rel = rel[:limit]
    arrays = [decode_file(base / r, image_size, channels) for r in rel]
    odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:
        raise ValueError(f"folder dataset: images differ in size ({rel[0]}: {arrays[0].shape[1:]}, "
                         f"{rel[odd]}: {arrays[odd].shape[1:]}); pass image_size to resize and crop")
    images = (torch.from_numpy(np.stack(arrays)) if arrays
              else torch.zeros((0, channels, image_size or 1, image_size or 1), dtype=torch.uint8))
    return ImageDataset(images, None, None, "folder", filenames=rel)
