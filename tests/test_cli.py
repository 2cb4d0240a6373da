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
    assert main(["interpolate", str(run), str(run_dir / "0.png"), str(run_dir / "1.png"), "--n", "3",
                 "--out", str(run_dir / "i.png"), "--scale", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 3
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
    (["sample", "RUN", "--out", "s.png", "--scale", "1000"], "expected an integer 1..32"),
    (["sample", "RUN", "--out", "s.png", "--seed", "99999999999999999999"], "expected a seed 0..4294967295"),
    (["score", "RUN", "noise", "--seed", "-1"], "expected a seed 0..4294967295"),
    (["train", "--out", "r", "--seed", "18446744073709551616"], "expected a seed 0..4294967295"),
    (["demo", "RUN", "--max-upload-mb", "1e9"], "expected a size in MB above 0 and at most 64"),
    (["demo", "RUN", "--max-upload-mb", "0"], "expected a size in MB above 0 and at most 64"),
    (["demo", "RUN", "--max-upload-mb", "nan"], "expected a size in MB above 0 and at most 64"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------- one line, not a traceback
def _one_line_error(capsys, code, argv, message):
    assert main([str(a) for a in argv]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("glowflow "), lines
    assert all(line.startswith("warning: ") for line in lines[:-1]), lines  # warnings are one line too


def test_bad_settings_and_files_are_one_line(run_dir, capsys, tmp_path):
    run = run_dir / "run"
    _one_line_error(capsys, 2, ["train", "--out", tmp_path / "r", "--set", "model=3"], "model is a group of settings")
    (run / "checkpoint" / "checksums.json").write_text("[1, 2]")
    _one_line_error(capsys, 2, ["sample", run, "--out", tmp_path / "s.png"], "corrupt")
    (run / "checkpoint" / "checksums.json").unlink()
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    (run / "checkpoint" / "config.json").write_text(json.dumps({**config, "hidden_channels": True}))
    _one_line_error(capsys, 2, ["sample", run, "--out", tmp_path / "s.png"], "hidden_channels must be an integer")


@pytest.mark.parametrize("make,message", [
    (lambda p: __import__("numpy").save(p, __import__("numpy").zeros((0, 64))), "with N >= 1"),
    (lambda p: __import__("numpy").save(p, __import__("numpy").array(["a", "b"])), "expected real numbers"),
    (lambda p: __import__("numpy").savez(p.open("wb"), z=__import__("numpy").zeros((1, 64))), "is an .npz archive"),
    (lambda p: p.write_bytes(b"not numpy"), "not a readable .npy"),
])
def test_decode_of_arrays_that_are_not_latents_is_one_line(run_dir, capsys, make, message):
    path = run_dir / "z.npy"
    make(path)
    _one_line_error(capsys, 2, ["decode", run_dir / "run", path, "--out", run_dir / "d.png"], message)


def test_a_npy_header_declaring_terabytes_is_one_line_and_one_error_row(run_dir, capsys):
    import struct

    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (100000000000, 1000), }"
    header += " " * (118 - len(header)) + "\n"
    bomb = run_dir / "bomb.npy"
    bomb.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    _one_line_error(capsys, 2, ["decode", run_dir / "run", bomb, "--out", run_dir / "d.png"],
                    "header declares an array of shape [100000000000, 1000]")
    # score: the forged array is one error row, the good inputs beside it are still scored
    assert main(["score", str(run_dir / "run"), str(bomb), str(run_dir / "0.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    by_input = {r["input"]: r for r in result["inputs"]}
    assert by_input[str(bomb)]["errors"] == 1 and by_input[str(run_dir / "0.png")]["num_images"] == 1


def test_json_output_is_strict_null_not_nan(run_dir, capsys):
    """One image has no standard error: strict JSON says null (Python's json would write NaN)."""
    assert main(["score", str(run_dir / "run"), str(run_dir / "0.png"), "--json"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    result = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in {line}"))
    assert result["inputs"][0]["bits_per_dim_se"] is None


def test_encode_writes_exactly_out_atomically_and_keeps_the_old_file_on_a_full_disk(run_dir, capsys):
    import subprocess
    import sys
    import textwrap

    out = run_dir / "z.latents"  # no .npy: written under this name, as printed
    assert main(["encode", str(run_dir / "run"), str(run_dir / "0.png"), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == str(out)
    assert out.is_file() and not (run_dir / "z.latents.npy").exists()
    old = out.read_bytes()
    # a real file-size limit below the size of the new array: the write fails, the old file stays whole
    script = textwrap.dedent(f"""
        import resource, sys
        from glowflow.cli import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
        sys.exit(main(["encode", {str(run_dir / "run")!r}, {str(run_dir / "0.png")!r}, {str(run_dir / "1.png")!r},
                       "--out", {str(out)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "could not write" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == old
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".z.latents")]


def test_an_attribute_table_naming_files_outside_its_folder_is_refused(run_dir, capsys):
    secret = run_dir / "secret.png"
    save_grid(torch.rand(1, 1, 8, 8), secret, padding=0)
    images = run_dir / "images"
    images.mkdir()
    for i in range(2):
        save_grid(torch.rand(1, 1, 8, 8), images / f"{i}.png", padding=0)
    table = images / "labels.csv"
    table.write_text("file,odd\n0.png,1\n1.png,-1\n../secret.png,1\n")
    _one_line_error(capsys, 2, ["directions", run_dir / "run", "--attributes", table, "--replace"],
                    "name files outside")


def test_synthetic_sets_are_bounded_by_their_size(run_dir, capsys):
    assert main(["score", str(run_dir / "run"), "noise:100000000", "noise:3", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out.splitlines()[-1])["inputs"]
    assert rows[0]["errors"] == 1 and rows[0]["num_images"] == 0 and rows[1]["num_images"] == 3
    assert "GiB; at most 16,777,216 images of this model's size" in captured.err


def test_label_on_an_unconditional_model_and_unbounded_work_are_refused(run_dir, capsys):
    run = run_dir / "run"
    _one_line_error(capsys, 2, ["sample", run, "--label", "3", "--out", run_dir / "s.png"], "--label is for class-conditional")
    _one_line_error(capsys, 2, ["sample", run, "--n", "100000", "--out", run_dir / "s.png"], "--allow-large")
    _one_line_error(capsys, 2, ["interpolate", run, run_dir / "0.png", run_dir / "1.png", "--n", "100000",
                                "--out", run_dir / "i.png"], "--allow-large")


def test_large_sample_grids_are_made_in_batches(run_dir, monkeypatch):
    from glowflow.cli import generate

    sizes = []
    real = Glow.sample
    monkeypatch.setattr(Glow, "sample", lambda self, n, *a, **k: sizes.append(n) or real(self, n, *a, **k))
    monkeypatch.setattr(generate, "SAMPLE_BATCH", 16)
    assert main(["sample", str(run_dir / "run"), "--n", "40", "--out", str(run_dir / "s.png")]) == 0
    assert sizes == [16, 16, 8]


def test_a_failed_checkpoint_write_is_one_line(tmp_path):
    import subprocess
    import sys
    import textwrap
    # a real file-size limit: writes past 64 kB fail with EFBIG (Python ignores SIGXFSZ)
    script = textwrap.dedent(f"""
        import resource, sys, torch
        from glowflow import Glow
        from glowflow.cli import main
        model = Glow(image_shape=(1, 8, 8), levels=2, steps=4, hidden_channels=64)
        model.initialize(torch.rand(4, 1, 8, 8))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            model.save_pretrained({str(tmp_path / "ck")!r})
        except Exception as e:
            print(type(e).__name__, e, file=sys.stderr)
            sys.exit(5)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert proc.stderr.startswith("CheckpointError could not write") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ck").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ck")]
