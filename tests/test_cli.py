"""One command line: the checkpoint first, ``--dataset NAME --data DIR``, ``--json`` everywhere,
``--device`` honoured, old spellings accepted with a warning, bad input one line and exit 2."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from glowflow import Glow, latent
from glowflow.cli import build_parser, main
from glowflow.cli import ablate as cli_ablate
from glowflow.images import save_grid

MODEL_COMMANDS = ("eval", "sample", "encode", "decode", "interpolate", "directions", "manipulate", "demo")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_takes_json_and_model_commands_take_the_checkpoint_first_and_a_device():
    subs = _subparsers()
    assert set(MODEL_COMMANDS) <= set(subs)
    for name, p in subs.items():
        options = {o for a in p._actions for o in a.option_strings}
        assert "--json" in options, name
        if name in MODEL_COMMANDS:
            first = next(a for a in p._actions if not a.option_strings)
            assert first.dest in ("checkpoint", "positionals") and "--device" in options, name
    for name in ("train", "eval", "ablate", "directions", "demo"):
        options = {o for a in subs[name]._actions for o in a.option_strings}
        assert {"--dataset", "--data"} <= options, name


@pytest.fixture
def run_dir(tmp_path):
    model = Glow(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4)
    x = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 255.0
    model.initialize(x)
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    for i in range(2):
        save_grid(x[i:i + 1], tmp_path / f"{i}.png", padding=0)
    attributes = latent.Directions(("odd",), torch.randn(1, 64), (3,), (3,), ("test",))
    latent.save_directions(attributes, tmp_path / "run")
    return tmp_path


def test_edit_commands_take_the_checkpoint_first(run_dir, capsys):
    run = run_dir / "run"
    assert main(["interpolate", str(run), str(run_dir / "0.png"), str(run_dir / "1.png"), "--steps", "3",
                 "--out", str(run_dir / "i.png"), "--scale", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 3
    assert main(["manipulate", str(run), str(run_dir / "0.png"), "--attribute", "odd", "--alphas", "-1,0,1",
                 "--out", str(run_dir / "m.png")]) == 0
    captured = capsys.readouterr()
    assert "deprecated" not in captured.err


def test_old_checkpoint_option_still_works_with_a_warning(run_dir, capsys):
    run = run_dir / "run"
    assert main(["manipulate", str(run_dir / "0.png"), "-c", str(run), "--attribute", "odd",
                 "--out", str(run_dir / "m.png")]) == 0
    assert "--checkpoint/-c is deprecated" in capsys.readouterr().err
    assert main(["interpolate", str(run_dir / "0.png"), "--checkpoint", str(run), "--out", str(run_dir / "i.png")]) == 2
    assert "expected CHECKPOINT IMAGE_A IMAGE_B (3 paths), got 2" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["interpolate", "{run}", "{a}", "{b}", "--out", "{out}"],
    ["manipulate", "{run}", "{a}", "--attribute", "odd", "--out", "{out}"],
    ["sample", "{run}", "--out", "{out}"],
    ["eval", "{run}", "--dataset", "mnist"],
])
def test_device_is_honoured_by_every_model_command(run_dir, capsys, command):
    argv = [c.format(run=run_dir / "run", a=run_dir / "0.png", b=run_dir / "1.png", out=run_dir / "o.png")
            for c in command]
    assert main(argv + ["--device", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'bogus'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ablate_old_dataset_spelling_is_resolved_with_a_warning(capsys, tmp_path):
    parse = build_parser().parse_args
    assert cli_ablate._dataset_and_root(parse(["ablate", "--dataset", "mnist", "--data", str(tmp_path)])) == \
        ("mnist", str(tmp_path))
    assert capsys.readouterr().err == ""
    assert cli_ablate._dataset_and_root(parse(["ablate", "--data", "mnist", "--root", "/x"])) == ("mnist", "/x")
    assert "--dataset NAME --data DIR" in capsys.readouterr().err
    assert cli_ablate._dataset_and_root(parse(["ablate", "--data", "fashion-mnist"])) == ("fashion-mnist", None)
    assert "deprecated" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["eval", "RUN", "--limit", "0"], "expected a positive integer"),
    (["eval", "RUN", "--batch-size", "0"], "expected a positive integer"),
    (["demo", "RUN", "--port", "70000"], "expected a port number 0..65535"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
