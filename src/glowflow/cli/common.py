"""What every command shares: the checkpoint argument, the dataset arguments, loading a model on
the asked device, reading a run's training settings, argument types, and printing the result.

Conventions, one meaning per flag in every command (tests/test_cli_conventions.py checks them over
the whole parser): the checkpoint (a run directory, a checkpoint directory or a model's name) is the
first positional argument of every command that uses a model, which also takes ``--device``; a
dataset is ``--dataset NAME --data DIR``; ``--out`` is what the command writes (a file or a
directory, never an input); ``--n`` is how many images a command makes; ``--limit N`` reads only
the first N images of each set (``--spread``: N evenly spaced through it, where offered);
``--seed`` is a seed, ``--batch-size`` images per forward pass, ``--no-progress`` silences the
progress of long work; every command takes ``--json`` (its last stdout line is then one JSON
object). Every flag has a help line and shows its default; an old spelling keeps working for a
while, hidden from the help, with a one-line deprecation warning.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from .. import checkpoint as ckpt
from .. import pretrained
from .. import io
from ..data import DATASET_NAMES
from ..distributed import resolve_device
from ..model import Glow
from ..rundir import TRAIN_CONFIG

# What a checkpoint argument takes, said once for every command (checkpoint.resolve_model_dir).
CHECKPOINT_HELP = ("a run directory, a checkpoint directory (config.json + model.safetensors), the name of a model "
                   "`glowflow models` lists, or a Hugging Face Hub id (org/name)")

# Images one command may put into one picture without --allow-large: bounds its time and memory.
MAX_IMAGES = 4096

# argparse takes "-1,-0.5,0" for an option flag; this lets such number lists through as values.
_NUMBER_LIST = re.compile(r"^-\.?\d")


def emit(args, result: dict) -> None:
    """Print a command's result: readable lines, then (with --json) one JSON line last."""
    if getattr(args, "json", False):
        print(io.json_text(result))
        return
    for k, v in result.items():
        print(f"{k}: {v}")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def deprecated(old: str, new: str) -> None:
    warn(f"{old} is deprecated and will be removed; use {new}")


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (text == argparse.SUPPRESS or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            default = ",".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's ``dest``, says so on stderr, and is
    hidden from the help. ``add_deprecated(p, "--csv", "--out", dest="out", type=Path)``."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        deprecated(f"{parser.prog.split()[-1]} {option_string}", self.new)
        setattr(namespace, self.dest, values)


def add_deprecated(p, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept ``old`` as a hidden, warned spelling of ``new`` (same ``dest``)."""
    p.add_argument(old, action=DeprecatedAlias, new=new, dest=dest, default=argparse.SUPPRESS, **kwargs)


# ----------------------------------------------------------------------------------- arg types
def _comma_list(text: str, convert, valid, expected: str) -> list:
    """``text`` split at commas, each item converted; ArgumentTypeError("expected <expected>")
    when empty, unconvertible or not ``valid``."""
    try:
        values = [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(valid(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    """An argparse type: ``"-1,-0.5,0,0.5,1"`` -> ``[-1.0, -0.5, 0.0, 0.5, 1.0]`` (finite, non-empty)."""
    return _comma_list(text, float, math.isfinite, "comma-separated numbers like -1,-0.5,0,0.5,1")


def int_list(text: str) -> list[int]:
    """An argparse type: ``"1,5"`` -> ``[1, 5]`` (positive integers)."""
    return _comma_list(text, int, lambda v: v >= 1, "comma-separated positive integers like 1,5")


def int_between(low: int, high: int | None, what: str):
    """An argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


def float_between(low: float, high: float, what: str, open_low: bool = False):
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if open_low else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = int_between(1, None, "a positive integer")
seed = int_between(0, 2**32 - 1, "a seed 0..4294967295")
# nearest-neighbour enlargement of a picture: past this a 28x28 grid of 64 is already 100 megapixels
MAX_SCALE = 32
port = int_between(0, 65535, "a port number 0..65535 (0: any free port)")


def allow_negative_number_lists(parser: argparse.ArgumentParser) -> None:
    parser._negative_number_matcher = _NUMBER_LIST  # noqa: SLF001 (see _NUMBER_LIST)


# ----------------------------------------------------------------------------------- arguments
def add_allow_large(p) -> None:
    p.add_argument("--allow-large", action="store_true", help=f"allow more than {MAX_IMAGES} images in one picture")


def check_count(args, count: int, what: str) -> None:
    """Refuse a picture of more than MAX_IMAGES images unless --allow-large."""
    if count > MAX_IMAGES and not getattr(args, "allow_large", False):
        raise ValueError(f"{what}: {count} images is more than the {MAX_IMAGES} one picture takes by default "
                         "(time and memory grow with it); pass --allow-large to make it anyway")


def add_picture_output(p, default: Path | None = None, what: str = "the PNG grid to this file") -> None:
    """The options of a command that writes a picture: ``--scale``, ``--out``, ``--allow-large``, ``--json``."""
    p.add_argument("--scale", type=int_between(1, MAX_SCALE, f"an integer 1..{MAX_SCALE}"), default=1,
                   help=f"enlarge each image this many times, at most {MAX_SCALE} (nearest neighbour, so small "
                        "images stay crisp)")
    add_out(p, what, default=default, required=default is None)
    add_allow_large(p)
    add_json(p)


def add_json(p) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def add_out(p, what: str, default: Path | None = None, required: bool = False) -> None:
    """``--out``: what the command writes. ``what`` completes "write ..." (e.g. "the PNG grid to
    this file")."""
    p.add_argument("--out", type=Path, default=default, required=required, help=f"write {what}")


def add_n(p, what: str, default: int | None = None, low: int = 1) -> None:
    """``--n``: how many images the command makes."""
    kind = positive_int if low == 1 else int_between(low, None, f"an integer >= {low}")
    p.add_argument("--n", type=kind, default=default, help=f"how many images to make: {what}")


def add_limit(p, what: str = "images", spread: bool = False) -> None:
    """``--limit N``: read only the first N images (of each set); with ``spread``, also ``--spread``."""
    p.add_argument("--limit", type=positive_int, metavar="N", help=f"use only the first N {what}")
    if spread:
        p.add_argument("--spread", action="store_true",
                       help="with --limit: take the N images evenly spaced through each set instead of the first N "
                            "(sets listed class by class, such as mnist-5k)")


def add_seed(p, what: str, default: int | None = 0) -> None:
    p.add_argument("--seed", type=seed, default=default, help=f"seed of {what}")


def add_batch_size(p, default: int | None, what: str = "images per forward pass (bounds memory)") -> None:
    p.add_argument("--batch-size", type=positive_int, default=default, help=what)


def add_no_progress(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="show no progress bar or progress lines")


def add_device(p, default: str | None = "auto", what: str = "") -> None:
    p.add_argument("--device", default=default, help="where the model runs: auto (a GPU where there is one), cpu, "
                                                     "cuda, cuda:1, mps" + what)


def add_checkpoint(p, *more: str, device: bool = True) -> None:
    """The checkpoint as the first positional argument, then ``more`` positionals. The old
    ``--checkpoint/-c`` spelling is accepted with a warning (:func:`resolve_positionals`)."""
    if more:
        names = " ".join(("CHECKPOINT", *more))
        p.usage = f"{p.prog} {names} [options]"
        p.add_argument("positionals", nargs="+", metavar=names,
                       help=f"the checkpoint ({CHECKPOINT_HELP}), then {' '.join(more)}")
        p.add_argument("--checkpoint", "-c", dest="checkpoint_option", type=Path, help=argparse.SUPPRESS)
        p.set_defaults(_positionals=more)
    else:
        p.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    if device:
        add_device(p)


def resolve_positionals(args) -> None:
    """Fill ``args.checkpoint`` and the named positionals from ``args.positionals``."""
    names = getattr(args, "_positionals", None)
    if not names:
        return
    values = [Path(v) for v in args.positionals]
    if args.checkpoint_option is not None:
        deprecated("--checkpoint/-c", f"the checkpoint as the first argument: glowflow {args.command} "
                                      f"CHECKPOINT {' '.join(names)}")
        values = [args.checkpoint_option, *values]
    variadic = names[-1].endswith("...")  # "IMAGE...": one or more, as a list in args.images
    if len(values) < len(names) + 1 or (not variadic and len(values) != len(names) + 1):
        counted = f"{len(names) + 1} or more" if variadic else f"{len(names) + 1}"
        raise ValueError(f"expected CHECKPOINT {' '.join(names)} ({counted} paths), got {len(values)}")
    args.checkpoint = values[0]
    for name, value in zip(names[:-1], values[1:]):
        setattr(args, name.lower(), value)
    last = names[-1]
    if variadic:
        setattr(args, last[:-3].lower() + "s", values[len(names):])
    else:
        setattr(args, last.lower(), values[-1])


def add_dataset(p, required: bool = False, default_help: str = "") -> None:
    """``--dataset NAME --data DIR``, spelled the same by every command."""
    p.add_argument("--dataset", required=required, help=f"dataset name: {', '.join(DATASET_NAMES)}" + default_help)
    p.add_argument("--data", help="dataset root directory (default: the dataset's usual place" +
                                  (", or the one used for training)" if default_help else ")"))


# ----------------------------------------------------------------------------------- models
def load_model(args, memory: str = "none") -> Glow:
    """The command's checkpoint, on the command's ``--device``."""
    device = resolve_device(getattr(args, "device", "auto") or "auto")
    return Glow.from_pretrained(args.checkpoint, map_location=device, memory=memory)


def train_settings(checkpoint) -> dict:
    """The training config saved beside a checkpoint (its dataset, seed, ...; a Hub repo's too), or
    {}; for a model glowflow ships, its dataset."""
    shipped = pretrained.list_models().get(str(checkpoint)) if pretrained.is_model_name(checkpoint) else None
    if shipped is not None:
        return {"dataset": shipped["dataset"]}
    try:
        settings = ckpt.read_json(ckpt.resolve_model_dir(checkpoint) / TRAIN_CONFIG)
    except ckpt.CheckpointError:
        return {}
    return settings if isinstance(settings, dict) else {}


def dataset_of(args, saved: dict | None = None) -> tuple[str | None, str | None]:
    """``(name, root)`` from ``--dataset/--data``, else from the run's training config."""
    saved = train_settings(args.checkpoint) if saved is None else saved
    name = args.dataset or saved.get("dataset")
    root = args.data or (saved.get("data") if name == saved.get("dataset") else None)
    return name, root
