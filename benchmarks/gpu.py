"""GPU speed of the CelebA-HQ 256x256 architecture: training images/s and the time to sample one image,
in float32 and bf16 autocast (fp16 on request); prints JSON.

The architecture is the paper's CelebA-HQ model (L=6, K=32, width 512, additive coupling, 1x1 convs,
5-bit images), with ``memory="invertible"`` as in the ``celeba-hq-256-paper`` preset. A training step
is what :class:`glowflow.train.Trainer` does: forward under autocast (the flow's main path, the
log-determinants and the objective stay float32), backward, Adam step (with a GradScaler for fp16).
Sampling is ``model.sample(1)`` in eval mode under the same autocast. Medians over ``--iters``; the
peak memory is that of the timed training steps (after the warm-up).

    python benchmarks/gpu.py                               # fp32 and bf16, batch 8, invertible
    python benchmarks/gpu.py --precisions fp32,bf16,fp16 --memory none --batch 4
    python benchmarks/gpu.py --compile --channels-last
    python benchmarks/gpu.py --tiny --allow-cpu            # a smoke test of this script, anywhere

Without CUDA (and without ``--allow-cpu``) it prints ``{"error": ...}`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import glowflow
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import glowflow
from glowflow.io import atomic_write_text
from glowflow.model import Glow, GlowConfig

CELEBA_HQ = dict(image_shape=(3, 256, 256), levels=6, steps=32, hidden_channels=512, coupling="additive",
                 permutation="invconv", n_bits=5)
TINY = dict(image_shape=(3, 32, 32), levels=2, steps=2, hidden_channels=16, coupling="additive",
            permutation="invconv", n_bits=5)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, iters: int, warmup: int) -> tuple[float, list[float]]:
    """Median seconds of ``fn`` over ``iters`` calls after ``warmup`` untimed ones. The peak-memory
    counter restarts after the warm-up: cuDNN's algorithm search (``cudnn.benchmark``) tries
    workspaces far larger than a step needs, which are not what a training run holds."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def build_model(arch: dict, memory: str, device: torch.device, batch: int, channels_last: bool) -> Glow:
    """The architecture after data-dependent init on one random batch (as training would start)."""
    model = Glow(config=GlowConfig(**arch), memory=memory).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (batch, *arch["image_shape"]), generator=g) / 255.0).to(device)
    with torch.no_grad():
        model(x, noise=torch.rand(x.shape, generator=g).to(device))
    return model


def bench_precision(args, arch: dict, precision: str, device: torch.device) -> dict:
    dtype = DTYPES[precision]
    if dtype is not None and device.type != "cuda":
        return {"precision": precision, "skipped": "autocast is benchmarked on CUDA only"}
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return {"precision": precision, "skipped": "this GPU does not support bf16"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model(arch, args.memory, device, args.batch, args.channels_last)
    train_model = torch.compile(model) if args.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 256, (args.batch, *arch["image_shape"]), generator=g) / 255.0).to(device)
    noise = torch.rand(x.shape, generator=g).to(device)
    losses = []

    def train_step():
        model.train()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = train_model(x, noise=noise)
        loss = out.bits_per_dim.float().mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach())

    row = {"precision": precision, "batch_size": args.batch}
    try:
        t, times = _median_time(train_step, device, args.iters, args.warmup)
        last = [float(v) for v in losses[-args.iters:]]
        row.update(train_step_s=round(t, 4), train_images_per_s=round(args.batch / t, 2),
                   train_step_times_s=[round(v, 4) for v in times],
                   bits_per_dim_last=round(last[-1], 4), loss_finite=all(math.isfinite(v) for v in last),
                   loss_dtype=str(losses[-1].dtype))
        if device.type == "cuda":
            row["train_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    except torch.cuda.OutOfMemoryError as e:
        row["train_error"] = f"out of memory at batch {args.batch}: {str(e).splitlines()[0]}"
    opt.zero_grad(set_to_none=True)
    del opt

    model.eval()
    gen = torch.Generator(device=device).manual_seed(0)

    def sample_one():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            img = model.sample(1, temperature=0.7, generator=gen)
        assert img.shape == (1, *arch["image_shape"]) and bool(torch.isfinite(img).all())

    try:
        t, times = _median_time(sample_one, device, args.iters, args.warmup)
        row.update(sample_one_image_ms=round(1000 * t, 2), sample_times_ms=[round(1000 * v, 2) for v in times])
    except torch.cuda.OutOfMemoryError as e:
        row["sample_error"] = f"out of memory: {str(e).splitlines()[0]}"
    del model, train_model
    return row


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    arch = TINY if args.tiny else CELEBA_HQ
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            torch.backends.cudnn.allow_tf32 = args.tf32
            torch.backends.cudnn.benchmark = True
        results = [bench_precision(args, arch, p, device) for p in args.precisions]
    finally:  # leave the process as it was (the tests import this script)
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags
    out = {
        "benchmark": "gpu",
        "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "architecture": {**{k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
                         "memory": args.memory, "name": "tiny" if args.tiny else "celeba-hq-256 (paper)"},
        "options": {"compile": args.compile, "channels_last": args.channels_last, "tf32": args.tf32,
                    "iters": args.iters, "warmup": args.warmup},
        "results": results,
    }
    by = {r["precision"]: r for r in results}
    if "train_step_s" in by.get("fp32", {}) and "train_step_s" in by.get("bf16", {}):
        out["bf16_train_speedup"] = round(by["fp32"]["train_step_s"] / by["bf16"]["train_step_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--memory", default="invertible", choices=["none", "checkpoint", "invertible"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convs in the fp32 run")
    p.add_argument("--tiny", action="store_true", help="a tiny architecture instead of CelebA-HQ (smoke test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU when CUDA is missing (smoke test only)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    bad = [s for s in args.precisions if s not in DTYPES]
    if bad:
        p.error(f"precisions must be among {list(DTYPES)}, got {bad}")
    wants_cuda = args.device == "auto" or args.device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available() and not (args.allow_cpu and args.device == "auto"):
        print(json.dumps({"benchmark": "gpu", "error": "CUDA is not available (torch.cuda.is_available() is False): "
                          "this benchmark measures GPU speed; run it on a machine with an NVIDIA GPU and a CUDA "
                          "build of torch, or pass --tiny --allow-cpu for a smoke test",
                          "torch": torch.__version__, "cuda": torch.version.cuda}))
        return 2
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
