"""The command line's conventions, checked over the whole parser: every sub-command, every flag.
One flag, one meaning (``--out`` is what a command writes, ``--limit N`` the first N images, ``--n``
how many images a command makes, ``--seed`` a seed); every flag has help and shows its default; old
spellings still parse, hidden and warned."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from glowflow.cli import build_parser, main
from glowflow.cli.common import DeprecatedAlias

PARSER = build_parser()
COMMANDS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
FLAGS = [(name, action) for name, p in COMMANDS.items() for action in p._actions
         if action.option_strings and not isinstance(action, (argparse._HelpAction, DeprecatedAlias))
         and action.help != argparse.SUPPRESS]


def _help(command: str, action) -> str:
    formatter = COMMANDS[command]._get_formatter()
    return formatter._expand_help(action) if action.help else ""  # noqa: SLF001 (what --help prints)


def _flag(action) -> str:
    return action.option_strings[-1]


def test_the_parser_has_every_command():
    assert {"train", "eval", "sample", "encode", "decode", "interpolate", "directions", "manipulate", "demo",
            "ablate", "download", "score", "ood", "prepare", "models", "presets"} <= set(COMMANDS)


@pytest.mark.parametrize("command,action", FLAGS, ids=[f"{c} {_flag(a)}" for c, a in FLAGS])
def test_every_flag_has_help_and_shows_its_default(command, action):
    text = _help(command, action)
    assert len(text) > 10, f"glowflow {command} {_flag(action)} has no help"
    if action.default not in (None, False) and action.default is not argparse.SUPPRESS:
        assert "default" in text, f"glowflow {command} {_flag(action)} does not show its default {action.default!r}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_positional_has_help_or_is_an_old_spelling(command):
    for action in COMMANDS[command]._actions:
        if not action.option_strings:
            assert action.help, f"glowflow {command}: positional {action.dest} has no help"


# what a flag means, wherever it appears: a phrase its help starts with, and its type where one is fixed
MEANINGS = {
    "--out": ("write ", None),
    "--limit": ("use only the first N ", None),
    "--n": ("how many images to make", None),
    "--seed": ("seed of ", "a seed"),
    "--batch-size": (None, "a positive integer"),
    "--no-progress": ("show no progress", None),
    "--json": ("print the result as one JSON line last", None),
    "--device": ("where the model runs", None),
    "--spread": ("with --limit: take the N images evenly spaced", None),
}


@pytest.mark.parametrize("flag", MEANINGS)
def test_a_flag_means_one_thing_in_every_command(flag):
    start, type_name = MEANINGS[flag]
    uses = [(c, a) for c, a in FLAGS if flag in a.option_strings]
    assert uses, flag
    for command, action in uses:
        if start is not None:
            assert _help(command, action).startswith(start), (command, flag, action.help)
        if type_name is not None:
            assert getattr(action.type, "__name__", "").startswith(type_name), (command, flag, action.type)


RETIRED = ("--csv", "--report", "--num-test-images", "--test-limit", "--steps", "--seeds", "--root", "--checkpoint")


@pytest.mark.parametrize("flag", RETIRED)
def test_retired_spellings_are_hidden_from_every_help(flag):
    for name, p in COMMANDS.items():
        assert flag not in p.format_help(), (name, flag)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_where_a_flag_applies_the_command_has_it(command):
    p = COMMANDS[command]
    flags = {s for a in p._actions for s in a.option_strings}
    positional = {a.dest for a in p._actions if not a.option_strings}
    assert "--json" in flags
    if positional & {"checkpoint", "positionals"}:  # a command that loads a model chooses where it runs
        assert "--device" in flags, command
    reads_many = {"eval", "score", "ood", "directions"}
    if command in reads_many:
        assert {"--batch-size", "--limit", "--no-progress"} <= flags, command
    if command in {"train", "ablate", "prepare"}:
        assert "--no-progress" in flags, command


# the old spelling and the new one parse to the same thing
OLD_AND_NEW = [
    (["score", "RUN", "noise", "--csv", "s.csv"], ["score", "RUN", "noise", "--out", "s.csv"], "out"),
    (["interpolate", "RUN", "a.png", "b.png", "--steps", "5", "--out", "x.png"],
     ["interpolate", "RUN", "a.png", "b.png", "--n", "5", "--out", "x.png"], "n"),
    (["demo", "RUN", "--num-test-images", "3"], ["demo", "RUN", "--limit", "3"], "limit"),
    (["ablate", "--seeds", "2"], ["ablate", "--num-seeds", "2"], "num_seeds"),
    (["ablate", "--test-limit", "50"], ["ablate", "--limit", "50"], "limit"),
]


@pytest.mark.parametrize("old,new,dest", OLD_AND_NEW, ids=[o[0] + " " + o[-2] for o, _, _ in OLD_AND_NEW])
def test_old_spellings_still_work_with_a_warning(old, new, dest, capsys):
    assert getattr(PARSER.parse_args(old), dest) == getattr(PARSER.parse_args(new), dest)
    assert "deprecated" in capsys.readouterr().err


def test_help_of_every_command_prints(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "default" in capsys.readouterr().out or name in ("models", "presets")


def test_ood_takes_its_sets_as_ood_and_writes_to_out(capsys):
    from glowflow.cli.score import _ood_sets_and_report
    args = PARSER.parse_args(["ood", "RUN", "--in", "a", "--ood", "b", "--ood", "c", "--out", "rep"])
    assert _ood_sets_and_report(args) == (["b", "c"], Path("rep"))
    old = PARSER.parse_args(["ood", "RUN", "--in", "a", "--out", "b", "--out", "c", "--report", "rep"])
    assert _ood_sets_and_report(old) == (["b", "c"], Path("rep"))
    assert "ood --out SET is deprecated" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one report directory"):
        _ood_sets_and_report(PARSER.parse_args(["ood", "RUN", "--in", "a", "--ood", "b", "--out", "x", "--out", "y"]))
    with pytest.raises(ValueError, match="--ood SET"):
        _ood_sets_and_report(PARSER.parse_args(["ood", "RUN", "--in", "a"]))


def test_download_takes_dataset_and_the_old_positional(tmp_path, capsys):
    assert main(["download", "orl-faces", "--dataset", "orl-faces", "--data", str(tmp_path)]) == 2
    assert "give the dataset once" in capsys.readouterr().err
    assert main(["download"]) == 2
    assert "pass --dataset NAME" in capsys.readouterr().err
