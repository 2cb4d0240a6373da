"""Preparing a dataset once: :func:`prepare` writes the shards, arrays and manifest of
:mod:`glowflow.data.prepared`.

Image folders are decoded by worker processes with the in-memory loader's own decoding
(:func:`glowflow.data.folder.decode_file`), a shard at a time while the next one decodes; a file
that cannot be decoded is skipped and listed in the manifest with its reason. Other datasets are
read by their loaders one loadable unit at a time (a downsampled-ImageNet ``.npz`` batch; the whole
split for IDX and CIFAR-10, which fit in memory) and cut into shards.

Interruptions: each shard is written whole and atomically (:func:`glowflow.io.atomic_save_npy`), then
recorded in ``.progress/``. A later run with the same plan (dataset, root, shape, shard size, the
list of source files) skips the recorded shards; a run with another plan starts over. The manifest,
which alone makes the directory a prepared set, is written last. The output directory is locked
(:class:`glowflow.io.DirectoryLock`) while a preparation runs. A decoding worker that dies (the
out-of-memory killer) stops the preparation with a ``ChildProcessError`` saying so; the shards
written are kept for the next run.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..io import (DirectoryLock, atomic_save_npy, atomic_write_json, default_permissions, file_sha256, read_json,
                  remove_stale_temporaries)
from ..progress import Progress
from . import SPLITS, canonical_name, default_root, get_dataset
from .folder import DEFAULT_TEST_FRACTION, decode_file, list_folder
from .imagenet import load_imagenet_npz
from .prepared import BIT_DEPTH, MANIFEST, PREPARED_FORMAT, PROGRESS_DIR, is_prepared, read_manifest, verify_prepared
from .transforms import adapt

__all__ = ["prepare", "default_shard_size", "default_workers", "DEFAULT_SHARD_BYTES"]

DEFAULT_SHARD_BYTES = 256 * 2**20  # a shard's size when --shard-size is not given
PLAN = "plan.json"
SUMMARY_SKIPPED_FILES = 20  # skipped files the summary names (the manifest lists them all)
# the batches load_imagenet_npz reads, listed here so that each is prepared on its own
_IMAGENET_FILES = {"train": "train_data_batch_*.npz", "test": "val_data.npz"}


def default_shard_size(image_shape) -> int:
    """Images per shard: :data:`DEFAULT_SHARD_BYTES` of them (ImageNet 64x64: 21,845)."""
    return max(1, DEFAULT_SHARD_BYTES // math.prod(image_shape))


def default_workers() -> int:
    """Decoding processes: one per CPU this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------ decoding
def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the preparing process's to handle
    # A worker of a killed preparation exits: the workers hold their task queue's write end too, so
    # waiting for tasks would never end.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns when the preparing process has ended
    os._exit(1)


def _decode_one(task: tuple[str, int, int]):
    """``(path, size, channels)`` -> ``(uint8 [C, S, S], None)``, or ``(None, reason)`` for a file
    that cannot be read or decoded, whatever the decoder raised."""
    path, size, channels = task
    try:
        return decode_file(Path(path), size, channels), None
    except (ValueError, OSError) as e:
        return None, str(e).removeprefix(f"{path}: ")  # the manifest names the file beside the reason
    except MemoryError:  # its arrays are freed with the exception: the next file has the memory again
        return None, "decoding it needs more memory than there is (MemoryError)"
    except Exception as e:
        # Decoders meet hostile files and raise what their parsers do (PIL: SyntaxError, struct.error,
        # EOFError, ...). Each such file costs itself, not the preparation; a fault of ours that hit
        # every file still stops the run, in _finish: "no image of the split could be read".
        return None, f"cannot be decoded ({type(e).__name__}: {e})"


@contextlib.contextmanager
def _decoder(workers: int, shard_size: int):
    """A function ``tasks -> iterator of _decode_one results, in order``: ``workers`` processes, or
    this process for 0. The forkserver starts workers from a clean process (no threads of ours).

    A worker that dies (the out-of-memory killer's SIGKILL, a crash in a decoder) makes the
    iterator raise ``BrokenProcessPool``: a ``multiprocessing.Pool`` would start another worker and
    wait forever for the dead one's files."""
    if workers == 0:
        yield lambda tasks: map(_decode_one, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])  # imported once, in the server, not in every worker
    chunk = max(1, min(64, shard_size // (4 * workers)))
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
    try:
        yield lambda tasks: pool.map(_decode_one, tasks, chunksize=chunk)
    finally:
        # on an error or Ctrl-C, the queued files are dropped rather than decoded for nobody
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------ the plan
def _fingerprint(lines) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _files_near(root: Path, out: Path) -> list[Path]:
    """The files a loader may read: ``root`` itself, or those at most two levels below it."""
    if root.is_file():
        return [root]
    found = []
    for depth in ("*", "*/*"):
        found += [p for p in root.glob(depth) if p.is_file() and not p.name.startswith(".")
                  and out.resolve() not in p.resolve().parents]
    return sorted(found)


def _imagenet_files(name: str, root: Path, split: str) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(root.glob(_IMAGENET_FILES[split]),
                   key=lambda p: [int(t) if t.isdigit() else t for t in p.stem.split("_")])
    if not files:
        load_imagenet_npz(name, root, split, 0)  # raises the loader's own message: what to put where
    return files


def _array_units(name: str, root: Path, split: str, size: int, channels: int) -> list:
    """``(key, load)`` pairs: each ``load()`` gives an ImageDataset of the split's next rows at the
    prepared shape, exactly as ``get_dataset(..., image_size=size, channels=channels)`` would."""
    if name in ("imagenet32", "imagenet64"):
        def load(path):
            ds = load_imagenet_npz(name, path, split, None)
            ds.images = adapt(ds.images, size, channels)
            return ds
        return [(p.name, lambda p=p: load(p)) for p in _imagenet_files(name, root, split)]
    return [(split, lambda: get_dataset(name, root, split, image_size=size, channels=channels))]


def _native_shape(name: str, root: Path) -> tuple[int, int, int]:
    if name in ("imagenet32", "imagenet64"):
        return (3, int(name.removeprefix("imagenet")), int(name.removeprefix("imagenet")))
    return get_dataset(name, root, "test", limit=0).image_shape  # the loaders read shapes for limit=0


def _plan(name: str, root: Path, out: Path, image_size, channels, shard_size, test_fraction) -> tuple[dict, dict]:
    """The settings that define a prepared set (a resumed run must have the same), and per split
    what to read: ``("folder", base, relative paths)`` or ``("arrays", units)``."""
    if name == "folder":
        c, s = channels or 3, image_size
        sources, fingerprints = {}, {}
        for split in SPLITS:
            base, rel = list_folder(root, split, test_fraction)
            sources[split] = ("folder", base, rel)
            fingerprints[split] = {"count": len(rel), "sha256": _fingerprint(rel)}
    else:
        native = _native_shape(name, root) if image_size is None or channels is None else None
        c, s = channels or native[0], image_size or native[1]
        sources = {split: ("arrays", _array_units(name, root, split, s, c)) for split in SPLITS}
        files = _files_near(root, out)
        lines = [f"{p.relative_to(root) if p != root else p.name} {p.stat().st_size} {p.stat().st_mtime_ns}"
                 for p in files]
        fingerprints = {split: {"count": len(sources[split][1]), "sha256": _fingerprint(lines)} for split in SPLITS}
    shape = (c, s, s)
    plan = {"format": PREPARED_FORMAT, "dataset": name, "root": str(root.resolve()), "image_shape": list(shape),
            "shard_size": shard_size or default_shard_size(shape),
            "test_fraction": test_fraction if name == "folder" else None, "sources": fingerprints}
    return plan, sources


# ------------------------------------------------------------------------------------ writing
def _record_path(records: Path, split: str, unit: int, shard: int) -> Path:
    return records / f"{split}-{unit:04d}-{shard:05d}.json"


def _unit_path(records: Path, split: str, unit: int) -> Path:
    return records / f"{split}-{unit:04d}.done.json"


def _write_shard(out: Path, records: Path, split: str, unit: int, shard: int, images: np.ndarray,
                 labels, names, skipped: list[dict], sources: list[int]) -> None:
    """One shard's images (atomically), then its record: a recorded shard is complete."""
    record = {"unit": unit, "shard": shard, "count": int(len(images)), "sources": sources, "skipped": skipped,
              "labels": labels, "names": names}
    if len(images):  # a shard whose every file was unreadable has a record and no file
        record.update(_save_array(out, f"{split}/images-{unit:04d}-{shard:05d}.npy", np.ascontiguousarray(images)))
    atomic_write_json(_record_path(records, split, unit, shard), record, indent=None)


def _prepare_folder(out: Path, records: Path, split: str, base: Path, rel: list[str], shape, k: int,
                    workers: int, show: bool, log) -> int:
    """Decode a folder split into shards of ``k`` source files each; the source files decoded."""
    n_shards = math.ceil(len(rel) / k)
    todo = [i for i in range(n_shards) if not _record_path(records, split, 0, i).is_file()]
    remaining = sum(len(rel[i * k:(i + 1) * k]) for i in todo)
    if len(todo) < n_shards:
        log(f"prepare {split}: resuming, {n_shards - len(todo)} of {n_shards} shards already written")

    def tasks(i):
        return [(str(base / r), shape[1], shape[0]) for r in rel[i * k:(i + 1) * k]]

    decoded, written = 0, n_shards - len(todo)
    with (Progress(len(rel), f"prepare {split}", enabled=show, unit="img", initial=len(rel) - remaining) as bar,
          _decoder(min(workers, remaining), k) as decode):
        pending = decode(tasks(todo[0])) if todo else None
        for j, i in enumerate(todo):
            results = []
            try:
                for result in pending:
                    results.append(result)
                    bar.update(1)
                pending = decode(tasks(todo[j + 1])) if j + 1 < len(todo) else None  # decodes while we write
            except BrokenProcessPool:
                raise ChildProcessError(
                    "a decoding worker process ended abruptly (killed: the out-of-memory "
                    f"killer sends SIGKILL; or crashed) while decoding the {split} split's files from "
                    f"{_shown(rel[i * k])} on (shard {i + 1} of {n_shards}); the {written} shards written so far "
                    "are kept: run the same command again to resume (with fewer --workers if memory ran "
                    "out)") from None
            names = rel[i * k:(i + 1) * k]
            good = [(n, a) for n, (a, _) in zip(names, results) if a is not None]
            skipped = [{"file": n, "reason": why} for n, (a, why) in zip(names, results) if a is None]
            for s in skipped:
                log(_shown(f"warning: prepare {split}: skipped {s['file']}: {s['reason']}"))
            images = np.stack([a for _, a in good]) if good else np.empty((0, *shape), np.uint8)
            _write_shard(out, records, split, 0, i, images, None, [n for n, _ in good], skipped,
                         [i * k, i * k + len(names)])
            decoded, written = decoded + len(names), written + 1
    atomic_write_json(_unit_path(records, split, 0), {"shards": n_shards, "sources": len(rel), "class_names": None})
    return decoded


def _prepare_arrays(out: Path, records: Path, split: str, units: list, shape, k: int, show: bool) -> int:
    """Cut each unit of an array dataset into shards of ``k`` rows; the rows written."""
    written = 0
    with Progress(None, f"prepare {split}", enabled=show, unit="img") as bar:
        for u, (key, load) in enumerate(units):
            written += _prepare_unit(out, records, split, u, key, load, shape, k, bar)
    return written


def _prepare_unit(out: Path, records: Path, split: str, u: int, key: str, load, shape, k: int,
                  bar: Progress) -> int:
    """One loadable unit (the whole split, or one .npz batch) cut into shards; the rows written."""
    if _unit_path(records, split, u).is_file():
        return 0
    ds = load()
    if tuple(ds.image_shape) != tuple(shape):
        raise ValueError(f"{key}: images are {tuple(ds.image_shape)}, expected {tuple(shape)}")
    n, written = len(ds), 0
    n_shards = math.ceil(n / k)
    for i in range(n_shards):
        rows = slice(i * k, min(n, (i + 1) * k))
        if not _record_path(records, split, u, i).is_file():
            labels = None if ds.labels is None else ds.labels[rows].tolist()
            names = None if ds.filenames is None else list(ds.filenames[rows])
            _write_shard(out, records, split, u, i, ds.batch(rows).numpy(), labels, names, [],
                         [rows.start, rows.stop])
            written += rows.stop - rows.start
        bar.update(rows.stop - rows.start)
    atomic_write_json(_unit_path(records, split, u),
                      {"key": key, "shards": n_shards, "sources": n, "class_names": ds.class_names})
    return written


def _save_array(out: Path, rel: str, array: np.ndarray) -> dict:
    atomic_save_npy(out / rel, array)  # a short write (disk full) raises, never records a truncated shard
    return {"file": rel, "sha256": file_sha256(out / rel)}


def _finish(out: Path, progress_dir: Path, plan: dict, n_units: dict) -> dict:
    """Gather the records into each split's labels, file names and shard list; write the manifest."""
    splits, class_names = {}, None
    for split in SPLITS:
        records = []
        for u in range(n_units[split]):
            unit = read_json(_unit_path(progress_dir, split, u))
            class_names = class_names or unit.get("class_names")
            records += [read_json(_record_path(progress_dir, split, u, i)) for i in range(unit["shards"])]
        count = sum(r["count"] for r in records)
        skipped = [s for r in records for s in r["skipped"]]
        if count == 0:
            first = _shown("; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3]))
            raise ValueError(f"no image of the {split} split could be read ({len(skipped)} files skipped"
                             + (f"; first: {first}" if first else "") + ")")
        entry = {"count": count, "skipped": skipped, "labels": None, "filenames": None,
                 "shards": [{"file": r["file"], "count": r["count"], "sha256": r["sha256"]}
                            for r in records if r["count"]]}
        if any(r["labels"] is not None for r in records):
            labels = np.array([y for r in records for y in (r["labels"] or [])], dtype=np.int64)
            entry["labels"] = _save_array(out, f"{split}/labels.npy", labels)
        if any(r["names"] is not None for r in records):
            names = [n.encode("utf-8", "surrogateescape") for r in records for n in (r["names"] or [])]
            width = max([1] + [len(n) for n in names])
            entry["filenames"] = _save_array(out, f"{split}/filenames.npy", np.array(names, dtype=f"S{width}"))
        splits[split] = entry
    manifest = {"format": PREPARED_FORMAT, "source": {"dataset": plan["dataset"], "root": plan["root"]},
                "image_shape": plan["image_shape"], "dtype": "uint8", "bit_depth": BIT_DEPTH,
                "count": sum(e["count"] for e in splits.values()), "class_names": class_names,
                "splits": splits, "plan": plan, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    for split in SPLITS:
        default_permissions(out / split, directory=True)
    atomic_write_json(out / MANIFEST, manifest, indent=1)  # last: from now on the directory is a prepared set
    shutil.rmtree(progress_dir, ignore_errors=True)
    return manifest


# ------------------------------------------------------------------------------------ the entry point
def _check_out(out: Path) -> None:
    """Refuse an output that is a file, or a directory holding something other than a preparation."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a directory (created if missing)")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir() if p.name != DirectoryLock.NAME)
        if entries and MANIFEST not in entries and PROGRESS_DIR not in entries:
            raise ValueError(f"{out} is not empty and holds no prepared set ({', '.join(entries[:3])}"
                             f"{' ...' if len(entries) > 3 else ''}); choose a new or empty --out")


def _clear(out: Path) -> None:
    """Remove what a preparation wrote (the manifest first, so the directory stops being a set)."""
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()
    for name in (PROGRESS_DIR, *SPLITS):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _remove_dead_writers_temporaries(out: Path) -> None:
    for d in (out, out / PROGRESS_DIR, *(out / s for s in SPLITS)):
        if d.is_dir():
            for p in list(d.iterdir()):
                if p.name.startswith(".") and ".tmp-" in p.name:
                    remove_stale_temporaries(d / p.name[1:p.name.index(".tmp-")])


def _check_settings(image_size, channels, shard_size, workers, folder: bool) -> None:
    for what, value, low in (("image_size", image_size, 1), ("shard_size", shard_size, 1), ("workers", workers, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if folder and image_size is None:
        raise ValueError("a folder of images needs --image-size S: the side its images are resized and "
                         "cropped to (the model's)")


def _shown(name: str) -> str:
    """Text naming files, as it can be printed: a name's bytes that are not UTF-8 (legal on Linux;
    surrogates in the ``str``) as ``\\xff``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _summary(out: Path, manifest: dict, status: str, processed: int, seconds: float) -> dict:
    splits = manifest["splits"]
    skipped = [{"split": split, "file": _shown(s["file"]), "reason": _shown(s["reason"])}
               for split, entry in splits.items() for s in entry["skipped"]]
    return {"out": str(out), "status": status, "dataset": manifest["source"]["dataset"],
            "data": manifest["source"]["root"], "image_shape": manifest["image_shape"],
            **{split: splits[split]["count"] for split in splits},
            "skipped": len(skipped),
            # named here too, not only in the manifest; a few, so that a summary line stays a line
            "skipped_files": skipped[:SUMMARY_SKIPPED_FILES],
            "shards": sum(len(e["shards"]) for e in splits.values()),
            "seconds": round(seconds, 2), "images_per_s": round(processed / max(seconds, 1e-9), 1)}


def prepare(name: str, root, out, image_size: int | None = None, channels: int | None = None,
            shard_size: int | None = None, workers: int | None = None,
            test_fraction: float = DEFAULT_TEST_FRACTION, overwrite: bool = False, verify: bool = False,
            progress: bool = True, log=print) -> dict:
    """Prepare both splits of dataset ``name`` (root ``root``) into ``out``; returns a summary.

    ``image_size`` (required for a folder) and ``channels`` (a folder: 3) give the prepared shape,
    by default the dataset's own; ``shard_size`` images per shard (:func:`default_shard_size`);
    ``workers`` decoding processes for folders (:func:`default_workers`; 0: this process). A
    directory that already holds this preparation is left as it is (``verify`` re-checks its
    checksums), one that holds another is refused unless ``overwrite``, and an interrupted one is
    resumed (same plan) or started over (another plan).
    """
    t0 = time.perf_counter()
    name = canonical_name(name)
    if name == "prepared":
        raise ValueError("this data is prepared already: read it with --dataset prepared --data DIR")
    _check_settings(image_size, channels, shard_size, workers, name == "folder")
    if root is None:
        root = default_root(name)
        if root is None:
            raise ValueError(f"where is {name}? pass --data DIR, the dataset's root directory")
    root, out = Path(root).expanduser(), Path(out).expanduser()
    _check_out(out)
    with DirectoryLock(out, "another glowflow prepare"):
        plan, sources = _plan(name, root, out, image_size, channels, shard_size, test_fraction)
        if is_prepared(out) and not overwrite:
            manifest = read_manifest(out)
            if manifest.get("plan") != plan:
                raise ValueError(f"{out} already holds a prepared {manifest['source']['dataset']} set "
                                 f"({'x'.join(map(str, manifest['image_shape']))}) made with other settings; pass "
                                 "--overwrite to replace it, or choose another --out")
            shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # a kill after the manifest, before this
            bad = verify_prepared(out) if verify else []
            if bad:
                raise ValueError(f"{out}: {'; '.join(bad[:3])}; prepare it again with --overwrite")
            return _summary(out, manifest, "verified" if verify else "already prepared", 0, time.perf_counter() - t0)
        if overwrite:
            _clear(out)
        progress_dir = out / PROGRESS_DIR
        if progress_dir.is_dir():
            try:
                same = read_json(progress_dir / PLAN) == plan
            except ValueError:  # a plan that was never fully written
                same = False
            if not same:
                log(f"prepare: {out} holds an interrupted preparation with other settings; starting over")
                _clear(out)
        _remove_dead_writers_temporaries(out)
        progress_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(progress_dir / PLAN, plan)
        shape, k = tuple(plan["image_shape"]), plan["shard_size"]
        processed, n_units = 0, {}
        for split in SPLITS:
            kind, *what = sources[split]
            (out / split).mkdir(exist_ok=True)
            if kind == "folder":
                n_units[split] = 1
                processed += _prepare_folder(out, progress_dir, split, *what, shape, k,
                                             default_workers() if workers is None else workers, progress, log)
            else:
                n_units[split] = len(what[0])
                processed += _prepare_arrays(out, progress_dir, split, what[0], shape, k, progress)
        manifest = _finish(out, progress_dir, plan, n_units)
    return _summary(out, manifest, "prepared", processed, time.perf_counter() - t0)
