"""Out-of-distribution detection: the metrics on hand-checkable cases, the detectors against a direct
computation on a tiny model, ``glowflow ood``, the background model's pixel perturbation, and the
mnist-5k CSV loader."""
from __future__ import annotations

import gzip
import io
import json
import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from glowflow import Glow
from glowflow.cli import main
from glowflow.config import TrainConfig
from glowflow.data import ImageDataset, get_dataset
from glowflow.data.mnist_csv import MNIST_5K_FILE, load_mnist_csv
from glowflow.distributed import DistInfo
from glowflow.numerics import to_unit
from glowflow.ood import (aupr, auroc, compressed_bits_per_dim, complexity_scores, detection_metrics, fpr_at_tpr,
                          likelihood_ratio_scores, run_ood, typicality_scores)
from glowflow.train import Trainer, batch_indices

SHAPE = (1, 8, 8)


# ----------------------------------------------------------------------------------- metrics
def test_separated_identical_and_reversed_sets():
    low, high = [0.1, 0.2, 0.3], [1.0, 2.0, 3.0, 4.0]
    assert auroc(low, high) == 1.0 and aupr(low, high) == 1.0 and fpr_at_tpr(low, high) == 0.0
    assert auroc(high, low) == 0.0 and fpr_at_tpr(high, low) == 1.0
    many = np.random.default_rng(0).random(997)
    assert aupr(many, many + 1.0) == 1.0 and auroc(many, many + 1.0) == 1.0  # exactly, not 1 + rounding
    same = [0.5, 1.5, 2.5, 3.5]
    assert auroc(same, same) == 0.5
    assert auroc([7.0] * 5, [7.0] * 3) == 0.5  # all tied: chance
    assert aupr([7.0] * 5, [7.0] * 3) == pytest.approx(3 / 8)  # all flagged at once: precision = OOD share


def test_metrics_on_a_small_example_computed_by_hand():
    # in: 1 2 3 4; out: 2.5 5 6. Pairs out > in: 2.5 beats 2, 5 and 6 beat 4 each: 10 of 12.
    s_in, s_out = [1.0, 2.0, 3.0, 4.0], [2.5, 5.0, 6.0]
    assert auroc(s_in, s_out) == pytest.approx(10 / 12)
    # thresholds high to low: 6 (P 1, recall +1/3), 5 (P 1, +1/3), 4, 3 (no recall), 2.5 (P 3/5, +1/3)
    assert aupr(s_in, s_out) == pytest.approx(1 / 3 + 1 / 3 + (3 / 5) / 3)
    # 95% of 3 OOD inputs is all 3: threshold 2.5 flags the in-scores 3 and 4
    assert fpr_at_tpr(s_in, s_out) == 0.5
    assert fpr_at_tpr(s_in, s_out, tpr=0.6) == 0.0  # 2 of 3 at threshold 5
    assert detection_metrics(s_in, s_out) == {"auroc": pytest.approx(10 / 12), "aupr": pytest.approx(13 / 15),
                                              "fpr95": 0.5}


def test_ties_count_one_half_and_form_one_threshold():
    s_in, s_out = [1.0, 2.0, 2.0], [2.0, 3.0]
    # out 2 beats in 1 and ties the two 2s (1 + 0.5 + 0.5); out 3 beats all three: 5 of 6
    assert auroc(s_in, s_out) == pytest.approx(5 / 6)
    # thresholds 3 (P 1, recall +1/2), 2 (flags 2 out and 2 in: P 1/2, +1/2)
    assert aupr(s_in, s_out) == pytest.approx(0.5 + 0.25)
    assert fpr_at_tpr(s_in, s_out) == pytest.approx(2 / 3)  # threshold 2 flags both tied in-scores
    # the count of pairs stays exact with many ties
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 200), rng.integers(1, 5, 150)
    brute = ((b[None, :] > a[:, None]).sum() + 0.5 * (b[None, :] == a[:, None]).sum()) / (a.size * b.size)
    assert auroc(a, b) == pytest.approx(brute, abs=1e-12)


def test_metrics_refuse_empty_or_non_finite_scores():
    with pytest.raises(ValueError, match="both sets"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        aupr([1.0, float("nan")], [2.0])


# ----------------------------------------------------------------------------------- scores
def test_typicality_is_the_distance_of_group_means_from_the_typical_value():
    bpd = np.array([1.0, 3.0, 2.0, 6.0, 5.0])
    assert typicality_scores(bpd, 2.0, 1).tolist() == [1.0, 1.0, 0.0, 4.0, 3.0]
    assert typicality_scores(bpd, 2.0, 2).tolist() == [0.0, 2.0]  # groups (1, 3), (2, 6); the 5 is left out
    shuffled = typicality_scores(bpd, 2.0, 5, torch.Generator().manual_seed(0))
    assert shuffled.tolist() == pytest.approx([1.4])  # one group of all five: mean 3.4
    with pytest.raises(ValueError, match="M = 6"):
        typicality_scores(bpd, 2.0, 6)


def _png_bits_per_dim(image: torch.Tensor) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy(), "L").save(buffer, format="PNG", optimize=True)
    return 8 * len(buffer.getvalue()) / image.numel()


def test_complexity_is_bits_per_dim_minus_the_compressed_size():
    flat = torch.full((1, 1, 8, 8), 100, dtype=torch.uint8)
    noisy = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images = torch.cat([flat, noisy])
    png = compressed_bits_per_dim(images, "png")
    assert png.tolist() == pytest.approx([_png_bits_per_dim(flat[0]), _png_bits_per_dim(noisy[0])])
    assert png[0] < png[1]  # a constant image compresses far better than noise
    assert compressed_bits_per_dim(images, "zlib")[1] == 8 * len(zlib.compress(noisy.numpy().tobytes(), 9)) / 64
    assert complexity_scores([5.0, 9.0], images).tolist() == pytest.approx([5.0 - png[0], 9.0 - png[1]])
    assert likelihood_ratio_scores([3.0, 4.0], [2.5, 5.0]).tolist() == [0.5, -1.0]
    with pytest.raises(ValueError, match="compressor"):
        compressed_bits_per_dim(images, "flif")


@pytest.fixture
def tiny(perturb_zero_init):
    def make(seed):
        m = Glow(image_shape=SHAPE, levels=2, steps=1, hidden_channels=4, seed=seed)
        perturb_zero_init(m, seed=seed)
        m.initialize(torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(seed)))
        return m.eval()
    return make


def _sets(tmp_path):
    g = torch.Generator().manual_seed(0)
    smooth = (torch.rand(12, 1, 1, 1, generator=g) * 100 + 60).expand(12, *SHAPE)
    sets = {"in": (smooth + torch.rand(12, *SHAPE, generator=g) * 40).to(torch.uint8),
            "ref": (smooth[:10] + torch.rand(10, *SHAPE, generator=g) * 40).to(torch.uint8),
            "out": torch.randint(0, 256, (10, *SHAPE), generator=g, dtype=torch.uint8)}
    paths = {}
    for name, x in sets.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], x.numpy())
    return sets, paths


def _bpd(model, x, seed):
    with torch.no_grad():
        noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
        return model.bits_per_dim(to_unit(x), noise=noise).double().numpy()


def test_run_ood_scores_match_a_direct_computation_on_a_tiny_model(tiny, tmp_path):
    model, background = tiny(0), tiny(1)
    sets, paths = _sets(tmp_path)
    report = run_ood(model, paths["in"], [paths["out"]], background=background, reference=paths["ref"],
                     typicality_m=(1, 3), compressors=("png", "lzma"), seed=2)
    b = {k: _bpd(model, x, 2) for k, x in sets.items()}
    typical = b["ref"].mean()
    assert report.typical_bits_per_dim == pytest.approx(typical, abs=1e-9)
    for s in ("in", "out"):
        got = report.scores
        assert got["likelihood"][paths[s]] == pytest.approx(b[s], abs=1e-9)
        assert got["typicality_m1"][paths[s]] == pytest.approx(np.abs(b[s] - typical), abs=1e-9)
        perm = torch.randperm(b[s].size, generator=torch.Generator().manual_seed(2)).numpy()
        groups = b[s][perm][:b[s].size // 3 * 3].reshape(-1, 3).mean(1)
        assert got["typicality_m3"][paths[s]] == pytest.approx(np.abs(groups - typical), abs=1e-9)
        png = np.array([_png_bits_per_dim(x) for x in sets[s]])
        assert got["complexity_png"][paths[s]] == pytest.approx(b[s] - png, abs=1e-9)
        assert got["likelihood_ratio"][paths[s]] == pytest.approx(b[s] - _bpd(background, sets[s], 2), abs=1e-9)
    rows = {r["score"]: r for r in report.metrics}
    assert set(rows) == {"likelihood", "typicality_m1", "typicality_m3", "complexity_png", "complexity_lzma",
                         "likelihood_ratio"}
    assert rows["typicality_m3"]["n_in"] == 4 and rows["typicality_m3"]["n_out"] == 3
    assert rows["likelihood"]["auroc"] == pytest.approx(auroc(b["in"], b["out"]))
    s_in, s_out = (b[s] - np.array([_png_bits_per_dim(x) for x in sets[s]]) for s in ("in", "out"))
    assert rows["complexity_png"]["fpr95"] == pytest.approx(fpr_at_tpr(s_in, s_out))


def test_cli_ood_writes_the_report(tiny, tmp_path, capsys):
    model = tiny(0)
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    tiny(1).save_pretrained(tmp_path / "background")
    _, paths = _sets(tmp_path)
    report = tmp_path / "report"
    code = main(["ood", str(tmp_path / "run"), "--in", paths["in"], "--ood", paths["out"], "--ood", "noise:8",
                 "--ood", "constant:8", "--reference", paths["ref"], "--background", str(tmp_path / "background"),
                 "--typicality-m", "1,2", "--out", str(report), "--json", "--no-progress"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["out"] == [paths["out"], "noise:8", "constant:8"]
    assert len(result["metrics"]) == 5 * 3 and result["sets"]["noise:8"]["images"] == 8
    assert json.loads((report / "results.json").read_text())["metrics"] == result["metrics"]
    table = (report / "table.md").read_text()
    assert "| typicality, M = 2 (Nalisnick et al.) |" in table and "`constant:8`" in table
    with Image.open(report / "histogram.png") as picture:
        assert picture.size == (1200, 720)
    # without typicality there is no reference to find; a bad set is one line and status 2
    assert main(["ood", str(tmp_path / "run"), "--in", paths["in"], "--out", str(tmp_path / "none"),
                 "--reference", paths["ref"]]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_typicality_needs_a_reference_for_a_set_without_a_training_split(tiny, tmp_path):
    _, paths = _sets(tmp_path)
    with pytest.raises(ValueError, match="--reference"):
        run_ood(tiny(0), paths["in"], [paths["out"]])
    report = run_ood(tiny(0), paths["in"], [paths["out"]], typicality_m=())  # the other scores need none
    assert {r["score"] for r in report.metrics} == {"likelihood", "complexity_png"} and report.reference is None


# ----------------------------------------------------------------------------------- perturbation
def _trainer(tmp_path, **kw) -> Trainer:
    g = np.random.default_rng(0)
    data = ImageDataset(torch.from_numpy(g.integers(0, 40, (256, 1, 8, 8), dtype=np.uint8)))
    cfg = TrainConfig.from_dict(dict(model=dict(image_shape=[1, 8, 8], levels=2, steps=1, hidden_channels=4),
                                     batch_size=64, init_batch_size=64, max_steps=2, progress=False, device="cpu",
                                     **kw))
    return Trainer(cfg, tmp_path / ("_".join(f"{k}{v}" for k, v in kw.items()) or "plain"), data, None,
                   log=lambda *a: None)


def test_perturbation_replaces_about_mu_of_the_pixels_by_uniform_values(tmp_path):
    plain = _trainer(tmp_path)  # perturb_rate 0: the batch is the dataset's rows as they are
    assert torch.equal(plain.global_batch(3)[0], to_unit(plain.train_data.batch(batch_indices(256, 64, 3, 0))))
    t = _trainer(tmp_path, perturb_rate=0.25)
    clean, x = plain.global_batch(3)[0], t.global_batch(3)[0]
    changed = (x != clean).double().mean().item()
    # pixels replaced with probability 0.25, by a value other than their own with 255/256 or so
    # (the clean images are < 40, so a replacement keeps its value with probability 1/256): over
    # 64 x 64 pixels the share lies within 4 standard deviations of 0.25 * 255/256
    p = 0.25 * 255 / 256
    assert abs(changed - p) < 4 * math.sqrt(p * (1 - p) / x.numel())
    new = x[x != clean]
    assert torch.equal(new * 255, (new * 255).round()) and new.max() > 200 / 255  # 8-bit values, spread over 0..255
    assert torch.equal(t.global_batch(3)[0], x)  # the same step draws the same pixels
    assert not torch.equal(t.global_batch(4)[0] != plain.global_batch(4)[0], x != clean)  # another step, others
    assert torch.equal(t.global_batch(3)[2], plain.global_batch(3)[2])  # the dequantisation noise is untouched
    for rank in (0, 1):
        t.dist = DistInfo(rank=rank, world_size=2)
        assert torch.equal(t.global_batch(3)[0], x[32 * rank:32 * rank + 32])  # ranks slice the global batch


def test_perturb_rate_is_a_probability():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="perturb_rate must be in"):
            TrainConfig(perturb_rate=bad)


# ----------------------------------------------------------------------------------- mnist-5k
def _write_csv(path, rows):
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")


def test_mnist_csv_rows_load_as_images_and_labels(tmp_path):
    pixels = np.arange(784) % 256
    _write_csv(tmp_path / MNIST_5K_FILE, [[*pixels, 3], [*(255 - pixels), 9]])
    ds = get_dataset("mnist-5k", tmp_path, "test")
    assert ds.images.shape == (2, 1, 28, 28) and ds.labels.tolist() == [3, 9]
    assert ds.images[0, 0, 0, :3].tolist() == [0, 1, 2] and ds.images[0, 0, 1, 0] == 28  # row by row
    assert ds.images[1, 0, 0, 0] == 255
    assert len(get_dataset("mnist-5k", tmp_path, "test", limit=1)) == 1
    with pytest.raises(ValueError, match="no train split"):
        get_dataset("mnist-5k", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="glowflow download --dataset mnist-5k"):
        get_dataset("mnist-5k", tmp_path / "empty", "test")


@pytest.mark.parametrize("row, message", [
    ([0] * 784, r"line 2: expected 785 comma-separated values \(784 pixels then the label\), got 784"),
    ([0] * 10 + [256] + [0] * 773 + [1], r"line 2, column 11: pixel values lie in 0..255, got 256"),
    ([0] * 784 + [10], r"line 2: the label \(the last value\) lies in 0..9, got 10"),
    ([0] * 5 + ["x"] + [0] * 778 + [1], r"line 2, column 6: expected an integer, got 'x'"),
])
def test_bad_mnist_csv_rows_name_the_line(tmp_path, row, message):
    _write_csv(tmp_path / "m.csv.gz", [[0] * 785, row])
    with pytest.raises(ValueError, match=message):
        load_mnist_csv(tmp_path / "m.csv.gz")
