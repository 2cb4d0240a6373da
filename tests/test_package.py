"""What a user meets before any model: the version, the licence, type information, the extras."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import glowflow
from glowflow.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_glowflow_version_prints_the_one_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"glowflow {glowflow.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", glowflow.__version__)
    # written once: pyproject reads it from the package
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion = " not in pyproject.split("[project.optional")[0]


def test_a_bare_glowflow_prints_its_commands_and_succeeds(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: glowflow" in out and "train" in out and "sample" in out


def test_the_package_ships_its_licence_and_type_information():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (Path(glowflow.__file__).parent / "py.typed").is_file()
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_the_extras_name_what_the_code_imports():
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {extra: {re.split(r"[<>=\[]", d)[0] for d in deps} for extra, deps in extras.items()}
    assert names["demo"] == {"fastapi", "uvicorn"}  # the server reads JSON bodies: no multipart parser
    assert names["tensorboard"] == {"tensorboard"}
    # `make test` (the test extra) runs examples/quickstart.ipynb, which the notebook extra runs in Jupyter
    assert {"ipykernel", "nbclient", "nbformat"} <= names["test"] & names["notebook"]
    assert names["hub"] == {"huggingface_hub"}  # glowflow.hub's one import, and the name its message gives
    assert set(extras) >= {"demo", "tensorboard", "notebook", "test", "bench", "hub", "all"}
    assert all(e in extras["all"][0] for e in ("demo", "tensorboard", "notebook", "test", "bench", "hub"))
