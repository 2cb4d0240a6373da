"""The ``glowflow`` command line: ``main`` parses, runs one command, and turns bad input into one
line on stderr and exit status 2 (no traceback)."""
from __future__ import annotations

import sys
import warnings

from ..checkpoint import CheckpointError
from ..io import LockedError
from ..train import TrainingDiverged
from .parser import build_parser

__all__ = ["main", "build_parser"]


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `glowflow`: what it can do, not a usage error
        parser.print_help()
        return 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_in_one_line
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, CheckpointError, LockedError) as e:  # bad input: say what, no traceback
        print(f"glowflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"glowflow {args.command}: error: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # a write that failed: disk full, permissions, a path that is a file
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"glowflow {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"glowflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
