"""Hugging Face Hub ids (``org/name``) wherever a checkpoint is taken, read from the hub's cache,
and the model card that makes a checkpoint folder a Hub repo. Never touches the network: the cache
is built here in the layout huggingface_hub reads, and offline mode is on."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from glowflow import Glow, hub, io, pretrained, rundir
from glowflow import checkpoint as ckpt
from glowflow.cli import main
from glowflow.directions import DIRECTIONS_JSON, DIRECTIONS_WEIGHTS, Directions, load_directions, save_directions

from conftest import awake_glow

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_glow(seed: int = 0) -> Glow:
    g = torch.Generator().manual_seed(seed)
    return awake_glow(SHAPE, 0.25 + 0.5 * torch.rand(16, *SHAPE, generator=g), levels=2, steps=1, hidden_channels=8)


def same_weights(a: Glow, b: Glow) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline mode on, and any socket connection an error."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables once, at import, into its constants module, and reads
    # them from there on every call: the environment alone would come too late
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    # the client falls back to its cache when a connection fails, so a refusal alone would pass
    # unseen: each attempt is recorded, and the test fails after the fact if there was one
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in tests")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield cache
    assert not attempts, f"a test tried to reach the network: {attempts[:3]}"


def cache_repo(cache: Path, repo_id: str, folder: Path, revision: str = "main", commit: str = COMMIT) -> Path:
    """Put ``folder``'s files into ``cache`` as huggingface_hub lays a downloaded model repo out:
    ``models--org--name/blobs/<hash>`` holds the bytes, ``snapshots/<commit>/<path>`` links to them,
    and ``refs/<revision>`` holds the commit (no newline: the library reads it as is)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        blob = repo / "blobs" / io.file_sha256(f)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def test_a_hub_id_loads_from_the_cache_offline_the_same_weights_as_the_folder(tmp_path, hub_cache):
    model = tiny_glow()
    model.save_pretrained(tmp_path / "local")
    snapshot = cache_repo(hub_cache, "org/name", tmp_path / "local", revision="v1")
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    for source in ("org/name", "org/name@v1", f"org/name@{COMMIT}"):
        assert ckpt.resolve_model_dir(source) == snapshot
        loaded = Glow.from_pretrained(source)
        assert same_weights(loaded, model) and same_weights(loaded, Glow.from_pretrained(tmp_path / "local"))
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(Glow.from_pretrained("org/name").log_prob(x), model.log_prob(x))


def test_a_command_takes_a_hub_id_as_its_checkpoint(tmp_path, hub_cache):
    tiny_glow().save_pretrained(tmp_path / "local")
    cache_repo(hub_cache, "org/name", tmp_path / "local")
    assert main(["sample", "org/name", "--n", "4", "--seed", "3", "--out", str(tmp_path / "hub.png")]) == 0
    assert main(["sample", str(tmp_path / "local"), "--n", "4", "--seed", "3", "--out", str(tmp_path / "local.png")]) == 0
    assert (tmp_path / "hub.png").read_bytes() == (tmp_path / "local.png").read_bytes()


def test_a_run_directory_on_the_hub_brings_its_directions_and_training_settings(tmp_path, hub_cache):
    from glowflow.cli.common import train_settings
    run = tmp_path / "run"
    model = tiny_glow()
    model.save_pretrained(run / ckpt.CHECKPOINT_DIR)
    io.atomic_write_json(run / ckpt.CHECKPOINT_DIR / rundir.TRAIN_CONFIG, {"dataset": "fashion-mnist", "seed": 7})
    vectors = torch.randn(1, model.num_dims, generator=torch.Generator().manual_seed(2))
    save_directions(Directions(["bright"], vectors, [3], [4], ["test"]), run,
                    ckpt.weights_sha256(run / ckpt.CHECKPOINT_DIR))
    (run / "metrics.jsonl").write_text("{}\n")  # a run's other files are not fetched
    snapshot = cache_repo(hub_cache, "org/run", run)
    assert ckpt.resolve_model_dir("org/run") == snapshot / ckpt.CHECKPOINT_DIR
    assert same_weights(Glow.from_pretrained("org/run"), model)
    directions, _ = load_directions(checkpoint="org/run")
    assert directions.names == ("bright",) and torch.equal(directions.vectors, vectors)
    assert train_settings("org/run")["seed"] == 7


def test_the_files_fetched_are_the_ones_glowflow_reads():
    assert set(hub.HUB_FILES) == {
        *(f"{d}{f}" for d in ("", f"{ckpt.CHECKPOINT_DIR}/")
          for f in (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME, ckpt.CHECKSUMS_NAME, rundir.TRAIN_CONFIG)),
        DIRECTIONS_WEIGHTS, DIRECTIONS_JSON}
    assert rundir.TRAINER_STATE not in hub.HUB_FILES and rundir.RAW_WEIGHTS not in hub.HUB_FILES


def test_an_id_not_in_the_cache_offline_is_a_checkpoint_error_naming_it(tmp_path, hub_cache, capsys):
    said = rf"org/missing.*not in the local cache \({re.escape(str(hub_cache))}\) while HF_HUB_OFFLINE is set"
    with pytest.raises(ckpt.CheckpointError, match=said):
        Glow.from_pretrained("org/missing")
    assert main(["sample", "org/missing", "--n", "4", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "org/missing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("error, offline, said", [
    ("RepositoryNotFoundError", False, "org/name@v9 is neither a path that exists nor a model repo on the Hugging Face Hub"),
    ("GatedRepoError", False, "org/name@v9 is neither .* \\(a private or gated repo needs `hf auth login`\\)"),
    ("RevisionNotFoundError", False, "the Hugging Face Hub repo org/name has no revision 'v9'"),
    ("LocalEntryNotFoundError", False, "org/name is not in the local cache .* while the Hub could not be reached"),
    ("LocalEntryNotFoundError", True, "org/name is not in the local cache .* while HF_HUB_OFFLINE is set"),
    ("HfHubHTTPError", False, "could not fetch org/name@v9 from the Hugging Face Hub: HfHubHTTPError: 500 Server"),
])
def test_each_failure_of_the_hub_is_one_sentence_naming_the_id(hub_cache, monkeypatch, error, offline, said):
    import huggingface_hub
    from huggingface_hub import constants, errors
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    calls = []

    def fail(repo_id, **kwargs):  # the client's errors need an HTTP response to build: made bare
        calls.append((repo_id, kwargs))
        e = getattr(errors, error).__new__(getattr(errors, error))
        e.args = ("500 Server Error (request id: x)\nmore lines",)
        raise e
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ckpt.CheckpointError, match=said) as info:
        Glow.from_pretrained("org/name@v9")
    assert "\n" not in str(info.value) and "more lines" not in str(info.value)
    # the hub's cache and offline switch keep their meaning: neither is overridden here
    [(repo_id, kwargs)] = calls
    assert repo_id == "org/name" and kwargs["revision"] == "v9" and kwargs["allow_patterns"] == list(hub.HUB_FILES)
    assert not {"cache_dir", "local_dir", "local_files_only", "force_download"} & set(kwargs)


def test_a_cached_repo_without_a_checkpoint_says_so(tmp_path, hub_cache):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.txt").write_text("not a model")
    cache_repo(hub_cache, "org/notes", tmp_path / "notes")
    with pytest.raises(ckpt.CheckpointError, match="org/notes holds no glowflow checkpoint"):
        Glow.from_pretrained("org/notes")


def test_without_huggingface_hub_an_id_names_the_hub_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now fails
    with pytest.raises(ckpt.CheckpointError, match=r'org/name.*pip install "glowflow\[hub\]"'):
        Glow.from_pretrained("org/name")


def test_a_path_that_exists_wins_over_a_hub_id(tmp_path, hub_cache, monkeypatch):
    cached, local = tiny_glow(seed=0), tiny_glow(seed=1)
    assert not same_weights(cached, local)
    cached.save_pretrained(tmp_path / "cached")
    cache_repo(hub_cache, "org/name", tmp_path / "cached")
    monkeypatch.chdir(tmp_path)
    local.save_pretrained(Path("org") / "name")
    assert same_weights(Glow.from_pretrained("org/name"), local)
    # the .old a kill leaves between two renames is the path's checkpoint too
    (tmp_path / "org" / "name").rename(tmp_path / "org" / "name.old")
    assert same_weights(Glow.from_pretrained("org/name"), local)
    shutil.rmtree(tmp_path / "org")
    assert same_weights(Glow.from_pretrained("org/name"), cached)


@pytest.mark.parametrize("text, parsed", [
    ("org/name", ("org/name", None)), ("org/name@v1.0", ("org/name", "v1.0")),
    ("my-org/glow_28.x", ("my-org/glow_28.x", None)), (f"a/b@{COMMIT}", ("a/b", COMMIT)),
    ("name", None), ("a/b/c", None), ("./x", None), ("../x", None), ("/abs", None), ("~/x", None),
    ("org/", None), ("org/name@", None), ("org/na me", None), ("a--b/c", None), ("org/a..b", None),
])
def test_what_reads_as_a_hub_id(text, parsed):
    assert hub.parse_hub_id(text) == parsed


def test_a_missing_relative_path_that_is_no_id_stays_a_missing_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        Glow.from_pretrained(tmp_path / "runs" / "nothing")


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_save_pretrained_writes_a_model_card_with_the_checkpoint(tmp_path):
    model = tiny_glow()
    card = {"name": "tiny-glow", "repo_id": "me/tiny-glow", "license": "mit", "dataset": "fashion-mnist",
            "description": "a tiny test model", "test_bits_per_dim": 3.1234, "test_bits_per_dim_se": 0.0123,
            "test_images": 10000, "eval_command": "glowflow eval me/tiny-glow --dataset fashion-mnist",
            "train_command": "glowflow train --preset tiny", "data_licence": "MIT License (Zalando SE)",
            "acknowledgement": "Xiao, Rasul & Vollgraf 2017"}
    model.save_pretrained(tmp_path / "out", card=card)
    text = (tmp_path / "out" / hub.CARD_NAME).read_text()
    meta, body = front_matter(text)
    assert meta["library_name"] == "glowflow" and meta["license"] == "mit"
    assert {"normalizing-flow", "glow", "fashion-mnist"} <= set(meta["tags"])
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    parameters = sum(p.numel() for p in model.parameters())
    weights = tmp_path / "out" / ckpt.WEIGHTS_NAME
    for expected in ("# tiny-glow", "a tiny test model", 'Glow.from_pretrained("me/tiny-glow")',
                     "1 x 8 x 8", f"{parameters:,}", "3.1234 ± 0.0123 (10,000 test images)",
                     f"`{card['eval_command']}`", f"`{card['train_command']}`", "MIT License (Zalando SE)",
                     "Xiao, Rasul & Vollgraf 2017", io.file_sha256(weights), f"{weights.stat().st_size:,} bytes"):
        assert expected in body, expected
    # written with the checkpoint: listed in its checksums, so the next save replaces it, and it still loads
    assert hub.CARD_NAME in json.loads((tmp_path / "out" / ckpt.CHECKSUMS_NAME).read_text())
    assert same_weights(Glow.from_pretrained(tmp_path / "out"), model)
    model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / hub.CARD_NAME).exists()


def test_a_card_with_an_unknown_field_is_refused_and_the_folder_left_as_it_was(tmp_path):
    with pytest.raises(ValueError, match="'bits_per_dim'"):
        tiny_glow().save_pretrained(tmp_path / "out", card={"bits_per_dim": 3.0})
    assert list(tmp_path.iterdir()) == []
    model = tiny_glow(seed=0)
    model.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="'bits_per_dim'"):
        tiny_glow(seed=1).save_pretrained(tmp_path / "out", card={"bits_per_dim": 3.0})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]
    assert same_weights(Glow.from_pretrained(tmp_path / "out"), model)


def test_an_empty_card_holds_what_the_model_knows(tmp_path):
    tiny_glow().save_pretrained(tmp_path / "plain", card={})
    meta, body = front_matter((tmp_path / "plain" / hub.CARD_NAME).read_text())
    assert meta["library_name"] == "glowflow" and meta["license"] == "other" and "datasets" not in meta
    assert "# plain" in body and "1 x 8 x 8" in body and "test bits/dim" not in body


@pytest.mark.parametrize("name", pretrained.list_models())
def test_each_shipped_model_renders_as_a_card(name):
    entry = pretrained.model_entry(name)
    meta, body = front_matter(hub.model_card(entry, name, repo_id=f"glowflow/{name}"))
    assert meta["library_name"] == "glowflow" and entry["dataset"] in meta["tags"]
    for expected in (f"# {name}", f'Glow.from_pretrained("glowflow/{name}")', f"{entry['parameters']:,}",
                     f"{entry['test_bits_per_dim']} ± {entry['test_bits_per_dim_se']}", entry["eval_command"],
                     entry["train_command"], entry["data_licence"], entry["acknowledgement"], entry["sha256"]):
        assert expected in body, expected


def test_package_model_writes_a_folder_ready_for_the_hub(tmp_path):
    import importlib.util

    from PIL import Image
    spec = importlib.util.spec_from_file_location("package_model", ROOT / "scripts" / "package_model.py")
    package_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package_model)
    g = torch.Generator().manual_seed(4)
    for split in ("train", "test"):
        (tmp_path / "images" / split).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (8, 8), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / split / f"{i}.png")
    model = tiny_glow()
    model.save_pretrained(tmp_path / "run" / ckpt.CHECKPOINT_DIR)
    argv = ["tiny", str(tmp_path / "run"), "--dataset", "folder", "--data", str(tmp_path / "images"),
            "--description", "a tiny test model", "--train-command", "glowflow train ...",
            "--data-licence", "made up for this test", "--weights-dir", str(tmp_path / "weights"),
            "--hub-dir", str(tmp_path / "upload"), "--repo-id", "me/tiny"]
    for _ in range(2):  # a second run replaces the folder the first wrote
        entry = package_model.main(argv)
    meta, body = front_matter((tmp_path / "upload" / hub.CARD_NAME).read_text())
    assert meta["library_name"] == "glowflow"
    assert f"{entry['test_bits_per_dim']} ± {entry['test_bits_per_dim_se']} (3 test images)" in body
    assert 'Glow.from_pretrained("me/tiny")' in body and entry["sha256"] in body
    assert same_weights(Glow.from_pretrained(tmp_path / "upload"), model)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(io.RefusedError):
        package_model.main([*argv[:-4], "--hub-dir", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").is_file()
