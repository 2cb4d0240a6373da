"""Faces: the ORL loader on tiny PGM files written here (splits, crop, sizes, labels, a stray file,
missing files), the hand-label CSV, the presets, directions from the training photos only, and the
demo on a face model in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from glowflow import Glow, latent
from glowflow.cli import main
from glowflow.config import build_train_config
from glowflow.data import default_root, get_dataset
from glowflow.data.orl import ATTRIBUTES_CSV, NUM_PEOPLE, TEST_PEOPLE, load_orl, orl_filenames
from glowflow.images import load_image
from glowflow.train import load_split

from conftest import awake_glow

try:  # the demo tests' live server, Chromium fixture and page helpers
    from test_demo import _src, _wait_src_change, browser, open_page, running  # noqa: F401 (browser is a fixture)
except pytest.skip.Exception as e:  # no demo extra: the browser test skips, the rest runs
    _missing = str(e)

    @pytest.fixture(scope="module")
    def browser():
        pytest.skip(_missing)

    def running(app):
        pytest.skip(_missing)

W, H = 23, 28  # a quarter of the database's 92x112, portrait like it
# Hand-label counts (with, without, unsure) over all 400 photos, as docs/faces.md states them.
DOCUMENTED_COUNTS = {"glasses": (119, 281, 0), "beard_or_moustache": (100, 270, 30),
                     "smiling": (106, 195, 99), "bald_or_receding": (40, 340, 20)}


def _pgm(array: np.ndarray) -> bytes:
    h, w = array.shape
    return b"P5\n%d %d\n255\n" % (w, h) + array.astype(np.uint8).tobytes()


def write_orl(root, seed: int = 0) -> dict[str, np.ndarray]:
    """40 person folders of ten random W x H PGM photos, and the stray s10/target.jpg of the real
    database (a real JPEG, so only its name can keep it out). Returns the pixels by relative path."""
    rng = np.random.default_rng(seed)
    photos = {}
    for p in range(1, NUM_PEOPLE + 1):
        (root / f"s{p}").mkdir(parents=True, exist_ok=True)
        for k in range(1, 11):
            a = rng.integers(0, 256, (H, W), dtype=np.uint8)
            (root / f"s{p}/{k}.pgm").write_bytes(_pgm(a))
            photos[f"s{p}/{k}.pgm"] = a
    Image.new("RGB", (W, H), (200, 10, 10)).save(root / "s10" / "target.jpg")
    return photos


@pytest.fixture(scope="module")
def orl(tmp_path_factory):
    root = tmp_path_factory.mktemp("orl-faces")
    return root, write_orl(root)


# ------------------------------------------------------------------------------------ the loader

def test_split_by_photo_holds_out_the_tenth_photo_of_everyone(orl):
    root, photos = orl
    train, test = load_orl(root, "train"), load_orl(root, "test")
    assert (len(train), len(test)) == (360, 40)
    assert test.filenames == [f"s{p}/10.pgm" for p in range(1, 41)]
    assert not set(train.filenames) & set(test.filenames)
    assert set(train.filenames) | set(test.filenames) == set(photos)  # target.jpg is not among them
    assert test.labels.tolist() == list(range(40)) and train.labels.tolist() == [i // 9 for i in range(360)]
    assert train.class_names[0] == "s1" and train.class_names[39] == "s40"
    for ds in (train, test):  # each image is the file its name says, at the native size
        assert ds.image_shape == (1, H, W)
        for i in (0, 7, len(ds) - 1):
            assert np.array_equal(ds.images[i, 0].numpy(), photos[ds.filenames[i]])


def test_split_by_person_holds_out_whole_people(orl):
    root, _ = orl
    train = get_dataset("orl-faces-by-person", root, "train")
    test = get_dataset("orl_faces_by_person", root, "test")
    assert (len(train), len(test)) == (360, 40) and test.name == "orl-faces-by-person"
    assert {f.split("/")[0] for f in test.filenames} == {f"s{p}" for p in TEST_PEOPLE}
    assert sorted(set(test.labels.tolist())) == [p - 1 for p in TEST_PEOPLE]
    assert not set(train.labels.tolist()) & set(test.labels.tolist())
    assert orl_filenames("test", "person")[:2] == ["s37/1.pgm", "s37/2.pgm"]


def test_square_sizes_are_a_centre_crop_of_the_portrait(orl):
    root, photos = orl
    ds = get_dataset("orl-faces", root, "test", image_size=W)  # the width already fits: only the crop
    top = (H - W) // 2
    assert ds.image_shape == (1, W, W)
    assert np.array_equal(ds.images[3, 0].numpy(), photos["s4/10.pgm"][top:top + W])
    small = get_dataset("orl-faces", root, "train", image_size=8, limit=5)
    assert small.images.shape == (5, 1, 8, 8) and small.filenames == [f"s1/{k}.pgm" for k in range(1, 6)]
    colour = get_dataset("orl-faces", root, "test", image_size=8, channels=3, limit=2)
    assert colour.images.shape == (2, 3, 8, 8) and torch.equal(colour.images[:, 0], colour.images[:, 2])
    # what training loads for a model: sized to its image shape
    assert load_split("orl-faces", root, "train", (1, 16, 16)).images.shape == (360, 1, 16, 16)


def test_the_by_person_split_is_found_in_the_orl_faces_folder(tmp_path, monkeypatch):
    (tmp_path / "orl-faces").mkdir()
    monkeypatch.setenv("GLOWFLOW_DATA", str(tmp_path))
    assert default_root("orl-faces-by-person") == tmp_path / "orl-faces"


def test_missing_person_folders_and_photos_are_named(orl, tmp_path):
    root, _ = orl
    copy = tmp_path / "orl"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "s7")
    with pytest.raises(FileNotFoundError, match=r"1 person folder\(s\) missing .*: s7; expected the folders s1"):
        load_orl(copy, "train")
    shutil.copytree(root / "s7", copy / "s7")
    (copy / "s3" / "4.pgm").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 photo\(s\) of the train split missing .*: s3/4.pgm"):
        load_orl(copy, "train")
    assert len(load_orl(copy, "test")) == 40  # the test split does not need it
    (copy / "s3" / "10.pgm").write_bytes(b"P5\n3 3\n255\n")  # truncated
    with pytest.raises(ValueError, match="s3/10.pgm cannot be decoded"):
        load_orl(copy, "test")
    with pytest.raises(FileNotFoundError, match="not a directory.*glowflow download --dataset orl-faces"):
        load_orl(tmp_path / "nowhere", "test")


# ---------------------------------------------------------------------------------- hand labels

def test_the_hand_labels_cover_every_photo_with_the_documented_counts():
    table = latent.parse_attribute_csv(ATTRIBUTES_CSV)
    assert sorted(table.filenames) == sorted(orl_filenames("train") + orl_filenames("test"))
    assert table.names == tuple(DOCUMENTED_COUNTS)
    for j, name in enumerate(table.names):
        v = table.values[:, j]
        assert (int((v == 1).sum()), int((v == -1).sum()), int((v == 0).sum())) == DOCUMENTED_COUNTS[name], name


@pytest.mark.parametrize("row, message", [
    ("s6/6.pgm,1,maybe,-1,-1", r"line 57, column 'beard_or_moustache': expected 1/0"),
    ("s6/6.pgm,1,-1,-1", "line 57: expected 5 columns like the header, got 4"),
    (",1,-1,-1,-1", "line 57: empty filename"),
])
def test_a_malformed_label_row_is_named_by_its_line(tmp_path, row, message):
    lines = ATTRIBUTES_CSV.read_text().splitlines()
    assert lines[56].startswith("s6/6.pgm,")  # line 57 of the file
    lines[56] = row
    broken = tmp_path / "labels.csv"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        latent.parse_attribute_csv(broken)


# ---------------------------------------------------------------------------------- presets, CLI

def test_presets_are_faces_at_the_sizes_they_say():
    main_cfg, quick = build_train_config("orl-faces-64"), build_train_config("orl-faces-quick")
    assert main_cfg.dataset == quick.dataset == "orl-faces"
    assert main_cfg.model.image_shape == (1, 64, 64) and quick.model.image_shape == (1, 16, 16)
    assert main_cfg.augment_flip and main_cfg.model.n_bits == 5 and 0 < main_cfg.max_minutes <= 20
    assert quick.max_minutes is None and quick.max_steps <= 100


def _face_model(shape=(1, 16, 16), images=None) -> Glow:
    return awake_glow(shape, images.float() / 255)


def test_directions_with_a_dataset_take_only_that_splits_rows(orl, tmp_path, capsys):
    root, _ = orl
    train = get_dataset("orl-faces", root, "train", image_size=8)
    model = _face_model((1, 8, 8), train.images[:64])
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    table = latent.parse_attribute_csv(ATTRIBUTES_CSV)
    rows = [table.filenames.index(f) for f in train.filenames]
    expected = latent.directions_from_images(model, train.images, table.values[rows], table.names)
    args = ["directions", str(tmp_path / "run"), "--attributes", str(ATTRIBUTES_CSV), "--dataset", "orl-faces",
            "--data", str(root), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["num_images"] == 360 and out["directions"]["glasses"] == [105, 255]
    saved, _ = latent.load_directions(tmp_path / "run", model.num_dims)
    torch.testing.assert_close(saved.vectors, expected.vectors)
    assert main(args + ["--split", "test", "--only", "glasses", "--replace"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["directions"] == {"glasses": [14, 26]}
    assert main(args + ["--images", str(root)]) == 2
    assert "--images is for --attributes alone" in capsys.readouterr().err


def test_the_quick_preset_trains_on_faces(orl, tmp_path, capsys):
    root, _ = orl
    assert main(["train", "--preset", "orl-faces-quick", "--data", str(root), "--out", str(tmp_path / "run"),
                 "--set", "max_steps=2", "--set", "init_batch_size=64", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["steps"] == 2 and summary["test_images"] == 40
    model = Glow.from_pretrained(tmp_path / "run")
    assert model.config.image_shape == (1, 16, 16) and model.config.n_bits == 5


# ------------------------------------------------------------------------------------ browser

@pytest.fixture(scope="module")
def face_demo(orl):
    """A live demo on a face model: 16x16 faces, directions from the training photos' hand labels."""
    create_app = pytest.importorskip("glowflow.demo.server").create_app
    root, _ = orl
    train = get_dataset("orl-faces", root, "train", image_size=16)
    test = get_dataset("orl-faces", root, "test", image_size=16, limit=3)
    model = _face_model((1, 16, 16), train.images[:128])
    table = latent.parse_attribute_csv(ATTRIBUTES_CSV)
    rows = [table.filenames.index(f) for f in train.filenames]
    directions = latent.directions_from_images(model, train.images, table.values[rows], table.names)
    app = create_app(model, directions, test_images=test.images, test_names=test.filenames, alpha_max=1.5)
    with running(app) as url:
        yield url, root, model, directions


def _pixels(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


@pytest.mark.browser
def test_browser_face_upload_and_the_glasses_slider(face_demo, browser, tmp_path):
    url, root, model, directions = face_demo
    photo = tmp_path / "colour.jpg"  # any size, in colour: the page shows it as the model takes it
    Image.new("RGB", (50, 30), (30, 160, 220)).save(photo)
    page = open_page(browser, url)
    errors = page.errors
    assert "16×16 greyscale" in page.inner_text("#input-note")
    glasses = page.locator(".slider:has(.attr-slider[data-name=glasses]) label")
    assert "glasses" in glasses.inner_text() and "105 with, 255 without" in glasses.inner_text()
    assert "beard or moustache" in page.inner_text("#sliders")
    # enlarged by a whole factor, pixel for pixel
    assert page.eval_on_selector("#edited", "e => [getComputedStyle(e).width, getComputedStyle(e).imageRendering]") \
        == ["256px", "pixelated"]

    face = root / "s2" / "10.pgm"  # a held-out face, as PGM
    page.set_input_files("#file-a", str(face))
    reconstruction = _wait_src_change(page, "#reconstruction", "")
    page.wait_for_selector("#edited[src]:not(.busy)")  # the alpha-0 edit has come back
    edited = _src(page, "#edited")
    page.locator(".attr-slider[data-name=glasses]").fill("1.5")  # starts an edit at once
    page.wait_for_selector("#edited:not(.busy)")
    moved = _src(page, "#edited")
    assert page.locator(".attr-slider[data-name=glasses] + output").inner_text() == "1.50"
    x = load_image(face, model.config.image_shape)
    expected = latent.manipulate(model, x, directions["glasses"], 1.5)[0]  # what the page must show
    shown = torch.tensor(np.asarray(_pixels(moved)), dtype=torch.float32) / 255
    torch.testing.assert_close(shown, (expected[0] * 255).round() / 255, atol=1 / 255, rtol=0)
    before = torch.tensor(np.asarray(_pixels(reconstruction)), dtype=torch.float32) / 255
    assert (shown - before).abs().max() > 0.1 and moved != edited  # the slider changed the picture

    original = _src(page, "#original")
    page.set_input_files("#file-a", str(photo))
    shown = _wait_src_change(page, "#original", original)
    assert _pixels(shown).mode == "L" and _pixels(shown).size == (16, 16)
    page.wait_for_function("() => document.querySelector('#upload-note').textContent.includes('50×30')")
    assert "centre-cropped" in page.inner_text("#upload-note")
    assert not errors, errors
    page.close()
