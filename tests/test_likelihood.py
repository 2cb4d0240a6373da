"""Per-image scores: ``score`` is ``model.bits_per_dim`` on the same noise; ``score_inputs`` reads
files, folders, arrays, dataset splits and synthetic sets, reports what it cannot read and scores
the rest; ``glowflow score`` writes JSON and CSV."""
from __future__ import annotations

import csv
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch

from glowflow import Glow
from glowflow.cli import main
from glowflow.images import read_image, save_grid
from glowflow.inputs import DEFAULT_SYNTHETIC_COUNT, SetName, evenly_spaced, limited, load_input, parse_set
from glowflow.likelihood import (SCORE_COLUMNS, describe_outliers, score, score_inputs, summarize_bits_per_dim,
                                 summarize_rows)
from glowflow.numerics import to_unit

SHAPE = (1, 8, 8)


@pytest.fixture
def model(perturb_zero_init):
    m = Glow(image_shape=SHAPE, levels=2, steps=1, hidden_channels=4)
    perturb_zero_init(m)
    m.initialize(torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0)))
    return m.eval()


def uint8_images(n: int, seed: int = 1, shape=SHAPE) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fashion_root(tmp_path):
    """A fake Fashion-MNIST of 8x8 images: 12 test and 20 train images with labels."""
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("t10k", 12), ("train", 20)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", uint8_images(n, seed=n)[:, 0].numpy())
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


# ----------------------------------------------------------------------------------- score
def test_score_equals_bits_per_dim_on_the_same_images_and_noise(model):
    x = uint8_images(10)
    res = score(model, x, seed=3)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.bits_per_dim(to_unit(x), noise=noise).double()
        expected_logp = model(to_unit(x), noise=noise).log_prob.double()
    assert torch.allclose(res["bits_per_dim"], expected, rtol=0, atol=1e-6)
    assert torch.allclose(res["log_prob"], expected_logp, rtol=0, atol=1e-3)
    # bits/dim is the discrete log-likelihood of the log-density, per dimension, in bits
    d = math.prod(SHAPE)
    assert torch.allclose(res["bits_per_dim"], -(res["log_prob"] - d * math.log(256)) / (d * math.log(2)), atol=1e-5)
    assert not torch.allclose(score(model, x, seed=4)["bits_per_dim"], res["bits_per_dim"])  # the noise matters


def test_score_in_batches_and_over_draws_averages_the_draws_of_one_generator(model):
    x = uint8_images(6)
    res = score(model, x, batch_size=4, seed=5, draws=2)
    gen = torch.Generator().manual_seed(5)
    expected = []
    with torch.no_grad():
        for batch in (x[:4], x[4:]):
            draws = [model.bits_per_dim(to_unit(batch), noise=torch.rand(batch.shape, generator=gen)) for _ in range(2)]
            expected.append((draws[0].double() + draws[1].double()) / 2)
    assert torch.allclose(res["bits_per_dim"], torch.cat(expected), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- inputs
def test_set_names_parse_and_paths_are_not_sets():
    assert parse_set("fashion-mnist:test") == SetName("dataset", "fashion-mnist", "test")
    assert parse_set("mnist-5k") == SetName("dataset", "mnist-5k", "test")
    assert parse_set("FashionMNIST:inverted") == SetName("dataset", "fashion-mnist", "inverted")
    assert parse_set("noise") == SetName("synthetic", "noise", count=DEFAULT_SYNTHETIC_COUNT)
    assert parse_set("constant:7") == SetName("synthetic", "constant", count=7)
    assert parse_set("fashion-mnist:flipped").split == "test"
    for path in ("./noise", "pics/a.png", "folder", "x.npy"):
        assert parse_set(path) is None
    with pytest.raises(ValueError, match="split"):
        parse_set("mnist:validation")
    with pytest.raises(ValueError, match="positive integer"):
        parse_set("noise:0")


def test_a_limit_keeps_the_first_n_or_with_spread_n_evenly_spaced():
    assert limited(10, 3).tolist() == [0, 1, 2] and limited(10, None).tolist() == list(range(10))
    assert limited(10, 5, spread=True).tolist() == [0, 2, 4, 6, 8] and limited(3, 9).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        limited(10, 0)


def test_evenly_spaced_spreads_over_the_whole_set():
    assert evenly_spaced(10, 5).tolist() == [0, 2, 4, 6, 8]
    assert evenly_spaced(5000, 10).tolist() == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 4500]
    assert evenly_spaced(3, None).tolist() == [0, 1, 2] and evenly_spaced(3, 9).tolist() == [0, 1, 2]


def test_synthetic_sets_are_seeded_and_of_the_model_shape():
    noise = load_input("noise:5", SHAPE, seed=2)
    assert noise.images.shape == (5, *SHAPE) and noise.images.dtype == torch.uint8
    assert torch.equal(noise.images, load_input("noise:5", SHAPE, seed=2).images)
    assert not torch.equal(noise.images, load_input("noise:5", SHAPE, seed=3).images)
    constant = load_input("constant:6", (3, 4, 4), seed=0)
    flat = constant.images.flatten(1)
    assert (flat == flat[:, :1]).all() and len(set(flat[:, 0].tolist())) > 1  # one value per image, not one for all
    assert len(load_input("noise", SHAPE, limit=4)) == 4


def test_dataset_splits_and_their_changes(fashion_root):
    roots = {"fashion-mnist": str(fashion_root)}
    test = load_input("fashion-mnist:test", SHAPE, roots)
    assert len(test) == 12 and test.names[3] == "fashion-mnist:test[3]" and test.labels.tolist()[:3] == [0, 1, 2]
    assert len(load_input("fashion-mnist:train", SHAPE, roots)) == 20
    inverted = load_input("fashion-mnist:inverted", SHAPE, roots)
    flipped = load_input("fashion-mnist:flipped", SHAPE, roots)
    assert torch.equal(inverted.images.int(), 255 - test.images.int())
    assert torch.equal(flipped.images.flip(2), test.images)  # upside down: rows reversed
    assert torch.equal(flipped.images[0, 0, 0], test.images[0, 0, -1])
    subset = load_input("fashion-mnist", SHAPE, roots, limit=4)
    assert subset.names == [f"fashion-mnist[{i}]" for i in (0, 1, 2, 3)]
    spread = load_input("fashion-mnist", SHAPE, roots, limit=4, spread=True)
    assert spread.names == [f"fashion-mnist[{i}]" for i in (0, 3, 6, 9)]
    bigger = load_input("fashion-mnist", (3, 16, 16), roots)
    assert bigger.images.shape == (12, 3, 16, 16) and "converted from 1x8x8 to 3x16x16" in bigger.notes[0]


def test_arrays_of_uint8_and_of_floats_in_unit_range_read_the_same(tmp_path):
    x = uint8_images(3)
    np.save(tmp_path / "u8.npy", x.numpy())
    np.save(tmp_path / "f.npy", (x.double() / 255).numpy())
    np.save(tmp_path / "one.npy", x[0].numpy())
    assert torch.equal(load_input(str(tmp_path / "u8.npy"), SHAPE).images, x)
    assert torch.equal(load_input(str(tmp_path / "f.npy"), SHAPE).images, x)
    assert torch.equal(load_input(str(tmp_path / "one.npy"), SHAPE).images, x[:1])
    np.save(tmp_path / "big.npy", np.full((2, 1, 8, 8), 1.5))
    np.save(tmp_path / "flat.npy", np.zeros((2, 64), np.uint8))
    np.savez(tmp_path / "z.npz", a=x.numpy())
    (tmp_path / "z.npz").rename(tmp_path / "z.npy")
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        load_input(str(tmp_path / "big.npy"), SHAPE)
    with pytest.raises(ValueError, match=r"shape \[2, 64\]; expected images \[N, C, H, W\]"):
        load_input(str(tmp_path / "flat.npy"), SHAPE)
    with pytest.raises(ValueError, match="npz"):
        load_input(str(tmp_path / "z.npy"), SHAPE)


def test_an_image_of_another_size_is_converted_and_says_so(tmp_path):
    big = uint8_images(1, shape=(3, 20, 12))
    save_grid(big, tmp_path / "rgb.png", padding=0)
    read = load_input(str(tmp_path / "rgb.png"), SHAPE)
    assert read.notes[0] == "resized from 12x20 to 8x8 (cover, centre crop); RGB converted to grey"
    assert np.array_equal(read.images[0].numpy(), read_image(tmp_path / "rgb.png", 1, (8, 8)))


def test_an_unreadable_file_is_reported_and_the_rest_are_scored(model, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    x = uint8_images(2)
    for i in range(2):
        save_grid(x[i:i + 1], folder / f"{i}.png", padding=0)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("skipped: not an image extension")
    np.save(tmp_path / "arr.npy", x.numpy())
    rows = score_inputs(model, [str(folder), "missing.png", str(tmp_path / "arr.npy")], seed=0)
    assert [r["name"] for r in rows] == [str(folder / "0.png"), str(folder / "1.png"), str(folder / "broken.png"),
                                        "missing.png", f"{tmp_path / 'arr.npy'}[0]", f"{tmp_path / 'arr.npy'}[1]"]
    assert all(set(r) == set(SCORE_COLUMNS) for r in rows)
    broken, missing = rows[2], rows[3]
    assert "not a readable image" in broken["error"] and broken["bits_per_dim"] is None
    assert "no such file or folder" in missing["error"] and missing["log_prob"] is None
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == 4 and all(math.isfinite(r["bits_per_dim"]) for r in scored)
    # the folder's images and the array are the same images with the same noise: the same scores
    assert rows[0]["bits_per_dim"] == pytest.approx(rows[4]["bits_per_dim"], abs=1e-9)
    expected = score(model, x, seed=0)["bits_per_dim"].tolist()
    assert [r["bits_per_dim"] for r in rows[4:]] == pytest.approx(expected, abs=1e-9)
    summary = summarize_rows(rows)
    assert [(s["input"], s["num_images"], s["errors"]) for s in summary] == [
        (str(folder), 2, 1), ("missing.png", 0, 1), (str(tmp_path / "arr.npy"), 2, 0)]


# ----------------------------------------------------------------------------------- CLI
@pytest.fixture
def run_dir(tmp_path, model):
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    return tmp_path / "run"


def test_cli_score_prints_json_and_writes_csv(run_dir, tmp_path, fashion_root, capsys):
    x = uint8_images(3)
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    out_csv = tmp_path / "scores.csv"
    code = main(["score", str(run_dir), str(tmp_path / "x.npy"), str(tmp_path / "bad.png"), "fashion-mnist:test",
                 "noise:2", "mnist:tset", "--data", f"fashion-mnist={fashion_root}", "--out", str(out_csv), "--json",
                 "--no-progress", "--seed", "1"])
    captured = capsys.readouterr()
    assert code == 0 and "not scored" in captured.err and "bad.png" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["scored"] == 3 + 12 + 2 and result["errors"] == 2 and "mnist:tset: after mnist:" in captured.err
    assert [s["num_images"] for s in result["inputs"]] == [3, 0, 12, 2, 0]
    expected = score(model=Glow.from_pretrained(run_dir), images=x, seed=1)["bits_per_dim"].tolist()
    assert [r["bits_per_dim"] for r in result["rows"][:3]] == pytest.approx(expected, abs=1e-9)
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == SCORE_COLUMNS and len(table) == len(result["rows"])
    assert float(table[0]["bits_per_dim"]) == result["rows"][0]["bits_per_dim"]  # written without rounding
    bad = next(r for r in table if r["error"] and r["input"].endswith("bad.png"))
    assert bad["bits_per_dim"] == "" and "bad.png" in bad["name"]


def test_cli_score_readable_output_and_nothing_scorable(run_dir, tmp_path, capsys):
    np.save(tmp_path / "x.npy", uint8_images(2).numpy())
    assert main(["score", str(run_dir), str(tmp_path / "x.npy"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("name\tbits_per_dim\tlog_prob_nats\tnote\n") and "mean bits/dim" in out
    assert main(["score", str(run_dir), str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err
    assert "nothing could be scored" in err and "Traceback" not in err


def test_summary_counts_outliers_and_gives_the_mean_without_them():
    s = summarize_bits_per_dim(torch.tensor([3.0, 3.0, 4.0, 3.0, 1000.0], dtype=torch.float64))
    assert s["num_images"] == 5 and s["bits_per_dim"] == pytest.approx(1013.0 / 5)
    assert s["bits_per_dim_median"] == 3.0 and s["outliers"] == 1
    assert s["bits_per_dim_without_outliers"] == pytest.approx(13.0 / 4)
    text = describe_outliers(s["outliers"], s["num_images"], s["bits_per_dim_median"],
                             s["bits_per_dim_without_outliers"])
    assert text == "; 1 of 5 images score over 10x the median (3.0000), the mean of the others is 3.2500"
    # just under ten times the median is not an outlier: the mean is then the mean of all
    s = summarize_bits_per_dim(torch.tensor([3.0, 29.9, 3.0], dtype=torch.float64))
    assert s["outliers"] == 0 and s["bits_per_dim_without_outliers"] == s["bits_per_dim"]
    assert describe_outliers(0, 3, 3.0, s["bits_per_dim"]) == ""
    s = summarize_bits_per_dim(torch.zeros(0, dtype=torch.float64))
    assert s["num_images"] == 0 and s["outliers"] == 0 and math.isnan(s["bits_per_dim"])
