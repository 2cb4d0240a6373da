"""The trained models glowflow ships: found by name everywhere a checkpoint is taken, checked
against their registry entry, and as good as the entry says."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from glowflow import Glow, pretrained
from glowflow.checkpoint import CheckpointError, resolve_checkpoint_dir, resolve_model_dir
from glowflow.cli import main
from glowflow.train import dataset_bits_per_dim, load_split

MODELS = pretrained.list_models()
DATA = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist"), "orl-faces": Path("data/orl-faces")}


def test_at_least_one_model_ships_and_the_package_stays_small():
    assert MODELS, "no trained model in src/glowflow/weights (make pretrained)"
    size = sum(f.stat().st_size for f in pretrained.WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size < 14e6  # the wheel stays under 15 MB


@pytest.mark.parametrize("name", MODELS)
def test_each_entry_is_complete_and_its_files_are_the_ones_it_names(name):
    entry = MODELS[name]
    assert set(pretrained.ENTRY_FIELDS) <= set(entry), set(pretrained.ENTRY_FIELDS) - set(entry)
    folder = pretrained.model_dir(name)
    assert resolve_model_dir(name) == folder
    model = Glow.from_pretrained(name)
    assert list(model.config.image_shape) == entry["image_shape"] and model.config.n_bits == entry["n_bits"]
    assert sum(t.numel() for t in model.parameters()) == entry["parameters"]
    x = torch.rand(2, *model.config.image_shape, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model.bits_per_dim(x)).all()
    assert (folder / "directions.safetensors").is_file() == entry["directions"]


@pytest.mark.parametrize("name", MODELS)
def test_each_model_scores_its_test_set_as_its_entry_says(name):
    entry = MODELS[name]
    root = DATA.get(entry["dataset"])
    if root is None or not root.exists():
        pytest.skip(f"{entry['dataset']} is not on this machine ({root})")
    model = Glow.from_pretrained(name)
    test = load_split(entry["dataset"], root, "test", model.config.image_shape)
    res = dataset_bits_per_dim(model, test.head(min(500, len(test))), seed=0)
    assert abs(res["bits_per_dim"] - entry["test_bits_per_dim"]) <= 3 * res["bits_per_dim_se"], res


def test_a_model_whose_weights_changed_is_refused(tmp_path):
    name = next(iter(MODELS))
    weights = tmp_path / "weights"
    shutil.copytree(pretrained.WEIGHTS_DIR, weights)
    assert pretrained.model_dir(name, weights) == weights / name
    blob = bytearray((weights / name / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (weights / name / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(pretrained.PretrainedError, match="not the file the registry names"):
        pretrained.model_dir(name, weights)


def test_an_unknown_name_lists_the_known_ones_and_a_missing_path_stays_a_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="the models are: " + next(iter(MODELS))):
        Glow.from_pretrained("no-such-model")
    with pytest.raises(CheckpointError, match="does not exist"):
        Glow.from_pretrained(tmp_path / "no-such-run")


def test_the_command_line_lists_the_models_and_takes_a_name_as_the_checkpoint(tmp_path, capsys):
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"]
    assert listed == MODELS
    name = next(iter(MODELS))
    assert main(["sample", name, "--n", "4", "--out", str(tmp_path / "s.png"), "--json"]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["sample", "no-such-model", "--n", "4", "--out", str(tmp_path / "t.png")]) == 2
    assert "the models are:" in capsys.readouterr().err


def test_a_named_model_brings_its_dataset_to_the_commands_that_read_one(tmp_path, capsys):
    from glowflow.cli.common import train_settings
    for name, entry in MODELS.items():
        assert train_settings(name) == {"dataset": entry["dataset"]}
    assert train_settings(tmp_path / "no-such-run") == {}


def test_a_run_directory_named_like_a_shipped_model_is_a_directory_not_the_model(tmp_path, monkeypatch):
    from glowflow import rundir
    monkeypatch.chdir(tmp_path)
    name = next(iter(MODELS))
    assert rundir.existing_run(Path(name)) is None  # `glowflow train --out fashion-mnist` starts a run there
    rundir.check_run_dir(name)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(name)


def test_directions_of_a_model_read_by_name_go_to_a_folder_the_user_names(capsys):
    name = next(iter(MODELS))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (pretrained.WEIGHTS_DIR / name).iterdir())
    assert main(["directions", name, "--dataset", "fashion-mnist"]) == 2
    assert "pass --out DIR" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (pretrained.WEIGHTS_DIR / name).iterdir()) == before
