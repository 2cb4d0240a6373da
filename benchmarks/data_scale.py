"""Data at scale: prepare a synthetic image folder several times larger than a memory cap, train
from it under that cap, and compare with the in-memory loader on a set that fits; prints JSON.

Each stage runs in its own process, one after another, so each peak is its own:

1. ``generate``: ``--images`` synthetic JPEGs (smooth random colour fields plus noise, ``--source-size``
   pixels a side, so decoding and resizing cost what small photos do), written in parallel. Kept
   in ``--workdir`` between runs; not part of the result.
2. ``prepare``: :func:`glowflow.data.prepare.prepare` of that folder at ``--image-size`` with
   ``--workers`` decoding processes: images/s, the preparing process's peak RSS and the peak of the
   RSS summed over it and its workers (sampled).
3. ``train-prepared``: a small Glow trained ``--steps`` steps from the prepared set, in a process
   whose anonymous and private memory is capped at ``--cap-mb`` (``RLIMIT_DATA``; memory-mapped
   shards are file pages and do not count, which is the point). Training images/s, the images/s of
   the data path alone (``Trainer.global_batch``: random rows, dequantisation noise), peak RSS.
4. ``train-memory``: the same on the first ``--fit-images`` images loaded by the in-memory folder
   loader (decoded one by one in the training process), under the same cap.
5. ``memory-full``: the in-memory loader on the whole set under the cap: it runs out of memory
   (when the set is larger than the cap), which the report says, and when.

    .venv/bin/python benchmarks/data_scale.py --images 300 --image-size 16 --fit-images 100 \\
        --steps 3 --batch-size 8 --cap-mb 900                       # a check that it runs (tiny)
    .venv/bin/python benchmarks/data_scale.py --images 300000 --image-size 64 --fit-images 10000 \\
        --steps 30 --batch-size 64 --cap-mb 1024 --workdir /tmp/glowflow-data-scale \\
        --out benchmarks/results/data_scale.json                    # 3.3 GB train split, 3.1x the cap (docs/results.md)

The cap must hold what training the small Glow needs anyway (torch, activations of one batch) plus,
for the in-memory comparison, its images; a stage that exceeds it fails with a MemoryError.

The OS page cache is left alone: shards just written may still be cached, so the data path's
images/s is that of a warm cache unless the set is larger than the machine's free memory.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:
    import glowflow
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import glowflow
from glowflow.config import TrainConfig
from glowflow.data import get_dataset
from glowflow.data.prepare import prepare
from glowflow.io import atomic_write_text
from glowflow.train import Trainer, load_split

STAGES = ("generate", "prepare", "train-prepared", "train-memory", "memory-full")
STAGE_SETTINGS = ("images", "image-size", "source-size", "fit-images", "workers", "cap-mb", "steps", "batch-size",
                  "flow-steps", "hidden", "workdir")  # what the driver hands each stage
SAMPLE_INTERVAL_S = 0.25  # how often the RSS of a stage's processes is summed
MB = 2**20


# ------------------------------------------------------------------------------------ stages
def _synthetic_image(task: tuple[str, int, int]) -> None:
    path, index, side = task
    rng = np.random.default_rng(index)
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 8, (side, side, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def stage_generate(args) -> dict:
    folder = args.workdir / "images"
    marker = args.workdir / "generated.json"
    wanted = {"images": args.images, "source_size": args.source_size}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return {"reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    tasks = []
    for i in range(args.images):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        tasks.append((str(sub / f"{i:07d}.jpg"), i, args.source_size))
    t0 = time.perf_counter()
    with multiprocessing.get_context("forkserver").Pool(args.workers) as pool:
        for _ in pool.imap_unordered(_synthetic_image, tasks, chunksize=256):
            pass
    fit = args.workdir / "images-fit"  # the first --fit-images files, for the in-memory loader
    shutil.rmtree(fit, ignore_errors=True)
    for path, _, _ in tasks[: args.fit_images]:
        target = fit / Path(path).relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    atomic_write_text(marker, json.dumps(wanted))
    return {"reused": False, "seconds": round(time.perf_counter() - t0, 1)}


def stage_prepare(args) -> dict:
    out = args.workdir / "prepared"
    summary = prepare("folder", args.workdir / "images", out, image_size=args.image_size, workers=args.workers,
                      overwrite=True, progress=True, log=lambda m: print(m, file=sys.stderr))
    return {"summary": summary, "peak_rss_mb": _peak_rss_mb()}


def _cap_memory(args) -> None:
    """Cap anonymous and private memory (heap, tensors); file mappings such as the shards are not counted."""
    cap = args.cap_mb * MB
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def _train_config(args) -> TrainConfig:
    return TrainConfig.from_dict({
        "dataset": "folder", "model": {"image_shape": [3, args.image_size, args.image_size], "levels": 3,
                                       "steps": args.flow_steps, "hidden_channels": args.hidden},
        "batch_size": args.batch_size, "init_batch_size": args.batch_size, "warmup_steps": 10,
        "max_steps": args.steps, "progress": False, "device": "cpu"})


def _train(args, data, out: Path) -> dict:
    cfg = _train_config(args)
    trainer = Trainer(cfg, out, data, overwrite=True, log=lambda *a: None)
    t0 = time.perf_counter()
    for step in range(args.steps):
        trainer.global_batch(step)
    reads = time.perf_counter() - t0
    trainer.train_step()  # warm-up, not timed
    t0 = time.perf_counter()
    for _ in range(args.steps - 1):
        trainer.train_step()
    seconds = time.perf_counter() - t0
    trainer.close()
    return {"steps": args.steps, "batch_size": args.batch_size,
            "images_per_s": round(args.batch_size * (args.steps - 1) / max(seconds, 1e-9), 2),
            "data_path_images_per_s": round(args.batch_size * args.steps / max(reads, 1e-9), 1)}


def stage_train_prepared(args) -> dict:
    _cap_memory(args)
    data = load_split("prepared", args.workdir / "prepared", "train", (3, args.image_size, args.image_size))
    result = _train(args, data, args.workdir / "run-prepared")
    return {**result, "train_images": len(data), "peak_rss_mb": _peak_rss_mb(), **_rss_now_mb()}


def stage_train_memory(args) -> dict:
    _cap_memory(args)
    t0 = time.perf_counter()
    data = get_dataset("folder", args.workdir / "images-fit", "train", image_size=args.image_size)
    load = time.perf_counter() - t0
    result = _train(args, data, args.workdir / "run-memory")
    return {**result, "train_images": len(data), "load_seconds": round(load, 2),
            "load_images_per_s": round(len(data) / max(load, 1e-9), 1), "peak_rss_mb": _peak_rss_mb(), **_rss_now_mb()}


def stage_memory_full(args) -> dict:
    _cap_memory(args)
    t0 = time.perf_counter()
    try:
        data = get_dataset("folder", args.workdir / "images", "train", image_size=args.image_size)
    except (MemoryError, RuntimeError, ValueError) as e:  # numpy, torch or a decoder failing to allocate
        return {"ran_out_of_memory": isinstance(e, MemoryError) or "memory" in str(e).lower(),
                "error": f"{type(e).__name__}: {str(e)[:200]}", "seconds": round(time.perf_counter() - t0, 1),
                "peak_rss_mb": _peak_rss_mb()}
    return {"ran_out_of_memory": False, "train_images": len(data), "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": _peak_rss_mb()}


# ------------------------------------------------------------------------------------ measuring
def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _rss_now_mb() -> dict:
    """This process's resident memory now: anonymous (heap, tensors) and file pages (mapped shards, libraries)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        for key, name in (("RssAnon:", "rss_anon_mb"), ("RssFile:", "rss_file_mb")):
            if line.startswith(key):
                out[name] = round(int(line.split()[1]) / 1024, 1)
    return out


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())


def _group_rss_bytes(group: int) -> int:
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != group:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        total += next((int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
    return total


def run_stage(name: str, argv: list[str]) -> dict:
    """Run one stage in its own process (and process group); its JSON, with the peak of the RSS
    summed over the group."""
    proc = subprocess.Popen([sys.executable, __file__, "--stage", name, *argv], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(SAMPLE_INTERVAL_S):
            peak[0] = max(peak[0], _group_rss_bytes(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed with status {proc.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    return {**result, "wall_seconds": round(time.perf_counter() - t0, 1), "peak_group_rss_mb": round(peak[0] / MB, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400_000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--source-size", type=int, help="side of the generated JPEGs (default: 1.25 x --image-size)")
    p.add_argument("--fit-images", type=int, default=10_000, help="images of the in-memory comparison")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cap-mb", type=int, default=1024, help="RLIMIT_DATA of the training processes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--flow-steps", type=int, default=4, help="flow steps per level of the small Glow")
    p.add_argument("--hidden", type=int, default=64, help="coupling width of the small Glow")
    p.add_argument("--workdir", type=Path, help="where images and the prepared set go (default: a temporary "
                                                "directory, removed afterwards)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.source_size = args.source_size or round(1.25 * args.image_size)
    if args.stage:  # one stage, in a process of its own
        stage = {"generate": stage_generate, "prepare": stage_prepare, "train-prepared": stage_train_prepared,
                 "train-memory": stage_train_memory, "memory-full": stage_memory_full}[args.stage]
        print(json.dumps(stage(args)))
        return
    temporary = args.workdir is None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="glowflow-data-scale-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    argv = [f"--{name}={getattr(args, name.replace('-', '_'))}" for name in STAGE_SETTINGS]
    try:
        results = {name: run_stage(name, argv) for name in STAGES}
    finally:
        if temporary:
            shutil.rmtree(args.workdir, ignore_errors=True)
    set_bytes = results["prepare"]["summary"]["train"] * 3 * args.image_size ** 2
    report = {
        "benchmark": "data_scale", "glowflow": glowflow.__version__, "torch": torch.__version__,
        "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "stage"},
        "train_set_bytes": set_bytes, "cap_bytes": args.cap_mb * MB,
        "train_set_over_cap": round(set_bytes / (args.cap_mb * MB), 2),
        "prepare_images_per_s": results["prepare"]["summary"]["images_per_s"],
        "stages": results,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
