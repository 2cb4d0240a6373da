"""Downsampled ImageNet (Chrabaszcz et al. 2017): ``.npz`` batches of uint8 CHW rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset

__all__ = ["load_imagenet_npz"]


def load_imagenet_npz(name: str, root: Path, split: str, limit: int | None) -> ImageDataset:
    """Downsampled ImageNet (Chrabaszcz et al. 2017) .npz: 'data' uint8 [N, 3*S*S] in CHW order,
    'labels' 1-based. ``root`` is the directory of batches or one .npz (then ``split`` is ignored)."""
    side = int(name.removeprefix("imagenet"))
    if root.is_file():
        files = [root]
    else:
        pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
        files = sorted(root.glob(pattern),
                       key=lambda p: [int(t) if t.isdigit() else t for t in p.stem.split("_")])
        if not files:
            raise FileNotFoundError(
                f"{name} {split} split: expected {pattern} (downsampled ImageNet {side}x{side} "
                f"from image-net.org) in {root}, or root pointing at one .npz file; not found")
    xs, ys, n = [], [], 0
    for path in files:
        if limit is not None and n >= limit and xs:  # one batch even for limit=0: shapes
            break
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"data", "labels"} - set(z.files)
                x, y = (None, None) if missing else (z["data"], z["labels"])
        except (OSError, EOFError, ValueError) as e:  # not a zip, truncated, pickled object arrays
            raise ValueError(f"{path}: not a readable .npz of arrays ({type(e).__name__}: {e})") from e
        if missing:
            raise ValueError(f"{path}: expected arrays 'data' and 'labels', missing {sorted(missing)}")
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * side * side:
            raise ValueError(f"{path}: expected uint8 data [N, {3 * side * side}] "
                             f"(3x{side}x{side}, CHW order), got {x.dtype} {x.shape}")
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
            raise ValueError(f"{path}: expected {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
        if y.size and y.min() < 1:
            raise ValueError(f"{path}: labels are 1-based in this format, got minimum {y.min()}")
        if limit is not None:
            x, y = x[: limit - n], y[: limit - n]
        xs.append(x.reshape(-1, 3, side, side))
        ys.append(y.astype(np.int64) - 1)
        n += len(x)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), None, name)
