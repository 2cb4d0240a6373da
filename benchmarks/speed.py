"""Speed of the CIFAR-10 Glow architecture: training throughput, sampling and encoding latency.

Prints one JSON object. The architecture is the paper's CIFAR-10 one (3x32x32, 3 levels, 32 steps
per level, affine coupling, 1x1 convolutions) at reduced width by default (``--hidden-channels 64``
instead of 512) so that it runs on a laptop CPU:

    python benchmarks/speed.py                      # about a minute on 2 idle cores
    python benchmarks/speed.py --hidden-channels 512 --steps 32 --iters 5

Inputs are random 8-bit images; speed does not depend on the pixel values. Every number is the
median of ``--repeats`` (or ``--iters``) timed runs after ``--warmup`` untimed ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from glowflow import Glow, GlowConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps", type=int, default=32, help="flow steps per level")
    p.add_argument("--hidden-channels", type=int, default=64)
    p.add_argument("--coupling", default="affine", choices=["affine", "additive", "mixture"])
    p.add_argument("--permutation", default="invconv", choices=["invconv", "invconv_lu", "shuffle", "reverse"])
    p.add_argument("--memory", default="none", choices=["none", "checkpoint", "invertible"])
    p.add_argument("--batch-size", type=int, default=16, help="training and encoding batch")
    p.add_argument("--iters", type=int, default=3, help="timed training iterations")
    p.add_argument("--sample-n", type=int, default=16, help="images per sampling batch")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of sampling and encoding")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch_size", "iters", "sample_n", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``, ``repeats`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = GlowConfig(image_shape=tuple(args.image_shape), levels=args.levels, steps=args.steps,
                        hidden_channels=args.hidden_channels, coupling=args.coupling,
                        permutation=args.permutation, seed=args.seed)
    model = Glow(config=config, memory=args.memory).to(device)
    generator = torch.Generator().manual_seed(args.seed)

    def images(n: int) -> torch.Tensor:
        k = torch.randint(0, 256, (n, *config.image_shape), generator=generator)
        return (k / 255.0).to(device)

    x = images(args.batch_size)
    model.initialize(x, generator=generator)

    # Training: forward (dequantise, encode, bits/dim) + backward, at a fixed batch.
    model.train()

    def train_step():
        model.zero_grad(set_to_none=True)
        model(x, generator=generator).bits_per_dim.mean().backward()

    train_times = _timed(train_step, device, args.warmup, args.iters)

    # Inference: eval mode, no autograd (1x1-conv inverses are cached, as in real use).
    model.eval()
    sample_gen = torch.Generator(device=device).manual_seed(args.seed)

    def sample():
        model.sample(args.sample_n, temperature=args.temperature, generator=sample_gen)

    def encode():
        with torch.no_grad():
            model.encode(x)

    sample_times = _timed(sample, device, args.warmup, args.repeats)
    encode_times = _timed(encode, device, args.warmup, args.repeats)

    train_median = statistics.median(train_times)
    result = {
        "benchmark": "glowflow speed",
        "train_images_per_s": round(args.batch_size / train_median, 2),
        "train_ms_per_batch": round(1e3 * train_median, 1),
        "train_measures": "forward (dequantise, encode, bits/dim) + backward, no optimiser step",
        "sample_ms_per_batch": round(1e3 * statistics.median(sample_times), 1),
        "sample_batch": args.sample_n,
        "sample_temperature": args.temperature,
        "encode_ms_per_batch": round(1e3 * statistics.median(encode_times), 1),
        "encode_batch": args.batch_size,
        "timing": f"median of {args.iters} train iterations and {args.repeats} sample/encode runs, "
                  f"after {args.warmup} warm-up run(s) each",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config": config.to_dict(),
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        # Other processes on the same cores slow every number down; this says how busy it was.
        "load_average_1min_before": load_before,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - wall_start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
