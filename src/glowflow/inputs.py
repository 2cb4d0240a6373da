"""What can be scored, in one spelling shared by ``glowflow score`` and ``glowflow ood``.

An input (a "set") is one of:

- an image file (PNG, JPEG, ...: the formats :mod:`glowflow.images` decodes);
- a folder: every image file under it, recursively, in sorted order;
- a ``.npy`` array of images ``[N, C, H, W]`` (or one ``[C, H, W]``), uint8 0..255 or float in [0, 1];
- a dataset split, ``NAME`` or ``NAME:SPLIT`` (``fashion-mnist:test``, ``mnist-5k``; the split is
  ``test`` unless said), read from the root given for NAME, else the dataset's usual place
  (:func:`glowflow.data.default_root`: ``data/NAME``, ``/usr/share/datasets/NAME``);
- a changed test split: ``NAME:inverted`` (``255 - x``) or ``NAME:flipped`` (upside down);
- a synthetic set of the model's image shape, drawn from a seed: ``noise[:N]`` (every pixel uniform
  in 0..255) or ``constant[:N]`` (each image one uniform value), N images (default 1,000).

A set name wins over a path spelt the same: ``./noise`` is the folder called noise. Images of
another size or channel count than the model's are converted, and each such image carries a note
saying so: files through :func:`glowflow.images.fit` (resize to cover, centre crop), arrays and
datasets through :func:`glowflow.data.adapt`. ``limit`` keeps the first N images of a set, as
``--limit`` does in every command; ``spread`` takes N evenly spaced through it instead (datasets
such as mnist-5k list their images class by class, so their first N are one class: a warning says
so).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DATASET_NAMES, adapt, canonical_name, get_dataset
from .images import IMAGE_EXTENSIONS, ImageError, fit, open_image
from .io import read_npy

__all__ = ["InputSet", "SetName", "parse_set", "load_input", "evenly_spaced", "limited", "SYNTHETIC_SETS", "CHANGES",
           "DEFAULT_SYNTHETIC_COUNT", "SET_HELP"]

SYNTHETIC_SETS = ("noise", "constant")
CHANGES = ("inverted", "flipped")  # of a dataset's test split
DEFAULT_SYNTHETIC_COUNT = 1000
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")
SET_HELP = ("an image file, a folder of images, a .npy array [N, C, H, W], a dataset split NAME[:test|train] "
            "(e.g. fashion-mnist:test, mnist-5k), NAME:inverted, NAME:flipped, noise[:N] or constant[:N]")


@dataclass(frozen=True)
class SetName:
    """A named set: ``kind`` is ``"dataset"`` (``name`` a dataset, ``part`` a split or a change) or
    ``"synthetic"`` (``name`` noise or constant, ``count`` images)."""

    kind: str
    name: str
    part: str = "test"
    count: int = DEFAULT_SYNTHETIC_COUNT

    @property
    def split(self) -> str:
        return "test" if self.part in CHANGES else self.part


@dataclass
class InputSet:
    """One input, read: uint8 ``images [N, C, H, W]`` of the model's shape, one name and one note
    (what was converted, or "") per image, labels where the set has them, and ``failures``:
    ``(name, message)`` of the files of a folder that could not be read."""

    spec: str
    images: torch.Tensor
    names: list[str]
    notes: list[str]
    labels: torch.Tensor | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def parse_set(spec: str) -> SetName | None:
    """``"fashion-mnist:inverted"`` -> ``SetName("dataset", "fashion-mnist", "inverted")``; None when
    ``spec`` names no set (it is then a path). A known name with a bad part is a ``ValueError``."""
    head, _, part = str(spec).partition(":")
    if head in SYNTHETIC_SETS:
        if not part:
            return SetName("synthetic", head)
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"{spec}: the count after {head}: must be a positive integer, like {head}:1000")
        return SetName("synthetic", head, count=int(part))
    try:
        name = canonical_name(head)
    except ValueError:
        return None
    if name == "folder":  # a folder is given by its path
        return None
    part = part or "test"
    if part not in ("train", "test", *CHANGES):
        raise ValueError(f"{spec}: after {head}: comes a split (train, test) or a change of the test split "
                         f"({', '.join(CHANGES)}), got {part!r}")
    return SetName("dataset", name, part)


def evenly_spaced(n: int, limit: int | None) -> torch.Tensor:
    """Indices of ``limit`` items spread evenly over ``n`` (all of them when ``limit`` is None or >= n)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return torch.div(torch.arange(limit) * n, limit, rounding_mode="floor")


def limited(n: int, limit: int | None, spread: bool = False) -> torch.Tensor:
    """Indices of the items a ``limit`` keeps out of ``n``: the first ``limit`` (every command's
    ``--limit N``), or with ``spread`` that many spaced evenly through all ``n`` (``--spread``)."""
    if spread:
        return evenly_spaced(n, limit)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return torch.arange(n if limit is None else min(n, limit))


def load_input(spec: str, image_shape, roots: dict | None = None, seed: int = 0,
               limit: int | None = None, spread: bool = False) -> InputSet:
    """Read one input (see the module's docstring) as images of ``image_shape`` = (C, H, W).

    A whole input that cannot be read (a missing path, a bad array, a dataset not found) raises
    ``ValueError`` / ``FileNotFoundError``; in a folder, unreadable files go to ``failures`` and the
    others are read. ``limit`` keeps the first N images, or with ``spread`` N evenly spaced
    (:func:`limited`).
    """
    image_shape = tuple(int(s) for s in image_shape)
    named = parse_set(spec)
    if named is not None and named.kind == "synthetic":
        return _synthetic(spec, named, image_shape, seed, limit)
    if named is not None:
        return _dataset(spec, named, image_shape, roots or {}, limit, spread)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(spec, path, image_shape, limit, spread)
    if path.suffix.lower() == ".npy":
        return _array(spec, path, image_shape, limit, spread)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such file or folder, and not a set name; expected {SET_HELP} "
                                f"(datasets: {', '.join(n for n in DATASET_NAMES if n != 'folder')})")
    array, note = _read_file(path, image_shape)
    return InputSet(spec, torch.from_numpy(array[None].copy()), [spec], [note])


# ------------------------------------------------------------------------------------ kinds
# A synthetic set is made in memory at once: at most this many bytes of uint8 images (1 GiB).
MAX_SYNTHETIC_BYTES = 2**30


def _synthetic(spec: str, named: SetName, image_shape, seed: int, limit: int | None) -> InputSet:
    n = named.count if limit is None else min(named.count, limit)
    per_image = math.prod(image_shape)
    if n * per_image > MAX_SYNTHETIC_BYTES:
        raise ValueError(f"{spec}: {n:,} images of {per_image:,} values are {n * per_image / 2**30:.1f} GiB; at most "
                         f"{MAX_SYNTHETIC_BYTES // per_image:,} images of this model's size are made at once")
    gen = torch.Generator().manual_seed(seed)
    if named.name == "noise":
        images = torch.randint(0, 256, (n, *image_shape), generator=gen, dtype=torch.uint8)
    else:
        values = torch.randint(0, 256, (n, 1, 1, 1), generator=gen, dtype=torch.uint8)
        images = values.expand(n, *image_shape).contiguous()
    return InputSet(spec, images, [f"{named.name}[{i}]" for i in range(n)], [""] * n)


def _conform(images: torch.Tensor, image_shape, what: str) -> tuple[torch.Tensor, str]:
    """uint8 ``[N, c, h, w]`` -> the model's shape via :func:`adapt`, with a note when converted."""
    c, h, w = image_shape
    got = tuple(images.shape[1:])
    if got == (c, h, w):
        return images, ""
    if h != w:
        raise ValueError(f"{what}: images are {got[0]}x{got[1]}x{got[2]}, the model takes {c}x{h}x{w}; arrays "
                         "and datasets are converted to square models only")
    if got[0] not in (1, 3):
        raise ValueError(f"{what}: images have {got[0]} channels; expected 1 or 3")
    return adapt(images, h, c), f"converted from {got[0]}x{got[1]}x{got[2]} to {c}x{h}x{w}"


def _dataset(spec: str, named: SetName, image_shape, roots: dict, limit: int | None, spread: bool) -> InputSet:
    ds = get_dataset(named.name, roots.get(named.name), named.split)
    index = limited(len(ds), limit, spread)
    if ds.labels is not None and len(index) < len(ds):
        kept, whole = len(ds.labels[index].unique()), len(ds.labels.unique())
        if kept < min(len(index), whole) // 2:  # a set listed class by class
            warnings.warn(f"{spec}: its first {len(index)} images hold only {kept} of its {whole} classes; "
                          "--spread (spread=True) takes them evenly spaced through the set", stacklevel=3)
    images, note = _conform(ds.batch(index), image_shape, spec)
    if named.part == "inverted":
        images = 255 - images
    elif named.part == "flipped":
        images = images.flip(2)
    labels = None if ds.labels is None else ds.labels[index]
    return InputSet(spec, images.contiguous(), [f"{spec}[{int(i)}]" for i in index], [note] * len(index), labels)


def _read_file(path: Path, image_shape) -> tuple[np.ndarray, str]:
    """One image file -> uint8 ``[C, H, W]`` of ``image_shape`` and a note of what was converted."""
    c, h, w = image_shape
    img = open_image(path)
    notes = []
    if img.size != (w, h):
        notes.append(f"resized from {img.size[0]}x{img.size[1]} to {w}x{h} (cover, centre crop)")
    grey = img.mode in _GREY_MODES
    if c == 1 and not grey:
        notes.append(f"{img.mode} converted to grey")
    elif c == 3 and grey:
        notes.append("grey repeated into RGB")
    return fit(img, c, (h, w)), "; ".join(notes)


def _folder(spec: str, root: Path, image_shape, limit: int | None, spread: bool) -> InputSet:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{spec}: a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
    files = [files[int(i)] for i in limited(len(files), limit, spread)]
    arrays, names, notes, failures = [], [], [], []
    for f in files:
        try:
            array, note = _read_file(f, image_shape)
        except (ImageError, OSError) as e:
            failures.append((str(f), str(e)))
            continue
        arrays.append(array)
        names.append(str(f))
        notes.append(note)
    images = (torch.from_numpy(np.stack(arrays)) if arrays
              else torch.zeros((0, *image_shape), dtype=torch.uint8))
    return InputSet(spec, images, names, notes, failures=failures)


def _array(spec: str, path: Path, image_shape, limit: int | None, spread: bool) -> InputSet:
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such file")
    arr = read_npy(path, "array of images")
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise ValueError(f"{spec}: an .npz archive; expected one .npy array of images [N, C, H, W]")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise ValueError(f"{spec}: an array of shape {list(arr.shape)}; expected images [N, C, H, W] with "
                         "N >= 1 and C = 1 or 3")
    if arr.dtype == np.uint8:
        images = torch.from_numpy(np.ascontiguousarray(arr))
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{spec}: float images must lie in [0, 1] (8-bit values / 255), got values in "
                             f"[{np.nanmin(arr):.4g}, {np.nanmax(arr):.4g}]" +
                             ("" if np.isfinite(arr).all() else " and NaN or inf"))
        images = torch.from_numpy(np.round(arr.astype(np.float64) * 255.0).astype(np.uint8))
    else:
        raise ValueError(f"{spec}: holds {arr.dtype} values; expected uint8 (0..255) or float in [0, 1]")
    index = limited(len(images), limit, spread)
    images, note = _conform(images[index], image_shape, spec)
    return InputSet(spec, images, [f"{spec}[{int(i)}]" for i in index], [note] * len(index))
