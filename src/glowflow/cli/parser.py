"""The ``glowflow`` command's parser: one sub-command per verb, registered by its group's module."""
from __future__ import annotations

import argparse

from .. import __version__
from . import ablate, data, demo, edit, generate, models, prepare, restore, score, train
from .common import HelpFormatter

__all__ = ["build_parser", "COMMAND_GROUPS"]

COMMAND_GROUPS = (train, generate, edit, restore, demo, ablate, data, score, prepare, models)

DESCRIPTION = """Glow (Kingma & Dhariwal, 2018): train a flow on images, read its exact likelihood,
sample it and edit images through its latent space. With --json the last stdout line of every
command is a JSON object."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glowflow", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"glowflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    for command in sub.choices.values():  # every flag shows its default
        command.formatter_class = HelpFormatter
    return parser
