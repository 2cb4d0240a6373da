"""Dataset loaders and preprocessing.

Every loader returns an :class:`ImageDataset` holding the whole split in memory as uint8
``[N, C, H, W]``; ``dataset[i]`` gives ``(image / 255 as float32 [C, H, W], label or -1)``, the form
:func:`glowflow.numerics.quantize` expects.

Formats: IDX (MNIST, Fashion-MNIST; ``.gz`` or raw), CIFAR-10 python pickle batches (read with a
restricted unpickler that can only rebuild numpy arrays), downsampled-ImageNet ``.npz`` and any folder
of images. Bad input raises ``ValueError`` / ``FileNotFoundError`` saying what was expected and what came.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_file

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "imagenet32", "imagenet64", "folder")
SPLITS = ("train", "test")

DOWNLOAD_TIMEOUT_S = 10.0


class ImageDataset(torch.utils.data.Dataset):
    """A split held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]`` or None."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 class_names: list[str] | None = None, name: str = "",
                 filenames: list[str] | None = None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
                   if isinstance(images, torch.Tensor) else type(images).__name__)
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {got}")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64)
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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].to(torch.float32) / 255.0
        y = int(self.labels[i]) if self.labels is not None else -1
        return x, y

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"labelled={self.labels is not None})")


# --------------------------------------------------------------------------------------------- IDX

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


_IDX_FILES = {
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


def _load_idx_dataset(name: str, root: Path, split: str, download: bool, limit: int | None) -> ImageDataset:
    stems = _IDX_FILES[split]
    paths = [_find_idx(root, s) for s in stems]
    if any(p is None for p in paths) and download:
        _download([_IDX_URLS[name] + s + ".gz" for s in stems], root, name)
        paths = [_find_idx(root, s) for s in stems]
    if any(p is None for p in paths):
        missing = [f"{s}.gz" for s, p in zip(stems, paths) if p is None]
        hint = (" On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` puts them in "
                "/usr/share/datasets/fashion-mnist." if name == "fashion-mnist" else "")
        raise FileNotFoundError(
            f"{name} {split} split: expected {', '.join(missing)} (gzipped or not) in {root}, "
            f"not found. Pass download=True to fetch them, or place them there yourself.{hint}")
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


# ---------------------------------------------------------------------------------------- CIFAR-10

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


def _load_cifar10(root: Path, split: str, download: bool, limit: int | None) -> ImageDataset:
    def locate() -> Path | None:
        for d in (root, root / _CIFAR_DIR):
            if all((d / f).is_file() for f in _CIFAR_FILES[split]):
                return d
        return None

    batch_dir = locate()
    if batch_dir is None and download:
        _download([_CIFAR_URL], root, "cifar10")
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
            "Pass download=True to fetch it, or place the files there yourself.")
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


# --------------------------------------------------------------------------- downsampled ImageNet

def _load_imagenet_npz(name: str, root: Path, split: str, limit: int | None) -> ImageDataset:
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


# ------------------------------------------------------------------------------------ image folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _in_test_split(relpath: str) -> bool:
    """The deterministic 10 % of a folder without train/ and test/: by a hash of the file's path."""
    return int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % 10 == 0


def _load_image(path: Path, image_size: int | None, channels: int) -> np.ndarray:
    """One file -> uint8 ``[channels, S, S]``: shorter side resized to S, centre crop."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and image_size is not None:
                img.draft("RGB" if channels == 3 else "L", (image_size, image_size))  # fast decode
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")  # composite onto white: transparent means background
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            img = img.convert("RGB" if channels == 3 else "L")
            if image_size is not None:
                w, h = img.size
                scale = image_size / min(w, h)
                nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
                if (nw, nh) != (w, h):
                    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
                left, top = (nw - image_size) // 2, (nh - image_size) // 2
                img = img.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises on undecodable data
        raise ValueError(f"{path}: has an image extension but cannot be decoded "
                         f"({type(e).__name__}: {e}); remove or fix it") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _load_folder(root: Path, split: str, image_size: int | None, channels: int,
                 limit: int | None) -> ImageDataset:
    if not root.is_dir():
        raise FileNotFoundError(f"folder dataset: {root} is not a directory of images")
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / split if split_dirs else root
    # files without an image extension (attribute lists, READMEs) are skipped, not errors
    rel = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not split_dirs:
        rel = [r for r in rel if _in_test_split(r) == (split == "test")]
    if not rel:
        raise FileNotFoundError(f"folder dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) for split "
                                f"{split!r} under {base}")
    rel = rel[:limit]
    arrays = [_load_image(base / r, image_size, channels) for r in rel]
    odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:
        raise ValueError(f"folder dataset: images differ in size ({rel[0]}: {arrays[0].shape[1:]}, "
                         f"{rel[odd]}: {arrays[odd].shape[1:]}); pass image_size to resize and crop")
    images = (torch.from_numpy(np.stack(arrays)) if arrays
              else torch.zeros((0, channels, image_size or 1, image_size or 1), dtype=torch.uint8))
    return ImageDataset(images, None, None, "folder", filenames=rel)


# ---------------------------------------------------------------------------------------- download

def _download(urls: list[str], root: Path, name: str) -> None:
    """Fetch each URL into ``root`` (atomically); on failure say what to put where by hand."""
    root.mkdir(parents=True, exist_ok=True)
    for url in urls:
        target = root / url.rsplit("/", 1)[-1]
        if target.is_file():
            continue
        try:
            with (atomic_file(target, suffix=".part") as tmp, open(tmp, "wb") as out,
                  urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp):
                shutil.copyfileobj(resp, out)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            files = ", ".join(u.rsplit("/", 1)[-1] for u in urls)
            raise RuntimeError(
                f"could not download {url} ({type(e).__name__}: {e}); this machine seems to be "
                f"offline. Fetch {files} elsewhere and put them in {root}, then call again "
                f"without download=True.") from e


# -------------------------------------------------------------------------------------- transforms

def _adapt(images: torch.Tensor, image_size: int | None, channels: int | None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> requested channels and (square) size.

    A size larger than the native one by an even margin is reached by zero padding (what the
    official Glow code does to take MNIST from 28 to 32); any other size change resizes with
    antialiased bilinear interpolation.
    """
    c = images.shape[1]
    if channels is not None and channels != c:
        if (c, channels) == (1, 3):
            images = images.expand(-1, 3, -1, -1).contiguous()
        elif (c, channels) == (3, 1):  # ITU-R 601-2 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"channels must be 1 or 3, got {channels} (images have {c})")
    if image_size is not None:
        h, w = images.shape[-2:]
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        if (h, w) == (image_size, image_size):
            return images
        if h == w and image_size > h and (image_size - h) % 2 == 0:
            p = (image_size - h) // 2
            return F.pad(images, (p, p, p, p))
        out = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear",
                            antialias=True, align_corners=False)
        images = out.round_().clamp_(0, 255).to(torch.uint8)
    return images


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                     mode: str = "replicate") -> torch.Tensor:
    """Shift each image of ``x`` ``[B, C, H, W]`` by its own integer (dy, dx) in [-max_shift, max_shift].

    The border is filled by ``mode`` ("replicate" = edge, or "reflect"). The official Glow code
    augments CIFAR-10 with Keras' width/height_shift_range=0.1 (edge fill, fractional shifts);
    shifts here are whole pixels so 8-bit data stays exactly on its grid. Shift 0 returns ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if mode not in ("replicate", "reflect"):
        raise ValueError(f"mode must be 'replicate' or 'reflect', got {mode!r}")
    if max_shift == 0:
        return x
    b, c, h, w = x.shape
    if mode == "reflect" and max_shift >= min(h, w):
        raise ValueError(f"reflect padding needs max_shift < image side, got {max_shift} for {h}x{w}")
    s = max_shift
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator, device=gen_device).to(x.device)
    work = x if x.is_floating_point() else x.float()
    padded = F.pad(work, (s, s, s, s), mode=mode)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols].to(x.dtype)


# ------------------------------------------------------------------------------------------ entry

def default_root(name: str) -> Path | None:
    """Where ``name`` is found without being told: ``$GLOWFLOW_DATA/<name>`` or
    ``/usr/share/datasets/<name>`` (Debian's dataset-fashion-mnist package), if it exists."""
    name = _canonical(name)
    candidates = []
    if os.environ.get("GLOWFLOW_DATA"):
        candidates.append(Path(os.environ["GLOWFLOW_DATA"]) / name)
    candidates.append(Path("/usr/share/datasets") / name)
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return key


def get_dataset(name: str, root=None, split: str = "train", image_size: int | None = None,
                channels: int | None = None, download: bool = False,
                limit: int | None = None) -> ImageDataset:
    """Load one split of a dataset as an :class:`ImageDataset`.

    ``root`` None means :func:`default_root` (then ``~/.cache/glowflow/<name>`` for downloads).
    ``limit`` keeps the first N examples; ``image_size`` / ``channels`` convert after loading.
    """
    name = _canonical(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if root is None:
        root = default_root(name)
        if root is None:
            if name == "folder":
                raise ValueError("the folder dataset needs root: the directory of images")
            root = Path.home() / ".cache" / "glowflow" / name
    root = Path(root).expanduser()
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if name == "folder":
        # resized and cropped per image while decoding: whole folders rarely share one size
        return _load_folder(root, split, image_size, channels or 3, limit)
    if name in ("mnist", "fashion-mnist"):
        ds = _load_idx_dataset(name, root, split, download, limit)
    elif name == "cifar10":
        ds = _load_cifar10(root, split, download, limit)
    else:
        if download:
            raise ValueError(f"{name} has no canonical download (image-net.org needs a login); "
                             f"place the .npz files in {root} yourself")
        ds = _load_imagenet_npz(name, root, split, limit)
    ds.images = _adapt(ds.images, image_size, channels)
    return ds
