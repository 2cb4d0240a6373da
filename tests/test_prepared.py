"""Prepared datasets: the images, labels and batches of the in-memory loaders, the same training,
parallel decoding equal to serial, corrupt files skipped and listed, an interrupted preparation that
resumes to the set an uninterrupted one writes, half-written or damaged directories refused with
what to do, memory that does not grow with the set, and 2 processes reading one equal to 1 process
up to float32 rounding."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from glowflow import latent
from glowflow.cli import main
from glowflow.config import TrainConfig, build_train_config
from glowflow.data import SPLITS, ImageDataset, get_dataset, is_prepared
from glowflow.data import prepare as prep
from glowflow.data.prepare import prepare
from glowflow.data.prepared import MANIFEST, PROGRESS_DIR, ShardedImages, verify_prepared
from glowflow.io import DirectoryLock, LockedError
from glowflow.model import Glow
from glowflow.numerics import to_unit
from glowflow.train import Trainer, load_split
from test_data import write_imagenet
from test_distributed import PRESET, STEPS, TOLERANCE, _fake_fashion_mnist, _max_abs_diff, _preset_file, _raw, _torchrun

QUIET = dict(progress=False, log=lambda *a: None)
SIZE = 12  # the side folders are prepared at


def write_folder(root: Path, n: int = 30, seed: int = 0) -> Path:
    """``n`` random images of assorted sizes: PNG (RGB), JPEG (RGB) and PGM (grey), in two sub-folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (int(rng.integers(10, 40)), int(rng.integers(10, 40)), 3), dtype=np.uint8)
        kind = ("png", "jpg", "pgm")[i % 3]
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (Image.fromarray(arr[..., 0]) if kind == "pgm" else Image.fromarray(arr)).save(sub / f"{i:03d}.{kind}")
    return root


def add_corrupt_files(root: Path) -> dict[str, str]:
    """A PNG that is not one and a JPEG cut short; what each should be skipped for."""
    (root / "a" / "zz-garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    jpeg = (root / "a" / "001.jpg").read_bytes()
    (root / "b" / "zz-truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    return {"a/zz-garbage.png": "not a readable image", "b/zz-truncated.jpg": "truncated"}


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def whole(ds: ImageDataset) -> torch.Tensor:
    return ds.batch(slice(0, len(ds)))


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A Fashion-MNIST-shaped IDX set (64 train, 8 test images) and its prepared form, 10 images a shard."""
    root = tmp_path_factory.mktemp("prepared")
    data = _fake_fashion_mnist(root / "idx")
    out = root / "fm"
    summary = prepare("fashion-mnist", data, out, shard_size=10, **QUIET)
    return dict(root=root, data=data, out=out, summary=summary)


# ------------------------------------------------------------------------------------ reading
def test_sharded_images_index_like_the_array_they_split():
    rows = np.random.default_rng(0).integers(0, 256, (23, 2, 3, 3), dtype=np.uint8)
    images = ShardedImages([rows[:5], rows[5:6], rows[6:20], rows[20:]])
    assert images.shape == rows.shape and len(images) == 23 and images.dtype == np.uint8 and images.ndim == 4
    for i in (0, 4, 5, 6, 19, 20, 22, -1, -23):
        assert np.array_equal(images[i], rows[i])
    idx = np.array([22, 0, 5, 5, 7, 21, 6])  # across shards, unsorted, repeated
    assert np.array_equal(images[idx], rows[idx]) and np.array_equal(images[torch.from_numpy(idx)], rows[idx])
    assert np.array_equal(images[[3, 4]], rows[[3, 4]]) and np.array_equal(images[::4], rows[::4])
    view = images[3:21]  # a view: nothing read until asked
    assert isinstance(view, ShardedImages) and view.shape == (18, 2, 3, 3)
    assert np.array_equal(np.asarray(view), rows[3:21]) and np.array_equal(view[idx % 18], rows[3:21][idx % 18])
    assert np.array_equal(np.asarray(view[2:40]), rows[5:21]) and np.array_equal(view[-1], rows[20])
    assert np.asarray(images[10:2]).shape == (0, 2, 3, 3)
    for bad in (23, -24, np.array([0, 23])):
        with pytest.raises(IndexError, match="out of range"):
            images[bad]
    with pytest.raises(TypeError, match="integer"):
        images[np.array([0.5])]
    ds = ImageDataset(images, torch.arange(23))
    assert torch.equal(ds.batch(torch.from_numpy(idx)), torch.from_numpy(rows[idx]))
    assert torch.equal(whole(ds.head(7)), torch.from_numpy(rows[:7]))
    assert torch.equal(ds[3][0], to_unit(torch.from_numpy(rows[3])))


def test_a_prepared_idx_set_holds_what_the_loader_gives(fashion):
    data, out = fashion["data"], fashion["out"]
    for split in SPLITS:
        memory = get_dataset("fashion-mnist", data, split)
        for name in ("prepared", "fashion-mnist"):  # by name, or the dataset's own name at a prepared root
            disk = get_dataset(name, out, split)
            assert isinstance(disk.images, ShardedImages)
            assert torch.equal(whole(disk), memory.images) and torch.equal(disk.labels, memory.labels)
            assert disk.class_names == memory.class_names and disk.image_shape == (1, 28, 28)
    m = manifest(out)
    assert m["count"] == 72 and m["image_shape"] == [1, 28, 28] and m["bit_depth"] == 8 and m["dtype"] == "uint8"
    assert m["source"] == {"dataset": "fashion-mnist", "root": str(data.resolve())}
    train = m["splits"]["train"]
    assert train["count"] == 64 and [s["count"] for s in train["shards"]] == [10] * 6 + [4]
    assert train["labels"]["file"] == "train/labels.npy" and train["skipped"] == [] and train["filenames"] is None
    assert verify_prepared(out) == [] and not (out / PROGRESS_DIR).exists()
    assert fashion["summary"]["status"] == "prepared" and fashion["summary"]["train"] == 64
    limited = get_dataset("prepared", out, "train", limit=5)
    assert len(limited) == 5 and torch.equal(whole(limited), get_dataset("fashion-mnist", data, "train").images[:5])
    with pytest.raises(ValueError, match="prepared fashion-mnist set, not cifar10"):
        get_dataset("cifar10", out)
    again = prepare("fashion-mnist", data, out, shard_size=10, **QUIET)  # the same command again: nothing to do
    assert again["status"] == "already prepared" and manifest(out) == m


def test_imagenet_is_prepared_one_npz_batch_at_a_time_as_the_loader_reads_it(tmp_path, monkeypatch):
    write_imagenet(tmp_path / "imagenet32", 32, sizes=(3, 2, 4, 1, 2, 3, 2, 1, 2, 3))  # batch_10 sorts last
    loaded = []
    real = prep.load_imagenet_npz
    monkeypatch.setattr(prep, "load_imagenet_npz",
                        lambda name, path, *a: loaded.append(path.name) or real(name, path, *a))
    prepare("imagenet32", tmp_path / "imagenet32", tmp_path / "out", image_size=16, shard_size=2, **QUIET)
    assert loaded[:3] == ["train_data_batch_1.npz", "train_data_batch_2.npz", "train_data_batch_3.npz"]
    assert loaded[9:] == ["train_data_batch_10.npz", "val_data.npz"]  # one file at a time, in the loader's order
    for split in SPLITS:  # resized batch by batch, as the whole split is resized in memory
        memory = get_dataset("imagenet32", tmp_path / "imagenet32", split, image_size=16)
        disk = get_dataset("imagenet32", tmp_path / "out", split, image_size=16)
        assert torch.equal(whole(disk), memory.images) and torch.equal(disk.labels, memory.labels)
    assert manifest(tmp_path / "out")["splits"]["train"]["count"] == 23


def test_training_from_a_prepared_set_equals_training_in_memory(fashion, tmp_path):
    """The same batches (images, labels, noise, augmentation) step by step, then the same parameters."""
    cfg = TrainConfig.from_dict({**PRESET, "model": {**PRESET["model"], "num_classes": 10},
                                 "augment_flip": True, "augment_shift": 2})
    quiet = lambda *a: None  # noqa: E731
    memory = Trainer(cfg, tmp_path / "memory", get_dataset("fashion-mnist", fashion["data"], "train"), log=quiet)
    disk = Trainer(cfg, tmp_path / "disk", load_split("fashion-mnist", fashion["out"], "train", (1, 28, 28)), log=quiet)
    assert isinstance(disk.train_data.images, ShardedImages)
    for step in range(10):  # 8 batches an epoch: the second epoch's order too
        for a, b in zip(memory.global_batch(step), disk.global_batch(step)):
            assert torch.equal(a, b)
    initial = {k: v.clone() for k, v in memory.model.state_dict().items()}
    for _ in range(3):
        memory.train_step()
        disk.train_step()
    after_memory, after_disk = memory.model.state_dict(), disk.model.state_dict()
    assert all(torch.equal(after_memory[k], after_disk[k]) for k in after_memory)
    assert any(not torch.equal(after_memory[k], initial[k]) for k in initial)  # the steps moved the weights


def test_the_model_shape_is_checked_against_the_prepared_one(fashion):
    with pytest.raises(ValueError, match=r"prepared at 1x28x28.*--image-size 32 --channels 3"):
        load_split("fashion-mnist", fashion["out"], "train", (3, 32, 32))
    with pytest.raises(ValueError, match=r"prepared at 1x28x28.*--image-size 16 --channels 1"):
        get_dataset("prepared", fashion["out"], "test", image_size=16)


def test_directions_read_a_prepared_set_a_batch_at_a_time(fashion):
    ds = get_dataset("prepared", fashion["out"], "test")
    model = Glow(image_shape=(1, 28, 28), levels=2, steps=1, hidden_channels=4)
    model.initialize(to_unit(whole(ds)))
    attributes = torch.tensor([[1]] * 4 + [[-1]] * 4, dtype=torch.int8)
    reads, real_batch = [], ds.batch
    ds.batch = lambda index: reads.append(index) or real_batch(index)
    from_dataset = latent.directions_from_images(model, ds, attributes, ["first-half"], batch_size=3)
    assert [(s.start, s.stop) for s in reads] == [(0, 3), (3, 6), (6, 8)]
    from_tensor = latent.directions_from_images(model, whole(ds), attributes, ["first-half"], batch_size=3)
    assert torch.equal(from_dataset.vectors, from_tensor.vectors)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_a_set_larger_than_memory_is_read_a_batch_at_a_time(fashion, tmp_path):
    """An 8.6 GB split (a sparse file: no disk used) is opened, sliced and sampled; the process grows
    by the rows it reads, not by the set."""
    out = tmp_path / "big"
    shutil.copytree(fashion["out"], out)
    n = 11_000_000
    big = np.lib.format.open_memmap(out / "train" / "big.npy", mode="w+", dtype=np.uint8, shape=(n, 1, 28, 28))
    big[n - 1] = 7  # the last row, so reads reach the file's end
    big.flush()
    del big
    m = manifest(out)
    m["splits"]["train"] = {"count": n, "skipped": [], "labels": None, "filenames": None,
                            "shards": [{"file": "train/big.npy", "count": n, "sha256": "not checked on load"}]}
    (out / MANIFEST).write_text(json.dumps(m))
    before = _rss_bytes()
    ds = get_dataset("prepared", out, "train")
    assert len(ds) == n and ds.images.shape == (n, 1, 28, 28) and n * 28 * 28 > 8 * 2**30
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        assert ds.batch(torch.randint(0, n, (8,), generator=generator)).shape == (8, 1, 28, 28)
    assert int(ds.batch(torch.tensor([n - 1])).max()) == 7 and len(ds.head(1000)) == 1000
    assert _rss_bytes() - before < 64 * 2**20


# ------------------------------------------------------------------------------------ folders, decoding
def test_a_folder_is_decoded_in_parallel_as_the_loader_decodes_it_and_corrupt_files_are_listed(tmp_path):
    clean = write_folder(tmp_path / "clean")
    source = tmp_path / "source"
    shutil.copytree(clean, source)
    expected = add_corrupt_files(source)
    with pytest.raises(ValueError, match="cannot be decoded"):  # the in-memory loader stops at a corrupt file
        for split in SPLITS:
            get_dataset("folder", source, split, image_size=SIZE)
    serial = prepare("folder", source, tmp_path / "serial", image_size=SIZE, shard_size=4, workers=0, **QUIET)
    parallel = prepare("folder", source, tmp_path / "parallel", image_size=SIZE, shard_size=4, workers=2, **QUIET)
    splits = manifest(tmp_path / "serial")["splits"]
    assert manifest(tmp_path / "parallel")["splits"] == splits  # the same shards, byte for byte (SHA-256)
    skipped = {s["file"]: s["reason"] for e in splits.values() for s in e["skipped"]}
    assert set(skipped) == set(expected) and all(expected[f] in skipped[f] for f in expected)
    assert serial["skipped"] == parallel["skipped"] == 2 and serial["train"] + serial["test"] == 30
    for split in SPLITS:
        memory = get_dataset("folder", clean, split, image_size=SIZE)
        disk = get_dataset("folder", tmp_path / "parallel", split, image_size=SIZE)
        assert list(disk.filenames) == memory.filenames and torch.equal(whole(disk), memory.images)
        assert disk.labels is None and disk.image_shape == (3, SIZE, SIZE)


def test_a_file_whose_decoding_fails_in_any_way_is_skipped_and_named(tmp_path, monkeypatch):
    """Memory running out on one image (an aspect-ratio bomb), or a decoder's own exception, costs
    that file, named in a warning line, the summary and the manifest; never the preparation."""
    source = write_folder(tmp_path / "source", n=12)
    real = prep.decode_file
    failures = {"a/001.jpg": MemoryError(), "b/002.pgm": SyntaxError("broken PNG file")}  # PIL raises both

    def failing(path, size, channels):
        failure = failures.get(path.relative_to(source).as_posix())
        if failure is not None:
            raise failure
        return real(path, size, channels)

    monkeypatch.setattr(prep, "decode_file", failing)
    logs = []
    summary = prepare("folder", source, tmp_path / "out", image_size=SIZE, shard_size=4, workers=0,
                      progress=False, log=logs.append)
    assert summary["status"] == "prepared" and summary["skipped"] == 2 and summary["train"] + summary["test"] == 10
    named = {s["file"]: s["reason"] for s in summary["skipped_files"]}
    assert "MemoryError" in named["a/001.jpg"] and "SyntaxError: broken PNG file" in named["b/002.pgm"]
    in_manifest = {s["file"] for e in manifest(tmp_path / "out")["splits"].values() for s in e["skipped"]}
    assert in_manifest == set(failures)
    for name in failures:
        assert any(line.startswith("warning:") and name in line for line in logs), logs


def test_a_file_name_that_is_not_utf8_is_prepared_like_any_other(tmp_path, capsys):
    """Linux allows any bytes but / in a name: such a file is split, decoded and named as any other."""
    source = write_folder(tmp_path / "source", n=12)
    name = os.fsdecode(b"bad\xff.png")
    Image.new("RGB", (14, 14), (200, 10, 10)).save(os.path.join(os.fsencode(source), b"bad\xff.png"))
    memory = {split: get_dataset("folder", source, split, image_size=SIZE) for split in SPLITS}
    assert name in memory["train"].filenames + memory["test"].filenames
    with open(os.path.join(os.fsencode(source), b"zz\xfe.png"), "wb") as f:
        f.write(b"not an image")  # skipped, and named in a form that prints
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", "folder", "--data", str(source), "--out", str(out),
                 "--image-size", str(SIZE), "--workers", "0", "--no-progress", "--json"]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["train"] + summary["test"] == 13 and summary["skipped"] == 1
    assert summary["skipped_files"][0]["file"] == "zz\\xfe.png"
    assert "skipped zz\\xfe.png: has an image extension but cannot be decoded" in printed.err
    for split in SPLITS:  # the prepared set names it as the in-memory loader does, and reads it back
        disk = get_dataset("prepared", out, split)
        assert list(disk.filenames) == memory[split].filenames and torch.equal(whole(disk), memory[split].images)


KILLED_MID_WAY = textwrap.dedent("""
    import os, signal, sys
    from glowflow import io
    from glowflow.data import prepare as prep
    real, shards = prep.atomic_save_npy, []

    def dying(path, array):
        shards.append(array.shape)
        if len(shards) == 3:  # half of the third shard's bytes are on disk when the process dies
            with io.atomic_file(path) as tmp:
                tmp.write_bytes(array.tobytes()[: array.nbytes // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, array)

    prep.atomic_save_npy = dying
    prep.prepare("folder", sys.argv[1], sys.argv[2], image_size=%d, shard_size=4, workers=2, progress=False)
""" % SIZE)


def _live_processes_in_group(group: int) -> list[int]:
    """Processes of a process group that have not exited (zombies do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _assert_no_process_outlives(group: int, seconds: float = 10.0) -> None:
    """Every process of ``group`` ends within ``seconds`` (where /proc tells)."""
    if not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + seconds
    while _live_processes_in_group(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_processes_in_group(group) == []


def test_an_interrupted_preparation_resumes_to_the_set_an_uninterrupted_one_writes(tmp_path):
    source = write_folder(tmp_path / "source")
    add_corrupt_files(source)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WAY, str(source), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        output = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == -signal.SIGKILL, output[-3000:]
        _assert_no_process_outlives(proc.pid)  # its decoding workers die with it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # what the kill left is not a prepared set, and says so to whoever reads it
    assert not is_prepared(out) and (out / PROGRESS_DIR).is_dir()
    assert len(list((out / "train").glob("images-*.npy"))) == 2
    assert any(".tmp-" in p.name for p in (out / "train").iterdir())  # the dead writer's half shard
    for name in ("prepared", "folder"):
        with pytest.raises(ValueError, match="did not finish.*again to resume"):
            get_dataset(name, out, "train", image_size=SIZE)
    logs = []
    resumed = prepare("folder", source, out, image_size=SIZE, shard_size=4, workers=0, progress=False,
                      log=logs.append)
    assert resumed["status"] == "prepared" and any("resuming, 2 of" in line for line in logs), logs
    reference = tmp_path / "reference"
    prepare("folder", source, reference, image_size=SIZE, shard_size=4, workers=0, **QUIET)
    assert manifest(out)["splits"] == manifest(reference)["splits"]  # every file's SHA-256, the skips, the counts
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".lock") == \
        sorted(p.relative_to(reference) for p in reference.rglob("*") if p.name != ".lock")  # nothing left over
    assert verify_prepared(out) == []


def test_a_shard_cut_short_by_a_full_disk_is_an_error_never_a_recorded_shard(tmp_path):
    """numpy's own writes to a file do not report a short write; a shard must be whole or absent."""
    source = write_folder(tmp_path / "source")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import resource, sys
        from glowflow.cli import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))  # a shard of 4 RGB 12x12 images is 1,856 bytes
        sys.exit(main(["prepare", "--dataset", "folder", "--data", {str(source)!r}, "--image-size", "{SIZE}",
                       "--channels", "3", "--shard-size", "4", "--workers", "0", "--out", {str(out)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "could not write" in proc.stderr and "file-size limit" in proc.stderr
    assert not is_prepared(out) and not list(out.rglob("images-*.npy"))


KILLS_ITS_WORKER = textwrap.dedent('''
    import os, signal, sys
    from glowflow.cli import main
    from glowflow.data import prepare as prep
    real = prep.decode_file

    def killed_on(path, size, channels):  # as the out-of-memory killer ends a process: SIGKILL
        if path.name.startswith("zz-kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, size, channels)

    prep.decode_file = killed_on  # at import: each decoding worker imports this file too (as __mp_main__)
    if __name__ == "__main__":
        sys.exit(main(["prepare", "--dataset", "folder", *sys.argv[1:]]))
''')


def test_a_killed_decoding_worker_stops_the_preparation_with_what_happened_and_it_resumes(tmp_path):
    source = tmp_path / "source"
    write_folder(source / "train", n=12)
    write_folder(source / "test", n=3, seed=1)
    Image.new("RGB", (14, 14), (9, 9, 9)).save(source / "train" / "zz-kill.png")  # sorted last: shard 4 of 4
    script = tmp_path / "kills_its_worker.py"  # a file, not -c: the workers import it by its path
    script.write_text(KILLS_ITS_WORKER)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), "--data", str(source), "--out", str(out), "--image-size",
                             str(SIZE), "--shard-size", "4", "--workers", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("prepare still waits, 60 s after one of its decoding workers was killed")
        assert proc.returncode == 1, err[-3000:]
        assert "a decoding worker process ended abruptly" in err and "SIGKILL" in err, err[-3000:]
        assert "train split" in err and "3 shards written so far are kept" in err and "again to resume" in err, err
        _assert_no_process_outlives(proc.pid)  # the other worker does not outlive it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not is_prepared(out)
    logs = []  # the same command, now that memory suffices: it resumes after the written shards
    prepare("folder", source, out, image_size=SIZE, shard_size=4, workers=2, progress=False, log=logs.append)
    assert any("prepare train: resuming, 3 of 4 shards" in line for line in logs), logs
    reference = tmp_path / "reference"
    prepare("folder", source, reference, image_size=SIZE, shard_size=4, workers=0, **QUIET)
    assert manifest(out)["splits"] == manifest(reference)["splits"] and verify_prepared(out) == []


def test_an_interrupted_preparation_with_other_settings_starts_over(tmp_path, monkeypatch):
    source = write_folder(tmp_path / "source")
    out = tmp_path / "out"
    real, calls = prep._write_shard, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(prep, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare("folder", source, out, image_size=SIZE, shard_size=4, workers=0, **QUIET)
    monkeypatch.undo()
    assert not is_prepared(out) and len(list((out / "train").glob("*.npy"))) == 2
    logs = []
    prepare("folder", source, out, image_size=SIZE, shard_size=5, workers=0, progress=False, log=logs.append)
    assert any("starting over" in line for line in logs), logs
    reference = tmp_path / "reference"
    prepare("folder", source, reference, image_size=SIZE, shard_size=5, workers=0, **QUIET)
    assert manifest(out)["splits"] == manifest(reference)["splits"]
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(p.name for p in (reference / "train").iterdir())


def test_a_damaged_prepared_set_is_refused_with_what_to_do(fashion, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(fashion["out"], out)
    shard = out / manifest(out)["splits"]["train"]["shards"][1]["file"]
    content = bytearray(shard.read_bytes())
    content[-1] ^= 1
    shard.write_bytes(bytes(content))
    assert verify_prepared(out) == [f"{shard}: its SHA-256 does not match the manifest's"]
    with pytest.raises(ValueError, match="does not match.*--overwrite"):
        prepare("fashion-mnist", fashion["data"], out, shard_size=10, verify=True, **QUIET)
    shard.write_bytes(bytes(content[:-100]))
    with pytest.raises(ValueError, match="corrupt or truncated image shard"):
        get_dataset("prepared", out, "train")
    shard.unlink()
    with pytest.raises(ValueError, match="incomplete prepared set.*missing"):
        get_dataset("prepared", out, "train")
    (out / MANIFEST).unlink()
    with pytest.raises(ValueError, match="not a prepared dataset"):
        get_dataset("prepared", out, "train")
    with pytest.raises(ValueError, match="needs root"):
        get_dataset("prepared", None, "train")


# ------------------------------------------------------------------------------------ bad input
def test_prepare_refuses_bad_input_and_never_touches_what_is_not_its_own(fashion, tmp_path):
    source = write_folder(tmp_path / "source", n=12)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        prepare("folder", source, tmp_path / "a-file", image_size=SIZE, **QUIET)
    with pytest.raises(ValueError, match="not empty and holds no prepared set"):
        prepare("folder", source, source, image_size=SIZE, **QUIET)  # e.g. the source folder itself
    assert not (source / DirectoryLock.NAME).exists()
    with pytest.raises(ValueError, match="needs --image-size"):
        prepare("folder", source, tmp_path / "out", **QUIET)
    with pytest.raises(ValueError, match="prepared already"):
        prepare("prepared", fashion["out"], tmp_path / "out", **QUIET)
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare("lsun", source, tmp_path / "out", **QUIET)
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1"):
        prepare("folder", source, tmp_path / "out", image_size=SIZE, shard_size=0, **QUIET)
    out = tmp_path / "out"
    prepare("folder", source, out, image_size=SIZE, workers=0, **QUIET)
    with pytest.raises(ValueError, match="made with other settings; pass --overwrite"):
        prepare("folder", source, out, image_size=8, workers=0, **QUIET)
    replaced = prepare("folder", source, out, image_size=8, workers=0, overwrite=True, **QUIET)
    assert replaced["image_shape"] == [3, 8, 8] and manifest(out)["image_shape"] == [3, 8, 8]
    with DirectoryLock(out, "a test"):
        with pytest.raises(LockedError, match="in use by another glowflow prepare"):
            prepare("folder", source, out, image_size=8, workers=0, **QUIET)
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "test").mkdir()
    (broken / "train" / "x.png").write_bytes(b"not an image")
    Image.new("RGB", (4, 4)).save(broken / "test" / "y.png")
    with pytest.raises(ValueError, match=r"no image of the train split could be read \(1 files skipped; first: x.png"):
        prepare("folder", broken, tmp_path / "broken-out", image_size=4, workers=0, **QUIET)


def test_cli_prepare(tmp_path, capsys):
    source = write_folder(tmp_path / "source", n=12)
    out = tmp_path / "out"
    argv = ["prepare", "--dataset", "folder", "--data", str(source), "--out", str(out), "--workers", "0", "--json"]
    assert main([*argv, "--image-size", str(SIZE), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "prepared" and result["train"] + result["test"] == 12 and result["out"] == str(out)
    assert result["image_shape"] == [3, SIZE, SIZE]
    assert main([*argv, "--image-size", str(SIZE), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "verified"
    assert main(argv) == 2
    assert "needs --image-size" in capsys.readouterr().err
    assert main([*argv, "--image-size", str(SIZE), "--test-fraction", "1.5"]) == 2
    assert "--test-fraction must lie in (0, 1)" in capsys.readouterr().err
    for flag, value, message in (("--image-size", "0", "expected an image side 1..4096"),
                                 ("--image-size", "5000", "expected an image side 1..4096"),
                                 ("--channels", "2", "invalid choice"),
                                 ("--workers", "-1", "expected a number of processes >= 0")):
        with pytest.raises(SystemExit):
            main([*argv, flag, value])
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with Gloo")
def test_two_processes_reading_a_prepared_set_train_what_one_process_trains_in_memory(fashion, tmp_path):
    preset = _preset_file(tmp_path)  # dataset fashion-mnist; --data points at the prepared set
    two = tmp_path / "two_processes"
    _torchrun(2, preset, fashion["out"], two)
    cfg = build_train_config(preset, [f"data={fashion['data']}"])
    one = Trainer(cfg, tmp_path / "one_process", get_dataset("fashion-mnist", fashion["data"], "train"),
                  log=lambda *a: None)
    initial = {k: v.detach().clone() for k, v in one.model.state_dict().items()}
    while one.step < STEPS:
        one.train_step()
    trained = {k: v.detach().clone() for k, v in one.model.state_dict().items()}
    assert _max_abs_diff(_raw(two), trained) <= TOLERANCE
    assert _max_abs_diff(trained, initial) > 100 * TOLERANCE
