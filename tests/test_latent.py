"""Latent editing: interpolation paths, attribute-direction arithmetic, manipulation, attribute-file
parsers, direction files and the CLI commands, on tiny models."""
from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glowflow import Glow, editing, latent, numerics
from glowflow.cli import edit as cli_edit
from glowflow.checkpoint import CheckpointError
from glowflow.images import ImageError, load_image, make_grid, png_bytes, save_grid
from glowflow.io import file_sha256

SHAPE = (1, 8, 8)


def tiny_model(perturb, num_classes=None, dtype=torch.float64, seed=0) -> Glow:
    """A 2-level, 2-step Glow on 1x8x8 with every zero-initialised branch perturbed, initialised
    from images in [0.25, 0.75] so that small latent moves decode inside [0, 1] (no clamping)."""
    model = Glow(image_shape=SHAPE, levels=2, steps=2, hidden_channels=8, num_classes=num_classes, seed=seed)
    perturb(model)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = 0.25 + 0.5 * torch.rand(32, *SHAPE, generator=g, dtype=dtype)
    y = torch.arange(32) % num_classes if num_classes else None
    model.initialize(x, y)
    return model.eval()


def images(n, seed=1, dtype=torch.float64):
    """8-bit images in [0.3, 0.7] at the centres of their quantisation bins, where Glow.encode
    reads them: their reconstructions are the images themselves."""
    g = torch.Generator().manual_seed(seed)
    return numerics.bin_centre(0.3 + 0.4 * torch.rand(n, *SHAPE, generator=g, dtype=dtype), 8)


@pytest.fixture
def model(perturb_zero_init):
    return tiny_model(perturb_zero_init)


# ----------------------------------------------------------------------------- paths

def test_lerp_and_slerp_ends_and_midpoints():
    a, b = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0])
    for f in (latent.lerp, latent.slerp):
        path = f(a, b, t)
        assert path.shape == (3, 3)
        torch.testing.assert_close(path[0], a)
        torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(latent.lerp(a, b, 0.5), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    # Orthogonal vectors: the great-circle midpoint weights both by sin(pi/4)/sin(pi/2) = 1/sqrt(2).
    torch.testing.assert_close(latent.slerp(a, b, 0.5), (a + b) / math.sqrt(2))


def test_slerp_keeps_the_norm_of_equal_norm_vectors_and_falls_back_when_parallel():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, generator=g, dtype=torch.float64)
    b = b * a.norm() / b.norm()
    path = latent.slerp(a, b, torch.linspace(0, 1, 7))
    torch.testing.assert_close(path.norm(dim=1), a.norm().expand(7))
    assert (latent.lerp(a, b, torch.linspace(0, 1, 7))[3].norm() < a.norm() * 0.99)  # the chord dips inside
    torch.testing.assert_close(latent.slerp(a, 3 * a, 0.5), 2 * a)  # parallel: no circle, straight line


def test_interpolate_ends_are_reconstructions_and_linear_midpoint_is_mean_latent(model):
    x = images(2)
    path = latent.interpolate(model, x[0], x[1], steps=5)
    assert path.shape == (5, *SHAPE)
    torch.testing.assert_close(path[0], x[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(path[-1], x[1], atol=1e-9, rtol=0)
    z = model.encode(x)
    torch.testing.assert_close(path[2], model.decode(z.mean(0, keepdim=True))[0].clamp(0, 1))
    assert not torch.allclose(path[1], path[3])
    spherical = latent.interpolate(model, x[0], x[1], steps=5, method="spherical")
    torch.testing.assert_close(spherical[0], x[0], atol=1e-9, rtol=0)
    assert not torch.allclose(spherical[2], path[2])
    with pytest.raises(ValueError, match="steps"):
        latent.interpolate(model, x[0], x[1], steps=1)
    with pytest.raises(ValueError, match="method"):
        latent.interpolate(model, x[0], x[1], steps=3, method="cubic")


def test_editing_refuses_an_uninitialised_model():
    fresh = Glow(image_shape=SHAPE, levels=2, steps=1, hidden_channels=4)
    with pytest.raises(ValueError, match="not been initialised"):
        latent.reconstruct(fresh, images(1))


# ---------------------------------------------------------------------- direction arithmetic

def test_direction_is_difference_of_means_with_counts_and_ignores_unknown():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 6, generator=g, dtype=torch.float64)
    attrs = torch.tensor([[1, -1], [1, 1], [-1, 0], [-1, 0], [1, -1], [-1, 1], [-1, -1], [1, 0], [-1, 1], [-1, -1]])
    d = latent.attribute_directions(z, attrs, ["a", "b"])
    for k, name in enumerate(["a", "b"]):
        pos, neg = attrs[:, k] == 1, attrs[:, k] == -1
        torch.testing.assert_close(d[name].double(), z[pos].mean(0) - z[neg].mean(0), rtol=1e-6, atol=1e-6)
        assert (d.positive_counts[k], d.negative_counts[k]) == (int(pos.sum()), int(neg.sum()))
    assert (d.positive_counts, d.negative_counts) == ((4, 3), (6, 4))  # zeros in "b" are in neither


def test_accumulating_in_batches_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(13, 5, generator=g)
    attrs = torch.randint(0, 2, (13, 3), generator=g) * 2 - 1
    attrs[0], attrs[1] = 1, -1  # every column has both signs
    acc = latent.DirectionAccumulator(["a", "b", "c"], 5)
    for s in range(0, 13, 4):
        acc.update(z[s:s + 4], attrs[s:s + 4])
    torch.testing.assert_close(acc.result().vectors, latent.attribute_directions(z, attrs, "abc").vectors)


def test_direction_needs_both_signs_and_valid_values():
    z = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="'b' \\(3 with, 0 without\\)"):
        latent.attribute_directions(z, torch.tensor([[1, 1], [-1, 1], [1, 1]]), ["a", "b"])
    with pytest.raises(ValueError, match="\\+1, -1 or 0"):
        latent.attribute_directions(z, torch.tensor([[1], [2], [-1]]), ["a"])
    with pytest.raises(ValueError, match="attributes must be"):
        latent.attribute_directions(z, torch.ones(2, 1), ["a"])


@pytest.mark.parametrize("estimator", ["mean", "coarse", "shrunk", "classifier"])
def test_directions_from_images_apply_the_estimator_to_the_encoded_images(model, estimator):
    """Whatever the source of the images (tensor, dataset, files), the direction is the estimator's
    on the latents Glow.encode gives them, batch by batch or not."""
    from glowflow.data import ImageDataset
    from glowflow.estimators import estimator as make

    x = images(12)
    attrs = torch.tensor([1] * 6 + [-1] * 6)[:, None]
    z = model.encode(x)
    sizes = [math.prod(s) for s in model.latent_shapes]
    expected = make(estimator).direction(z[:6], z[6:], sizes)
    d = latent.directions_from_images(model, x, attrs, ["a"], batch_size=5, estimator=estimator)
    torch.testing.assert_close(d["a"].double(), expected.double(), atol=1e-5, rtol=1e-4)
    assert (d.positive_counts, d.negative_counts) == ((6,), (6,)) and f"estimator {estimator}" in d.sources[0]
    as_uint8 = ImageDataset(torch.round(x * 255).to(torch.uint8))
    d2 = latent.directions_from_images(model, as_uint8, attrs, ["a"], batch_size=4, estimator=estimator)
    torch.testing.assert_close(d2["a"], d["a"], atol=1e-5, rtol=1e-4)


def test_the_paired_estimator_takes_groups_and_refuses_without_them(model):
    x = images(8)
    attrs = torch.tensor([1, -1, 1, -1, 1, -1, -1, -1])[:, None]
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    z = model.encode(x)
    d = latent.directions_from_images(model, x, attrs, ["a"], estimator="paired", groups=groups)
    pairs = torch.stack([z[0] - z[1], z[2] - z[3], z[4] - z[5]]).mean(0)  # group 3 has no positive
    torch.testing.assert_close(d["a"].double(), pairs, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs a group"):
        latent.directions_from_images(model, x, attrs, ["a"], estimator="paired")
    with pytest.raises(ValueError, match="unknown estimator 'median'"):
        latent.directions_from_images(model, x, attrs, ["a"], estimator="median")


def test_class_and_pair_attributes():
    labels = torch.tensor([0, 2, 1, 2])
    names = ["Sneaker", "Bag", "Ankle boot"]
    a = latent.class_attributes(labels, names)
    assert a.tolist() == [[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [-1, -1, 1]]
    col, name = latent.pair_attributes(labels, names, "sneaker", "Ankle boot")
    assert name == "Sneaker-vs-Ankle boot"
    assert col[:, 0].tolist() == [1, -1, 0, -1]
    with pytest.raises(ValueError, match="unknown class 'Hat'"):
        latent.pair_attributes(labels, names, "Hat", "Bag")
    with pytest.raises(ValueError, match="different classes"):
        latent.pair_attributes(labels, names, "Bag", "1")
    with pytest.raises(ValueError, match="labels must lie"):
        latent.class_attributes(torch.tensor([3]), names)


def test_combine_and_merge():
    d = latent.Directions(["a", "b"], torch.eye(2, 3), [1, 2], [3, 4], ["s", "s"])
    torch.testing.assert_close(d.combine({"a": 2.0, "b": -1.0}), torch.tensor([2.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="no direction named 'c'"):
        d.combine({"c": 1.0})
    other = latent.Directions(["b", "c"], torch.ones(2, 3), [5, 6], [7, 8], ["t", "t"])
    m = d.merged(other)
    assert m.names == ("a", "b", "c") and m.positive_counts == (1, 5, 6)
    torch.testing.assert_close(m["b"], torch.ones(3))
    with pytest.raises(ValueError, match="unique"):
        latent.Directions(["a", "a"], torch.zeros(2, 3), [1, 1], [1, 1], ["", ""])


# ------------------------------------------------------------------------------ manipulation

def test_manipulate_alpha_zero_is_the_reconstruction(model):
    x = images(3)
    d = torch.randn(model.num_dims, dtype=torch.float64)
    recon = latent.reconstruct(model, x)
    torch.testing.assert_close(latent.manipulate(model, x, d, 0.0), recon)
    strip = latent.manipulate(model, x[0], d, [-1.0, 0.0, 1.0])
    assert strip.shape == (3, *SHAPE)
    torch.testing.assert_close(strip[1], recon[0])
    torch.testing.assert_close(recon, x, atol=1e-9, rtol=0)  # and the reconstruction is the input
    assert (strip[0] - strip[2]).abs().max() > 1e-3


def test_manipulate_moves_the_latent_by_alpha_times_direction(model):
    x = images(1)
    d = 0.05 * torch.randn(model.num_dims, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = latent.manipulate(model, x, d, [-0.5, 1.0, 2.0], stable=False)  # the paper's formula as it stands
    assert out.min() > 0 and out.max() < 1
    torch.testing.assert_close(model.encode(out, quantized=False) - model.encode(x),
                               torch.tensor([-0.5, 1.0, 2.0])[:, None].double() * d, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="direction must be"):
        latent.manipulate(model, x, d[:-1], 1.0)
    with pytest.raises(ValueError, match="2 images and 3 alphas"):
        latent.manipulate(model, images(2), d, [0.0, 1.0, 2.0])


def test_edit_combines_directions_and_blend(model):
    x = images(2)
    d = latent.Directions(["a", "b"], 0.05 * torch.randn(2, model.num_dims, dtype=torch.float64), [1, 1], [1, 1], ["", ""])
    z = model.encode(x)
    out = latent.edit(model, x[0], d, {"a": 1.0, "b": -2.0}, mix=x[1], blend=0.25, stable=False)
    expected = model.decode((0.75 * z[0] + 0.25 * z[1] + d["a"] - 2 * d["b"])[None]).clamp(0, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(latent.edit(model, x[0], d, {}, mix=x[1], blend=1.0), x[1:], atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="blend"):
        latent.edit(model, x[0], mix=x[1], blend=1.5)


def test_class_conditional_model_needs_and_uses_labels(perturb_zero_init):
    model = tiny_model(perturb_zero_init, num_classes=3)
    x = images(1)
    d = torch.randn(model.num_dims, dtype=torch.float64)
    with pytest.raises(ValueError, match="class-conditional"):
        latent.manipulate(model, x, d, 0.0)
    strip = latent.manipulate(model, x, d, [0.0, 1.0], y=2)
    torch.testing.assert_close(strip[0], x[0], atol=1e-9, rtol=0)
    path = latent.interpolate(model, x[0], images(1, seed=9)[0], steps=3, y1=0, y2=2)
    torch.testing.assert_close(path[0], x[0], atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------ file parsers

CELEBA = "3\nSmiling Male\n000001.jpg  1 -1\n000002.jpg -1 -1\n000003.jpg  1  1\n"


def test_parse_celeba_attributes(tmp_path):
    f = tmp_path / "list_attr_celeba.txt"
    f.write_text(CELEBA)
    t = latent.parse_celeba_attributes(f)
    assert t.filenames == ("000001.jpg", "000002.jpg", "000003.jpg")
    assert t.names == ("Smiling", "Male")
    assert t.values.tolist() == [[1, -1], [-1, -1], [1, 1]]
    assert t.select(["Male"]).values[:, 0].tolist() == [-1, -1, 1]
    assert len(t.head(2)) == 2


@pytest.mark.parametrize("text, message", [
    ("three\nSmiling\na.jpg 1\n", "line 1: expected the number of images"),
    ("2\nSmiling Male\na.jpg 1 -1\n", "declares 2 images but 1 rows follow"),
    ("1\nSmiling Male\na.jpg 1\n", "line 3: expected a filename and 2 values, got 2 fields"),
    ("1\nSmiling\na.jpg 0\n", "line 3: values must be 1 or -1"),
    ("1\nSmiling\na.jpg yes\n", "line 3: values must be 1 or -1"),
    ("1\nSmiling Smiling\na.jpg 1 1\n", "duplicate attribute names \\['Smiling'\\]"),
    ("2\nSmiling\na.jpg 1\na.jpg -1\n", "'a.jpg' appears more than once"),
    ("1\n", "expected a count line and a header line"),
])
def test_parse_celeba_rejects_malformed_files(tmp_path, text, message):
    f = tmp_path / "list_attr_celeba.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        latent.parse_celeba_attributes(f)


def test_parse_attribute_csv(tmp_path):
    f = tmp_path / "attrs.csv"
    f.write_text("filename,smiling,hat\na.png,1,0\nb.png,-1,true\nc.png, no ,\n")
    t = latent.parse_attribute_csv(f)
    assert t.names == ("smiling", "hat")
    assert t.values.tolist() == [[1, -1], [-1, 1], [-1, 0]]


@pytest.mark.parametrize("text, message", [
    ("", "empty; expected a header row"),
    ("filename\na.png\n", "at least one attribute column"),
    ("filename,smiling\n", "a header but no image rows"),
    ("filename,smiling\na.png,1,0\n", "line 2: expected 2 columns like the header, got 3"),
    ("filename,smiling\na.png,maybe\n", "line 2, column 'smiling': expected 1/0"),
    ("filename,smiling\n,1\n", "line 2: empty filename"),
    ("filename,smiling,smiling\na.png,1,1\n", "duplicate attribute names"),
    ("filename,smiling\na.png,1\na.png,0\n", "'a.png' appears more than once"),
    ("filename,smiling\n\na.png,1\nb.png,maybe\n", "line 4, column 'smiling'"),  # blank lines count
])
def test_parse_attribute_csv_rejects_malformed_files(tmp_path, text, message):
    f = tmp_path / "attrs.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        latent.parse_attribute_csv(f)


def test_parsers_reject_binary_and_missing_files(tmp_path):
    f = tmp_path / "attrs.csv"
    f.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(ValueError, match="not a readable CSV"):
        latent.parse_attribute_csv(f)
    with pytest.raises(FileNotFoundError):
        latent.parse_celeba_attributes(tmp_path / "nope.txt")


# ------------------------------------------------------------------------- saving directions

def test_save_load_directions_round_trip_and_checks(tmp_path, model):
    d = latent.Directions(["a", "b c/d"], torch.randn(2, model.num_dims), [3, 4], [5, 6], ["x", "y"])
    latent.save_directions(d, tmp_path, weights_sha="abc")
    loaded, info = latent.load_directions(tmp_path, model.num_dims)
    assert loaded.names == d.names and loaded.positive_counts == (3, 4) and loaded.sources == ("x", "y")
    torch.testing.assert_close(loaded.vectors, d.vectors)
    readable = json.loads((tmp_path / latent.DIRECTIONS_JSON).read_text())
    assert [e["name"] for e in readable["directions"]] == ["a", "b c/d"] and info["weights_sha256"] == "abc"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    with pytest.raises(CheckpointError, match="different model"):
        latent.load_directions(tmp_path, model.num_dims + 1)
    (tmp_path / latent.DIRECTIONS_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        latent.load_directions(tmp_path)
    with pytest.raises(CheckpointError, match="glowflow directions"):
        latent.load_directions(tmp_path / "empty")


def test_a_directions_file_holding_nan_is_refused_naming_the_file_and_the_direction(tmp_path, model):
    """A NaN in a direction made every edit of the demo fail; it is refused where it enters: when
    the file is read (here one without a checksum, as an older glowflow wrote), or the directions built."""
    vectors = torch.randn(2, model.num_dims)
    latent.save_directions(latent.Directions(["a", "Smiling"], vectors, [1, 1], [1, 1], ["", ""]), tmp_path)
    path = tmp_path / latent.DIRECTIONS_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    vectors[1, 5] = float("nan")
    save_file({"directions": vectors}, str(path), metadata=metadata)
    (tmp_path / latent.DIRECTIONS_JSON).unlink()
    with pytest.warns(UserWarning, match="no checksum"), \
            pytest.raises(CheckpointError, match=r"directions.safetensors.*'Smiling' holds NaN or inf \(1 of"):
        latent.load_directions(tmp_path, model.num_dims)
    with pytest.raises(ValueError, match="'Smiling' holds NaN or inf"):
        latent.Directions(["a", "Smiling"], vectors, [1, 1], [1, 1], ["", ""])


def test_a_directions_file_changed_after_it_was_written_is_refused_by_its_checksum(tmp_path, model):
    """safetensors checks its header, not the numbers: a flipped bit in a vector loaded silently.
    directions.json holds the file's SHA-256, checked on load, as checksums.json is for checkpoints."""
    latent.save_directions(latent.Directions(["a"], torch.randn(1, model.num_dims), [1], [1], [""]), tmp_path)
    path = tmp_path / latent.DIRECTIONS_WEIGHTS
    assert json.loads((tmp_path / latent.DIRECTIONS_JSON).read_text())["directions_sha256"] == file_sha256(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a bit of the last value
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt file .*directions.safetensors: its SHA-256 does not match "
                                              r"the one in .*directions.json"):
        latent.load_directions(tmp_path, model.num_dims)
    (tmp_path / latent.DIRECTIONS_JSON).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="directions.json: expected a JSON object"):
        latent.load_directions(tmp_path, model.num_dims)


def test_directions_live_in_the_run_directory(tmp_path, model):
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    assert latent.directions_dir(tmp_path / "run") == tmp_path / "run"
    assert latent.directions_dir(tmp_path / "run" / "checkpoint") == tmp_path / "run"
    model.save_pretrained(tmp_path / "bare")
    assert latent.directions_dir(tmp_path / "bare") == tmp_path / "bare"


# ------------------------------------------------------------------------------------ images

def test_save_grid_layout_and_load_image(tmp_path):
    x = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 0.5, 1.0)])
    grid = make_grid(x, nrow=2, padding=1, pad_value=7)
    assert grid.shape == (1, 1 + 2 * 5, 1 + 2 * 5)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 6] == 128 and grid[0, 6, 1] == 255 and grid[0, 6, 6] == 7
    path = save_grid(x, tmp_path / "g.png", nrow=3, padding=0)
    back = load_image(path, (1, 4, 12))
    torch.testing.assert_close(back[:, :, 4:8], torch.full((1, 4, 4), 128 / 255))
    rgb = load_image(png_bytes(torch.rand(3, 6, 6)), (3, 4, 4))  # resized
    assert rgb.shape == (3, 4, 4)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"%PDF-1.4 not an image", SHAPE)
    with pytest.raises(ImageError, match="limit is 10"):
        load_image(png_bytes(x[0]), SHAPE, max_pixels=10)
    with pytest.raises(ValueError, match=".png"):
        save_grid(x, tmp_path / "g.jpg")


# -------------------------------------------------------------------------------------- CLI

def run_cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="glowflow")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_edit.register(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def run_dir(tmp_path, perturb_zero_init):
    model = tiny_model(perturb_zero_init, dtype=torch.float32)
    run = tmp_path / "run"
    model.save_pretrained(run / "checkpoint")
    x = images(6, dtype=torch.float32)
    folder = tmp_path / "imgs"
    rows = ["filename,bright,odd"]
    for i in range(6):
        save_grid(x[i:i + 1], folder / f"{i}.png", padding=0)
        rows.append(f"{i}.png,{int(x[i].mean() > x.mean())},{i % 2}")
    (folder / "attrs.csv").write_text("\n".join(rows) + "\n")
    return run, folder


def test_cli_directions_manipulate_interpolate(run_dir, capsys):
    run, folder = run_dir
    assert run_cli(["directions", run, "--attributes", folder / "attrs.csv", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["directions"]) == {"bright", "odd"} and result["directions"]["odd"] == [3, 3]
    assert (run / "directions.safetensors").is_file() and (run / "directions.json").is_file()
    # merging: a second run with --only keeps the other direction
    assert run_cli(["directions", run, "--attributes", folder / "attrs.csv", "--only", "odd"]) == 0
    assert latent.load_directions(run)[0].names == ("bright", "odd")

    out = run.parent / "strip.png"
    assert run_cli(["manipulate", folder / "0.png", "--checkpoint", run, "--attribute", "odd",
                    "--alphas", "-1,-0.5,0,0.5,1", "--out", out]) == 0
    strip = load_image(out, (1, 8 + 4, 5 * 10 + 2))
    assert strip.shape == (1, 12, 52)
    out = run.parent / "interp.png"
    assert run_cli(["interpolate", folder / "0.png", folder / "1.png", "-c", run / "checkpoint",
                    "--steps", "4", "--method", "spherical", "--out", out]) == 0
    from PIL import Image
    assert Image.open(out).size == (2 + 4 * 10, 12)
    with pytest.raises(ValueError, match="no direction named 'smiling'"):
        run_cli(["manipulate", folder / "0.png", "-c", run, "--attribute", "smiling", "--out", out])


def test_cli_manipulate_grey_failed_draws_a_failed_alpha_grey_and_keeps_the_rest(run_dir, monkeypatch):
    run, folder = run_dir
    assert run_cli(["directions", run, "--attributes", folder / "attrs.csv"]) == 0
    decode = Glow.decode

    def overflowing_last_row(self, eps, *args, **kwargs):  # the inverse overflowing at the last alpha
        x = decode(self, eps, *args, **kwargs)
        x[-1] = 1e23
        return x

    monkeypatch.setattr(Glow, "decode", overflowing_last_row)
    out = run.parent / "strip.png"
    argv = ["manipulate", run, folder / "0.png", "--attribute", "odd", "--alphas", "-1,0,1", "--out", out]
    with pytest.raises(latent.DecodeError, match="alpha 1 is not finite"):
        run_cli(argv)
    assert not out.exists()
    with pytest.warns(UserWarning, match="alpha 1 failed .* drawn grey"):
        assert run_cli(argv + ["--grey-failed"]) == 0
    strip = load_image(out, (1, 12, 3 * 10 + 2))[0]
    tiles = [strip[2:10, 2 + 10 * i: 10 + 10 * i] for i in range(3)]  # 8x8 tiles, 2-pixel padding
    assert (tiles[2] - 128 / 255).abs().max() < 1e-6 and (tiles[1] - 128 / 255).abs().max() > 0.01


def test_cli_directions_reports_missing_images(run_dir):
    run, folder = run_dir
    (folder / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match="3.png"):
        run_cli(["directions", run, "--attributes", folder / "attrs.csv"])


def test_cli_directions_from_fashion_mnist_classes(tmp_path, perturb_zero_init):
    data = pytest.importorskip("glowflow.data")
    root = data.default_root("fashion-mnist")
    if root is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    model = Glow(image_shape=(1, 28, 28), levels=2, steps=1, hidden_channels=4)
    ds = data.get_dataset("fashion-mnist", root, split="test", limit=64)
    model.initialize(ds.images.float() / 255)
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    assert run_cli(["directions", tmp_path / "run", "--dataset", "fashion-mnist", "--data", root,
                    "--split", "test", "--limit", "200", "--positive", "Sneaker", "--negative", "Ankle boot"]) == 0
    d, _ = latent.load_directions(tmp_path / "run")
    labels = data.get_dataset("fashion-mnist", root, split="test", limit=200).labels
    assert d.names == ("Sneaker-vs-Ankle boot",)
    assert (d.positive_counts[0], d.negative_counts[0]) == (int((labels == 7).sum()), int((labels == 9).sum()))


# --------------------------------------------------------------------------- decodes that diverge
def _overflowing_direction(model) -> torch.Tensor:
    """A direction along which the tiny model's inverse overflows (the affine couplings' scale of
    latents far off the data goes to 0 and the division by it to inf)."""
    return 1e4 * torch.randn(model.num_dims, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def test_a_diverged_edit_is_an_error_naming_the_alpha_not_a_black_image(model):
    x, d = images(1), _overflowing_direction(model)
    with torch.no_grad():
        raw = model.decode(model.encode(x) + d)
    assert not torch.isfinite(raw).all()  # what used to come back as black
    with pytest.raises(latent.DecodeError, match=r"alpha 1\b.*not finite") as e:
        latent.manipulate(model, x, d, [0.0, 1.0], stable=False)
    assert e.value.rows == [1]
    z = model.encode(x)[0]
    with pytest.raises(latent.DecodeError, match="frame 2 of 3") as e:  # how interpolate names its frames
        editing._decode(model, torch.stack([z, z + d, z]), None, False, what=lambda i: f"frame {i + 1} of 3")
    assert e.value.rows == [1]


def test_a_finite_decode_far_outside_the_image_range_is_a_failed_edit(model, monkeypatch):
    """The inverse's overflow is caught before it reaches inf: values of 1e23 (seen on the face
    model) are a failed edit, not an image of clamped pixel noise; a little overshoot is not."""
    z = torch.zeros(3, model.num_dims, dtype=torch.float64)
    def fake_decode(eps, y=None, scale_floor=0.0, flow_input=False):
        x = torch.full((eps.shape[0], *model.config.image_shape), 0.5, dtype=torch.float64)
        x[0, 0, 0, :] = 1.3  # overshoot within FAR_OUTSIDE: clamped, fine
        x[0, 0, 1, :2] = -5.0  # 2 of 64 pixels far outside (3%, within MAX_FAR_FRACTION)
        if eps.shape[0] == 3:
            x[1, 0, 0, :] = 1e23  # 8 of 64 pixels far outside
            x[2, 0, 0, :4] = 2.0  # 4 of 64 (6%, above MAX_FAR_FRACTION)
        return x
    monkeypatch.setattr(model, "decode", fake_decode)
    with pytest.raises(latent.DecodeError, match="far outside the image range") as e:
        editing._decode(model, z)
    assert e.value.rows == [1, 2]
    out = editing._decode(model, z[:1])
    assert out.max() == 1.0 and out.min() == 0.0
    with pytest.warns(UserWarning, match="latent 1, latent 2 failed .* drawn grey"):
        grey = editing._decode(model, z, failed="grey")  # a strip keeps its good tiles
    assert (grey[1:] == 0.5).all() and torch.equal(grey[0], out[0])
    with pytest.raises(ValueError, match="failed must be one of"):
        editing._decode(model, z, failed="skip")


def test_the_failure_gate_refuses_pixel_noise_and_accepts_a_saturated_background():
    """Hand-made decodes, judged as a person would see them drawn: a garment on a background pushed
    deep into the black (what a logit input gives where its values run to -30: drawn black) or
    into the white is fine; salt-and-pepper noise over part of an image is not, nor are 1-pixel
    stripes mistaken for it."""
    g = torch.Generator().manual_seed(0)
    garment = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    garment[..., 6:22, 8:20] = 0.4 + 0.2 * torch.rand(16, 12, generator=g, dtype=torch.float64)
    stripes = garment.clone()
    stripes[..., 6:22:2, 8:20] = 1.0  # a striped shirt: every other row white
    from glowflow.numerics import from_flow_input
    deep_black = from_flow_input(torch.where(garment > 0, torch.logit(garment.clamp(1e-6, 1)), -30.0), 1e-4)
    white = garment.clone()
    white[garment == 0] = 1.0
    noisy = garment.clone()
    patch = torch.rand(8, 8, generator=g) < 0.5  # 8x8 of salt and pepper: specks over ~3% of the image
    noisy[..., 0:8, 0:8] = patch.double()
    few = garment.clone()
    few[..., 2, 2] = few[..., 25, 25] = 1.0  # two stray white pixels: 0.26%, under the limit
    batch = torch.cat([garment, stripes, deep_black, white, noisy, few])
    assert latent.failed_decodes(batch).tolist() == [False, False, False, False, True, False]
    assert latent.specks(noisy) > editing.MAX_SPECK_FRACTION > latent.specks(stripes)
    # an edit of an image that was noisy to begin with may keep its noise
    assert not latent.failed_decodes(noisy, latent.specks(noisy)).item()


def test_decode_returns_the_flow_input_when_asked(model):
    eps = model.encode(images(2))
    with torch.no_grad():
        assert torch.equal(model.decode(eps, flow_input=True) + 0.5, model.decode(eps))


def test_sampling_decodes_with_the_stable_floor_unless_told_otherwise(model):
    """Glow.sample is decode(T * eps) with the couplings' scale floored at STABLE_SCALE_FLOOR (on the
    trained face model 21 of 256 samples at T=1 overflow without it, 0 with it); scale_floor=0 is the
    exact decode. Near the data the two agree bit for bit."""
    gen = lambda: torch.Generator().manual_seed(3)
    eps = torch.randn(4, model.num_dims, generator=gen(), dtype=torch.float64)
    with torch.no_grad():
        for t in (0.5, 10.0):
            for floor in (latent.STABLE_SCALE_FLOOR, 0.0):
                expected = model.decode(t * eps, scale_floor=floor).clamp(0, 1)
                kw = {} if floor else {"scale_floor": 0.0}
                torch.testing.assert_close(model.sample(4, t, generator=gen(), **kw), expected,
                                           atol=0, rtol=0, equal_nan=True)
        far = 10.0 * eps
        assert not torch.equal(model.decode(far, scale_floor=latent.STABLE_SCALE_FLOOR).nan_to_num(),
                               model.decode(far).nan_to_num())  # the floor acts far out
        torch.testing.assert_close(model.sample(4, 0.5, generator=gen()),
                                   model.sample(4, 0.5, generator=gen(), scale_floor=0.0), atol=0, rtol=0)


def test_latent_sample_draws_what_glow_sample_draws_and_greys_only_what_does_not_decode(model, monkeypatch):
    """latent.sample (the demo's) draws Glow.sample's images; a sample whose decode is not finite is
    grey and listed, one finite but far outside [0, 1] is drawn, as `glowflow sample` draws it."""
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    images, failed = latent.sample(model, 4, 0.5, generator=gen())
    assert failed == [] and torch.equal(images, model.sample(4, 0.5, generator=gen()))
    decode = model.decode

    def overflowing(eps, *args, **kwargs):
        out = decode(eps, *args, **kwargs)
        out[1] = float("nan")
        out[2] = 1e6
        return out
    monkeypatch.setattr(model, "decode", overflowing)
    images, failed = latent.sample(model, 4, 0.5, generator=gen())
    assert failed == [1] and (images[1] == 0.5).all() and (images[2] == 1.0).all()
    assert torch.equal(images[[0, 3]], model.sample(4, 0.5, generator=gen())[[0, 3]].clamp(0, 1))


def test_stable_edits_keep_level_norms_and_reconstructions_exact(model):
    x, d = images(2), 0.3 * torch.randn(model.num_dims, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z = model.encode(x)
    with torch.no_grad():
        exact = model.decode(z)
        floored = model.decode(z, scale_floor=latent.STABLE_SCALE_FLOOR)
    assert torch.equal(exact, floored)  # the floor is below every scale data produce: nothing changes
    torch.testing.assert_close(latent.manipulate(model, x, d, 0.0), exact.clamp(0, 1), atol=0, rtol=0)
    alphas = [0.5, 1.0, 2.0]
    out = latent.manipulate(model, x[0], d, alphas)
    moved = model.encode(out, quantized=False)
    sizes = [math.prod(s) for s in model.latent_shapes]
    # the coarsest level keeps its norm; the finer ones keep a share of the image's detail that
    # falls linearly from 1 at alpha 0 to EDIT_DETAIL at |alpha| >= 1
    detail = torch.tensor([1 - (1 - latent.EDIT_DETAIL) * min(1.0, a) for a in alphas], dtype=torch.float64)
    blocks = list(zip(torch.split(moved, sizes, 1), torch.split(z[:1], sizes, 1)))
    for i, (a, b) in enumerate(blocks):
        expected = b.norm(dim=1).expand(3) * (1.0 if i == len(blocks) - 1 else detail)
        torch.testing.assert_close(a.norm(dim=1), expected, rtol=1e-6, atol=1e-6)
    assert (moved - z[:1]).abs().max() > 0.1  # and it did move


def test_cli_names_the_alpha_that_diverged(run_dir, capsys):
    from glowflow.cli import main

    run, folder = run_dir
    model = Glow.from_pretrained(run)
    huge = latent.Directions(("huge",), _overflowing_direction(model).float()[None], (1,), (1,), ("",))
    latent.save_directions(huge, run)
    assert main(["manipulate", str(run), str(folder / "0.png"), "--attribute", "huge", "--alphas", "0,1",
                 "--raw", "--out", str(run.parent / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "alpha 1" in err and "not finite" in err and not (run.parent / "s.png").exists()


def test_manipulate_takes_several_images_one_row_each_and_keeps_other_directions(run_dir, capsys):
    from PIL import Image

    from glowflow.cli import main

    run, folder = run_dir
    model = Glow.from_pretrained(run)
    g = torch.Generator().manual_seed(4)
    both = latent.Directions(("a", "b"), 0.3 * torch.randn(2, model.num_dims, generator=g), (1, 1), (1, 1), ("", ""))
    latent.save_directions(both, run)
    out = run.parent / "rows.png"
    assert main(["manipulate", str(run), str(folder / "0.png"), str(folder / "1.png"), str(folder / "2.png"),
                 "--attribute", "a", "--keep", "b", "--alphas", "-1,0,1", "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(result["images"]) == 3
    assert Image.open(out).size == (3 * 8 + 4 * 2, 3 * 8 + 4 * 2)  # three rows of three, 2-pixel padding
    kept = both.conditioned("a", ["b"])
    assert abs(float(kept @ both["b"])) < 1e-4 * float(both["b"].norm()) ** 2
    x = load_image(folder / "0.png", SHAPE).float()
    assert not torch.allclose(latent.manipulate(model, x, kept, [-1.0, 1.0]),
                              latent.manipulate(model, x, both["a"], [-1.0, 1.0]))


def test_the_valid_alpha_range_stops_where_edits_stop_decoding(run_dir, monkeypatch):
    run, folder = run_dir
    model = Glow.from_pretrained(run)
    x = torch.stack([load_image(folder / f"{i}.png", SHAPE) for i in range(4)])
    d = 1e-3 * torch.randn(model.num_dims, generator=torch.Generator().manual_seed(0))
    assert latent.valid_alpha_range(model, x, d, alpha_max=1.5) == (-1.5, 1.5)
    assert latent.valid_alpha_range(model, x, d, alpha_max=0.6) == (-0.5, 0.5)
    seen, limit = [], {"alpha": 1.0}
    real_edit, real_decode = latent.edited_latents, latent.decode_latents

    def edit(model_, z0, direction, alpha, stable=True):
        seen.append(abs(float(alpha)))
        return real_edit(model_, z0, direction, alpha, stable)

    def decode(model_, eps, y=None, stable=True, source=None):  # every edit past the limit "breaks"
        images, failed = real_decode(model_, eps, y, stable, source)
        return images, list(range(len(eps))) if seen[-1] > limit["alpha"] else failed

    monkeypatch.setattr(editing, "edited_latents", edit)
    monkeypatch.setattr(editing, "decode_latents", decode)
    assert latent.valid_alpha_range(model, x, d) == (-1.0, 1.0)
    limit["alpha"] = 0.0  # nothing decodes: the slider still moves one step
    assert latent.valid_alpha_range(model, x, d) == (-latent.ALPHA_STEPS[0], latent.ALPHA_STEPS[0])


def test_one_load_directions_for_the_library_the_command_line_and_the_demo():
    from glowflow import directions
    from glowflow.cli import demo as cli_demo
    assert cli_edit.load_directions is directions.load_directions is cli_demo.load_directions
    assert latent.load_directions is directions.load_directions
    with pytest.raises(ValueError, match="a directory or a checkpoint"):
        directions.load_directions()


def test_directions_computed_with_other_weights_warn(run_dir, capsys):
    from glowflow import directions
    run, folder = run_dir
    assert run_cli(["directions", run, "--attributes", folder / "attrs.csv"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        directions.load_directions(checkpoint=run)  # the same weights: no warning
    saved, _ = directions.load_directions(run)
    directions.save_directions(saved, run, weights_sha="0" * 64)
    with pytest.warns(UserWarning, match="computed with other weights"):
        directions.load_directions(checkpoint=run)


def test_latent_re_exports_each_name_from_its_one_home():
    from glowflow import directions
    from glowflow.data import attributes
    homes = (editing, directions, attributes)
    for name in latent.__all__:
        owners = [m for m in homes if name in m.__all__]
        assert len(owners) == 1, name
        assert getattr(latent, name) is getattr(owners[0], name), name
