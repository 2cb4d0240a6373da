"""``glowflow prepare``: convert a dataset once into memory-mapped shards at the model's resolution.

  glowflow prepare --dataset folder --data lsun/bedroom --image-size 64 --out prepared/lsun-bedroom-64
  glowflow prepare --dataset imagenet64 --data imagenet64 --out prepared/imagenet64
  glowflow train --preset lsun-64-paper --data prepared/lsun-bedroom-64 --out runs/lsun

Running the same command again resumes an interrupted preparation, or says the set is there.
"""
from __future__ import annotations

import sys

from ..data.folder import DEFAULT_TEST_FRACTION
from ..data.prepare import DEFAULT_SHARD_BYTES, prepare
from .common import add_dataset, add_json, add_no_progress, add_out, emit, int_between, positive_int


def cmd_prepare(args) -> int:
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must lie in (0, 1), got {args.test_fraction}")
    summary = prepare(args.dataset, args.data, args.out, image_size=args.image_size, channels=args.channels,
                      shard_size=args.shard_size, workers=args.workers, test_fraction=args.test_fraction,
                      overwrite=args.overwrite, verify=args.verify, progress=not args.no_progress,
                      log=lambda message: print(message, file=sys.stderr))
    emit(args, summary)
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help="convert a dataset once into memory-mapped shards (datasets larger "
                                       "than memory; decoded in parallel; resumable)")
    add_dataset(p, required=True)
    p.add_argument("--image-size", type=int_between(1, 4096, "an image side 1..4096"),
                   help="side S of the prepared S x S images, at most 4096 (a folder needs it; default: the "
                        "dataset's own)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB); default: the dataset's "
                                                              "own, 3 for a folder")
    add_out(p, "the prepared set into this directory (created if missing)", required=True)
    p.add_argument("--workers", type=int_between(0, None, "a number of processes >= 0"),
                   help="processes decoding a folder's images (default: one per CPU; 0: this process)")
    p.add_argument("--shard-size", type=positive_int,
                   help=f"images per shard file (default: {DEFAULT_SHARD_BYTES // 2**20} MiB of them)")
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="for a folder without train/ and test/: the share of images hashed to test "
                        f"(default {DEFAULT_TEST_FRACTION})")
    p.add_argument("--overwrite", action="store_true", help="start over: replace the set (or the interrupted "
                                                            "preparation) in --out")
    p.add_argument("--verify", action="store_true", help="with a set already prepared: re-check its checksums")
    add_no_progress(p)
    add_json(p)
    p.set_defaults(func=cmd_prepare)
