"""Training steps with glowflow's CPU fast paths on, against the same steps with one of them off
(``--path NAME``, a name of ``glowflow.fast.PATHS``) or with all of them off (``--path all``: the
layers as written); prints JSON.

At each configuration one model trains (forward, backward and fused Adam on random 8-bit batches);
its steps alternate between the two ways (ABBA order), so a change in the machine's speed hits both
alike. Reported per configuration: the median step time of each way, their ratio, and the median
of the per-pair ratios (the estimate least hurt by drift). The paths are switched with
``glowflow.fast.using``, the switch the library documents.

    python benchmarks/fast_paths.py --path one_node_steps     # the configurations below, about 5 minutes
    python benchmarks/fast_paths.py --path all --iters 40 --threads 1

The configurations are the six of ``benchmarks/compare_normflows.py --grid`` and the architectures
of the two Fashion-MNIST presets (``make run``'s and the hour-long one).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import torch

from glowflow import Glow, GlowConfig, fast

# image shape, levels, K (one per level, or one for all), width, batch
CONFIGS = (
    ((1, 28, 28), 2, (16, 8), 64, 16),   # make run's preset (fashion-mnist-cpu)
    ((1, 28, 28), 2, 16, 128, 16),       # the hour preset (fashion-mnist-cpu-long)
    ((1, 28, 28), 2, 8, 128, 32),        # compare_normflows.py --grid, from here on
    ((1, 28, 28), 2, 8, 64, 16),
    ((1, 28, 28), 2, 32, 64, 16),
    ((1, 28, 28), 2, 32, 128, 64),
    ((3, 32, 32), 3, 8, 128, 64),
    ((3, 32, 32), 3, 32, 64, 16),
)


PATHS = ("all", *fast.PATHS)


def _off(path: str):
    """A block in which fast path ``path`` (or every one, ``"all"``) is off."""
    return fast.reference() if path == "all" else fast.using(**{path: False})


def time_config(shape, levels, steps, width, batch, iters: int, warmup: int, seed: int = 0,
                path: str = "all") -> dict:
    config = GlowConfig(image_shape=shape, levels=levels, steps=list(steps) if isinstance(steps, tuple) else steps,
                        hidden_channels=width, coupling="affine", permutation="invconv_lu", seed=seed)
    model = Glow(config=config)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 256, (batch, *shape), generator=gen) / 255.0 for _ in range(4)]
    model.initialize(batches[0], generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def step(x: torch.Tensor, on: bool) -> float:
        with contextlib.nullcontext() if on else _off(path):
            start = time.perf_counter()
            loss = model(x, generator=gen).bits_per_dim.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - start

    times = {True: [], False: []}
    for it in range(warmup + iters):
        for on in ((True, False) if it % 2 == 0 else (False, True)):
            dt = step(batches[it % len(batches)], on)
            if it >= warmup:
                times[on].append(dt)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"image_shape": list(shape), "levels": levels, "steps": list(steps) if isinstance(steps, tuple) else steps,
            "hidden_channels": width, "batch_size": batch,
            "step_ms_on": round(1e3 * on, 2), "step_ms_off": round(1e3 * off, 2),
            "speedup": round(off / on, 3),
            "speedup_paired_median": round(statistics.median(b / a for a, b in zip(times[True], times[False])), 3),
            "iters": iters, "warmup": warmup}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", choices=PATHS, required=True, help="the fast path to time on and off")
    p.add_argument("--iters", type=int, default=20, help="timed steps of each way per configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="the first two configurations only, 4 steps (a smoke test)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs, iters, warmup = (CONFIGS[:2], 4, 1) if args.quick else (CONFIGS, args.iters, args.warmup)
    load_before = round(os.getloadavg()[0], 2)
    rows = [time_config(*c, iters=iters, warmup=warmup, path=args.path) for c in configs]
    what = "all fast paths" if args.path == "all" else f"fast path {args.path}"
    result = {"benchmark": f"training steps with {what} on against off", "path": args.path,
              "configs": rows, "min_speedup": min(r["speedup"] for r in rows),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(),
              "load_average_1min_before": load_before, "load_average_1min_after": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
