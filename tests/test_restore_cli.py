"""``glowflow restore`` end to end on a tiny model: the files it writes, the scores it prints,
and the clear errors of flags that do not fit the task."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from glowflow.cli import main
from glowflow.images import save_grid
from glowflow.restore import DEFAULT_DENOISE_SHIFT
from conftest import awake_glow

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("restore")
    g = torch.Generator().manual_seed(0)
    model = awake_glow(SHAPE, 0.25 + 0.5 * torch.rand(16, *SHAPE, generator=g))
    model.save_pretrained(root / "model")
    for i in range(2):
        save_grid(0.3 + 0.4 * torch.rand(1, *SHAPE, generator=g), root / f"face{i}.png", padding=0)
    save_grid(torch.rand(1, 1, 8, 8, generator=g), root / "small.png", padding=0)
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 4:9, 3:12] = 1  # white: missing
    save_grid(hole, root / "hole.png", padding=0)
    return root


def _run(capsys, *argv):
    code = main(["restore", "--iterations", "2", "--samples", "2", "--no-progress", "--json", *map(str, argv)])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err)


def test_degrade_restore_and_score_writes_images_and_a_strip(setup, capsys):
    out = setup / "denoised"
    code, result = _run(capsys, setup / "model", setup / "face0.png", setup / "face1.png", "--task", "denoise",
                        "--degrade", "--noise", "0.1", "--scale", "3", "--out", out)
    assert code == 0
    assert result["columns"] == ["observation", "restored", "uncertainty", "original"]
    for row in result["images"]:
        assert Image.open(row["restored"]).size == (16, 16)
        assert 5 < row["psnr_db"] < 60 and -1 <= row["ssim"] <= 1 and row["mean_std"] > 0
    # two rows of four images, each 3x enlarged, 2 pixels apart
    assert Image.open(out / "strip.png").size == (2 + 4 * (48 + 2), 2 + 2 * (48 + 2))
    assert (out / "face1-observed.png").is_file()
    again = _run(capsys, setup / "model", setup / "face0.png", setup / "face1.png", "--task", "denoise",
                 "--degrade", "--noise", "0.1", "--scale", "3", "--out", out)[1]
    assert again["images"] == result["images"]  # seeded: the same run gives the same numbers


def test_observations_are_read_at_the_operators_size(setup, capsys):
    code, result = _run(capsys, setup / "model", setup / "small.png", "--task", "superres", "--factor", "2",
                        "--out", setup / "sr", "--samples", "0")
    assert code == 0 and result["columns"] == ["observation", "restored"]
    assert Image.open(result["images"][0]["restored"]).size == (16, 16)
    code, result = _run(capsys, setup / "model", setup / "face0.png", "--task", "inpaint", "--mask",
                        setup / "hole.png", "--degrade", "--out", setup / "inp")
    assert code == 0
    seen = torch.tensor(list(Image.open(setup / "inp" / "face0-observed.png").getdata())).view(16, 16)
    assert (seen[4:9, 3:12] == 0).all() and (seen[:4] > 0).all()  # the mask's white part is what is missing


@pytest.mark.parametrize("flags,message", [
    (["--task", "cs"], "pass --degrade"),
    (["--task", "inpaint"], "--mask PNG"),
    (["--task", "denoise", "--region", "eyes"], "for --task inpaint"),
    (["--task", "superres", "--factor", "3"], "must divide"),
    (["--task", "deblur", "--blur", "0"], "blur"),
    (["--task", "denoise", "--noise", "2"], "noise level"),
    (["--task", "denoise", "--degrade", "--shift", "1"], "the MAP estimate takes --views"),
    (["--task", "inpaint", "--region", "centre", "--fraction", "1.5"], "fraction"),
])
def test_flags_that_do_not_fit_are_refused_clearly(setup, capsys, flags, message):
    try:
        code, err = _run(capsys, setup / "model", setup / "face0.png", *flags, "--out", setup / "bad")
    except SystemExit as e:  # refused by the parser itself
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and message in err, err


def test_a_model_of_noisy_images_denoises_by_tweedie_and_refuses_other_tasks(setup, capsys):
    from glowflow import Glow
    g = torch.Generator().manual_seed(1)
    model = Glow(image_shape=SHAPE, levels=2, steps=2, hidden_channels=8, noise_std=0.1)
    model.initialize(0.25 + 0.5 * torch.rand(16, *SHAPE, generator=g))
    model.save_pretrained(setup / "noisy-model")

    def run(*argv):
        code = main(["restore", str(setup / "noisy-model"), str(setup / "face0.png"), "--no-progress", "--json",
                     "--out", str(setup / "tweedie"), *argv])
        captured = capsys.readouterr()
        return code, (json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err)

    code, result = run("--task", "denoise", "--degrade")
    assert code == 0, result
    assert result["method"] == "posterior mean (Tweedie)" and result["noise"] == 0.1
    assert result["shift"] == DEFAULT_DENOISE_SHIFT == 2 and result["mirror"] and "views" not in result
    assert result["columns"] == ["observation", "restored", "original"] and "gamma" not in result
    assert 5 < result["images"][0]["psnr_db"] < 60
    code, err = run("--task", "inpaint", "--region", "eyes", "--degrade")
    assert code != 0 and "denoises only" in err
    code, err = run("--task", "denoise", "--degrade", "--samples", "4")
    assert code != 0 and "posterior samples need a model of clean images" in err
    code, err = run("--task", "denoise", "--degrade", "--noise", "0.2")
    assert code != 0 and "cannot denoise noisier" in err
    code, err = run("--task", "denoise", "--degrade", "--views", "2")
    assert code != 0 and "--shift" in err
    code, result = run("--task", "denoise", "--degrade", "--shift", "0", "--no-mirror")
    assert code == 0 and result["shift"] == 0 and not result["mirror"]
