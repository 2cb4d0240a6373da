"""The ``glowflow`` command: parse arguments, call the library, print. With ``--json`` the last
stdout line of every command is a JSON object."""
from __future__ import annotations

import argparse
import json
import math
import sys


def emit(args, result: dict) -> None:
    """Print a command's result: readable lines, then (with --json) one JSON line last."""
    for k, v in result.items():
        if not getattr(args, "json", False):
            print(f"{k}: {v}")
    if getattr(args, "json", False):
        print(json.dumps(result, sort_keys=True))


def float_list(text: str) -> list[float]:
    """An argparse type: ``"-1,-0.5,0,0.5,1"`` -> ``[-1.0, -0.5, 0.0, 0.5, 1.0]`` (finite, non-empty)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like -1,-0.5,0,0.5,1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glowflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules():
    from . import cli_edit, cli_train
    modules = [cli_train, cli_edit]
    try:
        from . import ablate
        modules.append(ablate)
    except ImportError:
        pass
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, no traceback
        print(f"glowflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"glowflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
