"""Training-step and sampling time of two checkouts of glowflow, interleaved: the speed of a
change measured against the code before it, on the same machine in the same minutes; prints JSON.

    git worktree add /tmp/before <commit>
    python benchmarks/before_after.py --before /tmp/before/src --after src

Each configuration (those of ``benchmarks/fast_paths.py``: the two Fashion-MNIST presets and the
six of ``compare_normflows.py --grid``) is timed by a fresh process per checkout, in ABBA order
over ``--rounds`` rounds, so that drift in the machine's speed hits both alike. A process builds
the model with the arguments both checkouts accept, initialises it, and times ``--iters``
training steps (forward, backward, fused Adam on random 8-bit batches) after ``--warmup``, and
``--iters`` sampling calls of 16 images. Reported per configuration: each checkout's median, and
the median over rounds of after / before (1.0: unchanged; below 1: faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_paths import CONFIGS  # noqa: E402

WORKER = r'''
import json, statistics, sys, time
import torch
from glowflow import Glow, GlowConfig
shape, levels, steps, width, batch, iters, warmup, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
config = GlowConfig(image_shape=tuple(shape), levels=levels, steps=steps, hidden_channels=width,
                    coupling="affine", permutation="invconv_lu", seed=0)
model = Glow(config=config)
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 256, (batch, *shape), generator=gen) / 255.0 for _ in range(4)]
model.initialize(batches[0], generator=gen)
opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
train = []
for it in range(warmup + iters):
    start = time.perf_counter()
    loss = model(batches[it % 4], generator=gen).bits_per_dim.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if it >= warmup:
        train.append(time.perf_counter() - start)
model.eval()
sample = []
for it in range(warmup + iters):
    start = time.perf_counter()
    model.sample(16, generator=gen)
    if it >= warmup:
        sample.append(time.perf_counter() - start)
print(json.dumps({"train": statistics.median(train), "sample": statistics.median(sample)}))
'''


def measure(src: str, config, iters: int, warmup: int, threads: int) -> dict:
    shape, levels, steps, width, batch = config
    args = json.dumps([list(shape), levels, list(steps) if isinstance(steps, tuple) else steps, width, batch,
                       iters, warmup, threads])
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    out = subprocess.run([sys.executable, "-c", WORKER, args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the src/ folder of the checkout before the change")
    p.add_argument("--after", required=True, help="the src/ folder of the checkout after it")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds per configuration")
    p.add_argument("--iters", type=int, default=10, help="timed training steps and sampling calls per process")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--config", type=int, action="append", help="time only configuration N (0-based, as listed in "
                   "the output; repeatable), e.g. to repeat one with more --rounds")
    p.add_argument("--quick", action="store_true", help="the first configuration, one round, 2 steps (a smoke test)")
    args = p.parse_args(argv)
    configs, rounds, iters, warmup = (CONFIGS[:1], 1, 2, 1) if args.quick else \
        (CONFIGS, args.rounds, args.iters, args.warmup)
    if args.config:
        configs = [CONFIGS[i] for i in args.config]
    rows = []
    for config in configs:
        runs = {"before": [], "after": []}
        for r in range(rounds):
            for which in (("before", "after") if r % 2 == 0 else ("after", "before")):
                runs[which].append(measure(getattr(args, which), config, iters, warmup, args.threads))
        row = {"image_shape": list(config[0]), "levels": config[1], "steps": config[2], "hidden_channels": config[3],
               "batch_size": config[4]}
        for kind in ("train", "sample"):
            before = [m[kind] for m in runs["before"]]
            after = [m[kind] for m in runs["after"]]
            row[f"{kind}_ms_before"] = round(1e3 * statistics.median(before), 2)
            row[f"{kind}_ms_after"] = round(1e3 * statistics.median(after), 2)
            row[f"{kind}_after_over_before"] = round(statistics.median(a / b for a, b in zip(after, before)), 3)
        rows.append(row)
    result = {"benchmark": "glowflow before and after a change: training step and sampling time", "configs": rows,
              "train_after_over_before_median": statistics.median(r["train_after_over_before"] for r in rows),
              "sample_after_over_before_median": statistics.median(r["sample_after_over_before"] for r in rows),
              "rounds": rounds, "iters": iters, "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "load_average_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
