"""benchmarks/edits.py runs end to end on a tiny model and made-up Fashion-MNIST files, and its
numbers are what they claim to be (fractions, one cell per estimator, N and alpha)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from glowflow import Glow
from glowflow.estimators import ESTIMATORS

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "edits.py"


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture
def fashion(tmp_path):
    """30 training and 12 test images per class: a block whose height and brightness follow the class."""
    root = tmp_path / "fmnist"
    root.mkdir()
    g = np.random.default_rng(0)
    for prefix, per_class in (("train", 30), ("t10k", 12)):
        labels = np.repeat(np.arange(10), per_class)
        x = np.zeros((len(labels), 28, 28), np.uint8)
        for i, k in enumerate(labels):
            x[i, 4:6 + 2 * k, 8:20] = 60 + 18 * k + g.integers(0, 20)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_the_edits_benchmark_runs_and_reports_fractions(tmp_path, fashion, capsys):
    spec = importlib.util.spec_from_file_location("glowflow_edits_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = Glow(image_shape=(1, 28, 28), levels=2, steps=1, hidden_channels=8)
    model.initialize(torch.rand(64, 1, 28, 28))
    model.save_pretrained(tmp_path / "run")
    out = tmp_path / "edits.json"
    assert module.main([str(tmp_path / "run"), "--data", str(fashion), "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    estimators = {n for n in ESTIMATORS if not ESTIMATORS[n].needs_groups}
    cells = result["class_transfer"]
    assert {c["estimator"] for c in cells} == estimators and {c["alpha"] for c in cells} == {-1.0, -0.5, 0.5, 1.0}
    for c in cells:
        assert 0 <= c["success"] <= c["valid"] <= 1 and c["n"] == 10
    assert {r["variant"] for r in result["ablation_n30_alpha1"]} >= {"default"}
    assert 0 <= result["judge_test_accuracy"] <= 1
