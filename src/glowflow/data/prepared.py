"""Prepared datasets: a dataset converted once (:mod:`glowflow.data.prepare`) into uint8 shards on
disk at the model's resolution, read memory-mapped.

A prepared directory::

    manifest.json                  written last: a directory without it is not a prepared set
    train/images-0000-00000.npy    uint8 [k, C, H, W] shards (.npy, so numpy reads them by itself)
    train/labels.npy               int64 [N] (labelled datasets)
    train/filenames.npy            the source files' paths as fixed-width bytes [N] (folders): UTF-8,
                                   or a name's own bytes where they are not
    test/...
    .progress/                     only while preparing: the plan and one record per finished shard

The manifest holds the format, the source (dataset name and root), the image shape and bit depth,
the settings, per split the count, the shards (file, rows, SHA-256), the labels and file-name
arrays (file, SHA-256) and the files skipped as unreadable with their reason, and the class names.

Reading maps every shard (``np.load(mmap_mode="r")``): a batch reads only its rows, memory does not
grow with the dataset, and the processes of one machine (the ranks of a torchrun) share the pages
through the OS page cache. :class:`ShardedImages` makes the shards one ``[N, C, H, W]`` array for
:class:`~glowflow.data.ImageDataset`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..io import file_sha256, read_json
from .dataset import ImageDataset

__all__ = ["ShardedImages", "FileNames", "load_prepared", "is_prepared", "is_unfinished", "read_manifest",
           "verify_prepared", "PREPARED_FORMAT", "MANIFEST", "PROGRESS_DIR", "BIT_DEPTH"]

PREPARED_FORMAT = "glowflow-prepared/1"
MANIFEST = "manifest.json"
PROGRESS_DIR = ".progress"
BIT_DEPTH = 8  # the arrays are uint8; a model of fewer bits (CelebA-HQ's 5) quantises when it reads them


def is_prepared(root) -> bool:
    """Whether ``root`` holds a complete prepared set (its manifest, which is written last)."""
    return root is not None and (Path(root) / MANIFEST).is_file()


def is_unfinished(root) -> bool:
    """Whether ``root`` holds a preparation that was interrupted (progress, and no manifest yet)."""
    return root is not None and not is_prepared(root) and (Path(root) / PROGRESS_DIR).is_dir()


def read_manifest(root) -> dict:
    """The manifest of a prepared set, checked for its format; a directory that is not a complete
    prepared set raises a ``ValueError`` that says what it holds instead."""
    root = Path(root)
    if not is_prepared(root):
        if is_unfinished(root):
            raise ValueError(f"{root} holds a preparation that did not finish (no {MANIFEST} yet); run the same "
                             "`glowflow prepare` command again to resume it")
        raise ValueError(f"{root} is not a prepared dataset: no {MANIFEST} (a directory made by `glowflow prepare`)")
    manifest = read_json(root / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{root / MANIFEST}: format {got!r}, expected {PREPARED_FORMAT!r}")
    return manifest


class ShardedImages:
    """The rows of several uint8 arrays ``[k_i, C, H, W]`` (memory-mapped shards) as one array
    ``[N, C, H, W]``, ``N = sum k_i``. An integer or an index array reads only those rows (a new
    ndarray); a slice is a view, read when converted (``np.asarray``); nothing is read before."""

    def __init__(self, shards: Sequence[np.ndarray], row_shape: tuple[int, int, int] | None = None,
                 start: int = 0, stop: int | None = None):
        self._shards = list(shards)
        shapes = {tuple(s.shape[1:]) for s in self._shards}
        if row_shape is None:
            if len(shapes) != 1:
                raise ValueError(f"shards must share one image shape, got {sorted(shapes)}")
            row_shape = shapes.pop()
        bad = [s for s in self._shards if s.dtype != np.uint8 or s.ndim != 4 or tuple(s.shape[1:]) != tuple(row_shape)]
        if bad:
            raise ValueError(f"shards must be uint8 [k, {', '.join(map(str, row_shape))}], got "
                             f"{bad[0].dtype} {tuple(bad[0].shape)}")
        self._row_shape = tuple(int(v) for v in row_shape)
        self._offsets = np.cumsum([0] + [s.shape[0] for s in self._shards]).astype(np.int64)
        total = int(self._offsets[-1])
        self._start, self._stop = start, total if stop is None else stop
        if not 0 <= self._start <= self._stop <= total:
            raise ValueError(f"rows [{start}, {stop}) do not lie in [0, {total}]")

    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._stop - self._start, *self._row_shape)

    def __len__(self) -> int:
        return self._stop - self._start

    def __repr__(self) -> str:
        return f"ShardedImages(shape={self.shape}, shards={len(self._shards)})"

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the whole set, shard by shard (each a contiguous read)."""
        pieces = []
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for k in range(max(first, 0), len(self._shards)):
            lo, hi = int(self._offsets[k]), int(self._offsets[k + 1])
            if lo >= stop:
                break
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                pieces.append(self._shards[k][a - lo:b - lo])
        if not pieces:
            return np.empty((0, *self._row_shape), np.uint8)
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (positions in the whole set, any order, repeats allowed)."""
        out = np.empty((len(rows), *self._row_shape), np.uint8)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        for k in np.unique(which):
            mask = which == k
            out[mask] = self._shards[k][rows[mask] - self._offsets[k]]
        return out

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return ShardedImages(self._shards, self._row_shape, self._start + start,
                                     self._start + max(start, stop))
            index = np.arange(start, stop, step)
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"row {i} is out of range for {n} images")
            return self._gather(np.array([self._start + i % n]))[0]
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = np.asarray(index)
        if rows.dtype.kind not in "iu" or rows.ndim != 1:
            raise TypeError(f"index images with an integer, a slice or a 1-d integer array, got "
                            f"{rows.dtype} of shape {rows.shape}")
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"rows {int(rows.min())}..{int(rows.max())} are out of range for {n} images")
        return self._gather(self._start + rows % max(n, 1))

    def __array__(self, dtype=None, copy=None):
        out = self._read(self._start, self._stop)
        return out if dtype is None else out.astype(dtype)


class FileNames(Sequence):
    """File names stored as fixed-width UTF-8 bytes ``[N]`` (a memory-mapped array), read one by one
    as ``str``: millions of names cost no Python objects until asked for."""

    def __init__(self, array: np.ndarray, start: int = 0, stop: int | None = None):
        self._array = array
        self._start, self._stop = start, len(array) if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return FileNames(self._array, self._start + start, self._start + max(start, stop))
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"name {i} is out of range for {len(self)} names")
        # as prepare encoded them: a name's bytes that are not UTF-8 come back as the surrogates
        # os.fsdecode gives, so the name opens the same file
        return bytes(self._array[self._start + i % len(self)]).decode("utf-8", "surrogateescape")

    def __repr__(self) -> str:
        return f"FileNames(n={len(self)})"


def _open_array(root: Path, entry: dict, what: str) -> np.ndarray:
    path = root / entry["file"]
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{root} is an incomplete prepared set: its {what} {path} is missing; prepare it again "
                         "(`glowflow prepare ... --overwrite`)") from None
    except (ValueError, OSError) as e:  # a header numpy cannot parse, or a file shorter than its header says
        raise ValueError(f"{path}: corrupt or truncated {what} ({e}); prepare the set again "
                         "(`glowflow prepare ... --overwrite`)") from None


def _open_shard(root: Path, entry: dict, image_shape: tuple[int, ...]) -> np.ndarray:
    shard = _open_array(root, entry, "image shard")
    expected = (int(entry["count"]), *image_shape)
    if shard.dtype != np.uint8 or tuple(shard.shape) != expected:
        raise ValueError(f"{root / entry['file']}: holds {shard.dtype} {tuple(shard.shape)}, the manifest says "
                         f"uint8 {expected}; prepare the set again (`glowflow prepare ... --overwrite`)")
    return shard


def load_prepared(root, split: str = "train", name: str = "prepared", image_size: int | None = None,
                  channels: int | None = None, limit: int | None = None) -> ImageDataset:
    """One split of a prepared set as an :class:`ImageDataset` whose images are memory-mapped.

    ``name`` is ``"prepared"`` or the dataset the set was prepared from (a preset's ``imagenet64``
    reads a prepared ImageNet); ``image_size`` / ``channels`` are checked against the prepared shape
    (a prepared set is not resized). ``limit`` keeps the first N examples. Labels (8 bytes an image)
    are read into memory; images and file names are not.
    """
    root = Path(root)
    manifest = read_manifest(root)
    source = manifest["source"]["dataset"]
    if name not in ("prepared", source):
        raise ValueError(f"{root} is a prepared {source} set, not {name}; pass --dataset {source} or --dataset "
                         "prepared with it")
    shape = tuple(int(v) for v in manifest["image_shape"])
    wanted = (channels or shape[0], image_size or shape[1], image_size or shape[2])
    if wanted != shape:
        raise ValueError(f"{root} was prepared at {'x'.join(map(str, shape))} (C x H x W), but "
                         f"{'x'.join(map(str, wanted))} is wanted: prepare the dataset again with --image-size "
                         f"{wanted[1]} --channels {wanted[0]} (into another --out), or use a model of its shape")
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"{root} has no {split!r} split; it holds {', '.join(sorted(splits))}")
    entry = splits[split]
    images = ShardedImages([_open_shard(root, s, shape) for s in entry["shards"]], shape)
    if len(images) != int(entry["count"]):
        raise ValueError(f"{root / MANIFEST}: the {split} shards hold {len(images)} images, the manifest says "
                         f"{entry['count']}")
    labels = None
    if entry.get("labels"):
        labels = torch.from_numpy(np.array(_open_array(root, entry["labels"], "labels"), dtype=np.int64))
    filenames = FileNames(_open_array(root, entry["filenames"], "file names")) if entry.get("filenames") else None
    ds = ImageDataset(images, labels, manifest.get("class_names"), source, filenames)
    return ds.head(limit)


def verify_prepared(root) -> list[str]:
    """Re-read every array file of a prepared set against its SHA-256 in the manifest; the files
    that differ or are missing (empty when the set is intact)."""
    root = Path(root)
    manifest = read_manifest(root)
    bad = []
    for entry in manifest["splits"].values():
        files = list(entry["shards"]) + [e for e in (entry.get("labels"), entry.get("filenames")) if e]
        for f in files:
            path = root / f["file"]
            if not path.is_file():
                bad.append(f"{path} is missing")
            elif file_sha256(path) != f["sha256"]:
                bad.append(f"{path}: its SHA-256 does not match the manifest's")
    return bad
