"""Configuration: architecture-only GlowConfig, typed and bounded; old files still load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from glowflow import Glow, GlowConfig, TrainConfig
from glowflow.checkpoint import CheckpointError
from glowflow.config import MAX_FLOW_STEPS, build_train_config
from glowflow.couplings import Coupling
from glowflow.presets import apply_overrides

OLD_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint-v0.1"


@pytest.mark.parametrize("cfg", [
    dict(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=4),
    dict(image_shape=(3, 16, 16), levels=3, steps=1, hidden_channels=6, coupling="additive", permutation="reverse"),
    dict(image_shape=(1, 28, 28), levels=2, steps=3, hidden_channels=8, permutation="invconv_lu",
         split_prior="conv+position", num_classes=10),
    dict(image_shape=(3, 8, 8), levels=1, steps=2, hidden_channels=5, learn_top=False, permutation="shuffle"),
    dict(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=4, coupling="mixture",
         coupling_options={"components": 3}),
    dict(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=4, attention_levels=1, attention_heads=2),
    dict(image_shape=(3, 8, 8), levels=3, steps=1, hidden_channels=6, attention_levels=2, attention_heads=3),
    dict(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=4, gated_levels=1),
    dict(image_shape=(3, 8, 8), levels=3, steps=1, hidden_channels=6, gated_levels=3, attention_levels=1,
         attention_heads=2),
    dict(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4, dequantization="variational",
         dequant_hidden_channels=6, dequant_steps=3),
    dict(image_shape=(1, 8, 8), levels=2, steps=[1, 3], hidden_channels=[4, 7]),
    dict(image_shape=(3, 8, 8), levels=3, steps=[2, 1, 2], hidden_channels=[5, 6, 8], attention_levels=2,
         attention_heads=2, gated_levels=1),
])
def test_num_parameters_counts_what_the_model_builds(cfg):
    config = GlowConfig(**cfg)
    assert config.num_parameters() == sum(p.numel() for p in Glow(config=config).parameters())


@pytest.mark.parametrize("changes,message", [
    ({"hidden_channels": True}, "hidden_channels must be an integer"),
    ({"hidden_channels": 2.5}, "hidden_channels must be an integer"),
    ({"steps": "many"}, "steps must be a number"),
    ({"hidden_channels": 1e7}, "would need .* parameters"),
    ({"steps": 1e6}, "flow steps; the limit"),
    ({"image_shape": [1, 28]}, "image_shape must have 3 entries"),
    ({"learn_top": "yes"}, "learn_top must be true or false"),
    ({"coupling": "affin"}, "coupling must be one of"),
    ({"coupling": "mixture", "coupling_options": {"components": 0}}, "needs at least 1 component"),
    ({"coupling_options": {"components": 3}}, r"unknown options \['components'\] for coupling 'affine'"),
    ({"coupling": "mixture", "coupling_options": {"components": 2.5}}, "components must be an integer"),
    ({"conditioned_couplings": True}, "conditioned_couplings needs num_classes"),
    ({"attention_levels": 3}, "attention_levels must be an integer from 0 to levels"),
    ({"gated_levels": -1}, "gated_levels must be an integer from 0 to levels"),
    ({"gated_levels": True}, "gated_levels must be an integer"),
    ({"logit_alpha": 0.5}, r"logit_alpha must be a number in \[0, 0.5\)"),
    ({"logit_alpha": -0.01}, r"logit_alpha must be a number in \[0, 0.5\)"),
    ({"logit_alpha": True}, "logit_alpha must be a number"),
    ({"attention_levels": 1, "attention_heads": 3}, "attention_heads must be >= 1 and divide hidden_channels"),
    ({"steps": [1]}, r"steps must be an integer >= 1 or a list of 2 of them \(one per level"),
    ({"steps": [1, 2, 3]}, "steps must be an integer >= 1 or a list of 2"),
    ({"hidden_channels": [4, 0]}, "hidden_channels must be an integer >= 1 or a list of 2"),
    ({"hidden_channels": [4, True]}, r"hidden_channels\[1\] must be an integer"),
    ({"steps": [1, 1e6]}, "= 1000001 flow steps; the limit"),
    ({"hidden_channels": [4, 6], "attention_levels": 1, "attention_heads": 4},
     r"divide hidden_channels \(at the attention levels: \[6\]\)"),
])
def test_config_json_values_are_checked_before_anything_is_built(tmp_path, changes, message):
    d = {**GlowConfig(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4).to_dict(), **changes}
    with pytest.raises(ValueError, match=message):
        GlowConfig.from_dict(d)
    Glow(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="unchecked"), pytest.raises(CheckpointError, match=message):
        Glow.from_pretrained(tmp_path)
    assert MAX_FLOW_STEPS < 1e6


@pytest.mark.parametrize("changes,message", [
    ({"n_bits": 1.5}, "n_bits must be an integer, got 1.5"),
    ({"num_classes": 1.5}, "num_classes must be an integer, got 1.5"),
    ({"num_classes": 0}, r"num_classes must be in \[1, inf\)"),
    ({"seed": 2**64}, "seed must be an integer from 0 to"),
    ({"seed": -1}, "seed must be an integer from 0 to"),
    ({"image_shape": (1, 65536, 65536), "learn_top": False}, "values per image; the limit is"),
])
def test_python_arguments_are_checked_like_config_files(changes, message):
    """``Glow(...)`` skips the file parser; the config itself refuses what the parser would."""
    with pytest.raises(ValueError, match=message):
        Glow(**{**dict(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4), **changes})


@pytest.mark.parametrize("setting,message", [
    ("grad_clip=-1", r"grad_clip must be in \(0, inf\)"),  # gradient ascent
    ("grad_clip=0", r"grad_clip must be in \(0, inf\)"),  # no learning
    ("grad_clip=.nan", "grad_clip must be a finite number"),
    ("grad_clip=.inf", "grad_clip must be a finite number"),
    ("ema_decay=1", r"ema_decay must be in \[0, 1\)"),
    ("ema_decay=-0.5", r"ema_decay must be in \[0, 1\)"),
    ("lr_backoff=0", r"lr_backoff must be in \(0, 1\]"),
    ("lr_backoff=2", r"lr_backoff must be in \(0, 1\]"),
    ("augment_shift=28", "augment_shift must be smaller than the image side"),
    ("augment_shift=-1", r"augment_shift must be in \[0, inf\)"),
    ("warmup_steps=-5", r"warmup_steps must be in \[0, inf\)"),
    ("max_minutes=.inf", "max_minutes must be a finite number"),
    ("batch_size=1.5", "batch_size must be an integer"),
    ("seed=99999999999999999999", "seed must be an integer from 0 to"),
    ("lr=.nan", "lr must be a finite number"),
    ("class_loss_weight=.nan", "class_loss_weight must be a finite number"),
])
def test_every_numeric_training_setting_has_its_range_checked(setting, message):
    with pytest.raises(ValueError, match=message):
        build_train_config("fashion-mnist-cpu", [setting])


def test_steps_and_width_per_level(tmp_path):
    config = GlowConfig(image_shape=(1, 8, 8), levels=2, steps=[1, 3], hidden_channels=[4, 6])
    model = Glow(config=config)
    assert [len(level.steps) for level in model.levels] == [1, 3]
    widths = [{m.net.net[0].conv.out_channels for m in level.modules() if isinstance(m, Coupling)}
              for level in model.levels]
    assert widths == [{4}, {6}]
    # lists in, tuples kept, lists written: config.json round-trips, and a single number stays one
    assert config.steps == (1, 3) and config.to_dict()["hidden_channels"] == [4, 6]
    assert GlowConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert GlowConfig(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=4).to_dict()["steps"] == 2
    model.initialize(torch.rand(4, 1, 8, 8))
    model.save_pretrained(tmp_path)
    assert Glow.from_pretrained(tmp_path).config == config
    # one number for every level builds what the same number written per level builds
    same = GlowConfig(image_shape=(1, 8, 8), levels=2, steps=[2, 2], hidden_channels=[4, 4])
    plain, listed = Glow(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=4), Glow(config=same)
    assert plain.state_dict().keys() == listed.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), listed.state_dict().values()))
    cfg = build_train_config("fashion-mnist-cpu", ["model.steps=[8,16]", "model.hidden_channels=[64,128]"])
    assert cfg.model.level_steps(1) == 16 and cfg.model.level_hidden_channels(0) == 64


def test_memory_is_a_runtime_setting_not_architecture():
    assert "memory" not in GlowConfig().to_dict()
    model = Glow(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4, memory="invertible")
    assert model.memory == "invertible" and all(level.steps.memory == "invertible" for level in model.levels)
    model.memory = "checkpoint"
    assert all(level.steps.memory == "checkpoint" for level in model.levels)
    with pytest.raises(ValueError, match="memory must be one of"):
        model.memory = "bogus"
    assert TrainConfig(memory="invertible").memory == "invertible"


def test_old_configs_with_memory_in_the_architecture_still_load(tmp_path):
    # a train_config.json written when the memory mode was part of the model: it moves to the run
    cfg = TrainConfig.from_dict({"model": {"image_shape": [1, 8, 8], "levels": 2, "steps": 1,
                                           "hidden_channels": 4, "memory": "invertible"}})
    assert cfg.memory == "invertible" and cfg.model == GlowConfig(image_shape=(1, 8, 8), levels=2, steps=1,
                                                                   hidden_channels=4)
    # a checkpoint written by glowflow 0.1 (memory in config.json, a manifest of the weights only)
    shutil.copytree(OLD_CHECKPOINT, tmp_path / "old")
    assert json.loads((tmp_path / "old" / "config.json").read_text())["memory"] == "invertible"
    model = Glow.from_pretrained(tmp_path / "old")
    assert model.memory == "none" and model.config.split_prior == "conv+position"
    x = (torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 255.0)
    expected = json.loads((tmp_path / "old" / "expected.json").read_text())["log_prob"]
    with torch.no_grad():
        got = model.log_prob(x, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_overrides_and_presets():
    assert apply_overrides({"model": {"steps": 2}}, ["model.steps=16", "lr=0.0001"]) == {"model": {"steps": 16},
                                                                                     "lr": 1e-4}
    with pytest.raises(ValueError, match="model is a group of settings"):
        apply_overrides({"model": {"steps": 2}}, ["model=3"])
    with pytest.raises(ValueError, match="model must be a group of settings"):
        build_train_config(None, ["model=3"])
    with pytest.raises(ValueError, match="unknown training config keys"):
        build_train_config("fashion-mnist-cpu", ["learning_rate=0.1"])
    cfg = build_train_config("fashion-mnist-cpu", ["model.steps=3", "max_minutes=null"])
    assert cfg.model.steps == 3 and cfg.max_minutes is None
    assert build_train_config("imagenet64-paper").memory == "invertible"


def test_configs_written_before_the_redesign_load_with_their_settings_moved():
    """A mixture's components became a coupling option and the class loss's weight a setting of
    the run; config.json files that hold them the old way still load, meaning the same."""
    old = {**GlowConfig(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4).to_dict(),
           "coupling": "mixture", "mixture_components": 3, "class_loss_weight": 0.5, "memory": "invertible"}
    del old["coupling_options"], old["conditioned_couplings"]
    assert GlowConfig.from_dict(old).coupling_options == {"components": 3}
    run = TrainConfig.from_dict({"model": old})
    assert (run.class_loss_weight, run.memory, run.model.coupling_options) == (0.5, "invertible", {"components": 3})
    affine = GlowConfig.from_dict({**old, "coupling": "affine"})
    assert affine.coupling_options == {} and hash(affine) == hash(GlowConfig.from_dict(affine.to_dict()))
