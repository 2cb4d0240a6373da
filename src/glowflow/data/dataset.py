"""The dataset every loader returns: uint8 images ``[N, C, H, W]``, optional labels and names."""
from __future__ import annotations

import numpy as np
import torch

from ..numerics import to_unit

__all__ = ["ImageDataset"]


class ImageDataset(torch.utils.data.Dataset):
    """A split: ``images`` uint8 ``[N, C, H, W]`` (a tensor in memory, or a memory-mapped array of a
    prepared set), ``labels`` int64 ``[N]`` or None, class names, file names.

    ``dataset[i]`` gives ``(image as float32 [C, H, W] in [0, 1], label or -1)``;
    :meth:`batch` gives the uint8 images of any index tensor, reading only those rows.
    """

    def __init__(self, images, labels: torch.Tensor | None = None,
                 class_names: list[str] | None = None, name: str = "",
                 filenames: list[str] | None = None):
        # a numpy array (a memmap), or an array-like with numpy indexing (a prepared set's ShardedImages)
        is_array = (not isinstance(images, torch.Tensor) and hasattr(images, "__getitem__")
                    and getattr(images, "dtype", None) == np.uint8 and getattr(images, "ndim", None) == 4)
        if not is_array and (not isinstance(images, torch.Tensor) or images.dtype != torch.uint8
                             or images.dim() != 4):
            got = (f"{images.dtype} array of shape {tuple(images.shape)}"
                   if hasattr(images, "shape") else type(images).__name__)
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {got}")
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"labels must have shape [{images.shape[0]}] to match images, "
                                 f"got {tuple(labels.shape)}")
        if filenames is not None and len(filenames) != images.shape[0]:
            raise ValueError(f"filenames must have {images.shape[0]} entries, got {len(filenames)}")
        self.images = images
        self.labels = labels
        self.class_names = class_names
        self.name = name
        self.filenames = filenames

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index) -> torch.Tensor:
        """uint8 ``[len(index), C, H, W]`` for an index tensor, list or slice."""
        if isinstance(self.images, torch.Tensor):
            return self.images[index]
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        return torch.from_numpy(np.ascontiguousarray(self.images[index]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = to_unit(self.batch(slice(i, i + 1)))[0]
        y = int(self.labels[i]) if self.labels is not None else -1
        return x, y

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])

    def head(self, n: int | None) -> "ImageDataset":
        """The first ``n`` examples (all when None)."""
        if n is None or n >= len(self):
            return self
        return ImageDataset(self.images[:n], None if self.labels is None else self.labels[:n],
                            self.class_names, self.name, None if self.filenames is None else self.filenames[:n])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"labelled={self.labels is not None})")
