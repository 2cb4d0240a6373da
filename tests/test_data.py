"""Loaders on tiny files written here; the real Fashion-MNIST when installed."""
from __future__ import annotations

import gzip
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from glowflow import data
from glowflow.data import (FASHION_MNIST_CLASSES, ImageDataset, default_root, get_dataset, load_idx,
                           random_translate)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
            np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    payload = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def fake_mnist(root: Path, n_train=7, n_test=3, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, (img, lab), n in (("train", data._IDX_FILES["train"], n_train),
                                 ("test", data._IDX_FILES["test"], n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / img, x, gz)
        write_idx(root / lab, y, gz)
        out[split] = (x, y)
    return out


# --------------------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_round_trip(tmp_path, dtype, gz):
    arr = (np.arange(2 * 3 * 5) - 7).astype(np.dtype(dtype)).reshape(2, 3, 5)
    if dtype == "u1":
        arr = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "a-idx3-ubyte", arr, gz)
    got = load_idx(path)
    assert got.shape == (2, 3, 5)
    assert got.dtype.isnative and got.dtype.kind == arr.dtype.kind
    np.testing.assert_array_equal(got, arr)


def test_load_idx_rejects_truncated_data(tmp_path):
    payload = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "t").write_bytes(payload[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_idx(tmp_path / "t")


def test_load_idx_rejects_truncated_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(4000, dtype=np.uint8).reshape(4, 1000)))
    (tmp_path / "t.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_idx(tmp_path / "t.gz")


@pytest.mark.parametrize("payload,match", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01x", "not an IDX file"),  # bad magic
    (b"\x00\x00\x07\x01\x00\x00\x00\x01x", "not an IDX file"),  # unknown dtype code
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "header declares 3 dims"),  # header cut short
    (b"\x00\x00", "at least 4 bytes"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x02abc", "trailing data"),
])
def test_load_idx_rejects_corrupt_header(tmp_path, payload, match):
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        load_idx(tmp_path / "bad")


def test_load_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "nope.gz")


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_like_loader(tmp_path, name, gz):
    truth = fake_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = get_dataset(name, tmp_path, split=split)
        x, y = truth[split]
        assert isinstance(ds, ImageDataset) and len(ds) == len(x)
        assert ds.images.dtype == torch.uint8 and ds.image_shape == (1, 28, 28)
        assert ds.labels.dtype == torch.int64
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), x)
        np.testing.assert_array_equal(ds.labels.numpy(), y)
        img, lab = ds[1]
        assert img.dtype == torch.float32 and img.shape == (1, 28, 28)
        torch.testing.assert_close(img, torch.from_numpy(x[1]).float()[None] / 255)
        assert lab == int(y[1])
    assert get_dataset("fashion-mnist", tmp_path).class_names == FASHION_MNIST_CLASSES


def test_limit_size_and_channels(tmp_path):
    truth = fake_mnist(tmp_path)
    ds = get_dataset("fashion-mnist", tmp_path, limit=4, image_size=32, channels=3)
    assert len(ds) == 4 and ds.image_shape == (3, 32, 32)
    # 28 -> 32 is zero padding by 2 each side (as the official Glow code pads MNIST)
    np.testing.assert_array_equal(ds.images[:, 1, 2:30, 2:30].numpy(), truth["train"][0][:4])
    assert ds.images[:, :, :2].sum() == 0
    small = get_dataset("fashion-mnist", tmp_path, image_size=14)
    assert small.image_shape == (1, 14, 14)
    # antialiased resize of a constant image stays constant
    const = data._adapt(torch.full((1, 1, 28, 28), 77, dtype=torch.uint8), 14, None)
    assert (const == 77).all()


def test_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        get_dataset("fashion-mnist", tmp_path)
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_download_offline_is_clear(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as info:
        get_dataset("mnist", tmp_path / "mnist", download=True)
    msg = str(info.value)
    assert "offline" in msg and "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "mnist") in msg
    assert not any(p.name.endswith(".part") for p in (tmp_path / "mnist").iterdir())


def test_download_writes_files(tmp_path, monkeypatch):
    src = tmp_path / "server"
    src.mkdir()
    truth = fake_mnist(src)

    def fake_urlopen(url, timeout=None):
        assert timeout is not None
        return open(src / url.rsplit("/", 1)[-1], "rb")
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ds = get_dataset("fashion-mnist", tmp_path / "dl", split="test", download=True)
    np.testing.assert_array_equal(ds.labels.numpy(), truth["test"][1])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match="split"):
        get_dataset("mnist", tmp_path, split="valid")
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4))


def test_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOWFLOW_DATA", str(tmp_path))
    assert default_root("cifar10") != tmp_path / "cifar10"
    (tmp_path / "cifar10").mkdir()
    assert default_root("cifar10") == tmp_path / "cifar10"


@pytest.mark.skipif(not (REAL_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist")
def test_real_fashion_mnist():
    assert default_root("fashion-mnist") is not None
    train = get_dataset("fashion-mnist", None, split="train")
    test = get_dataset("fashion-mnist", REAL_FMNIST, split="test")
    assert tuple(train.images.shape) == (60000, 1, 28, 28)
    assert tuple(test.images.shape) == (10000, 1, 28, 28)
    for ds in (train, test):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert torch.bincount(ds.labels).min() > 0
    assert train.images.float().mean() > 50  # not all blank


# ------------------------------------------------------------------------------------- augmentation

def test_random_translate_shape_identity_determinism():
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(random_translate(x, 0), x)
    a = random_translate(x, 2, torch.Generator().manual_seed(3))
    b = random_translate(x, 2, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    u8 = (x * 255).to(torch.uint8)
    assert random_translate(u8, 1, torch.Generator().manual_seed(0), mode="reflect").dtype == torch.uint8


def test_random_translate_is_a_shift():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(50, 1, 1, 1)
    y = random_translate(x, 2, torch.Generator().manual_seed(0))
    seen = set()
    for img in y[:, 0]:
        # the interior is the original shifted by whole pixels: find (dy, dx) from one pixel
        v = int(img[4, 4])
        dy, dx = v // 8 - 4, v % 8 - 4
        assert abs(dy) <= 2 and abs(dx) <= 2
        seen.add((dy, dx))
        torch.testing.assert_close(img[2:6, 2:6], x[0, 0, 2 + dy:6 + dy, 2 + dx:6 + dx])
    assert len(seen) > 5  # shifts differ between images
