"""Training: the loss goes down, resume is exact, checkpoints survive kills and corruption, NaNs recover."""
from __future__ import annotations

import gzip
import os
import json
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from glowflow import Glow, checkpoint as ckpt
from glowflow.cli import main as cli_main
from glowflow.data import ImageDataset
import glowflow.train as train_mod
from glowflow.rundir import RAW_WEIGHTS
from glowflow.train import EMA, TrainConfig, Trainer, learning_rate, run_progress

TINY_MODEL = dict(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=8, permutation="invconv_lu")


def blobs(n: int, seed: int) -> ImageDataset:
    """Structured 8x8 images (a bright square on a dark background): learnable in a few steps."""
    g = np.random.default_rng(seed)
    x = np.zeros((n, 1, 8, 8), np.uint8)
    for i in range(n):
        r, c = g.integers(0, 5, 2)
        x[i, 0, r:r + 3, c:c + 3] = 200 + g.integers(0, 55)
    x += g.integers(0, 8, x.shape, dtype=np.uint8)
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(g.integers(0, 3, n)), name="blobs")


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(model=TINY_MODEL, batch_size=16, init_batch_size=64, lr=5e-3, warmup_steps=2, max_steps=10,
                log_every=1, eval_every=1000, sample_every=1000, checkpoint_every=5, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig.from_dict(base)


def run(cfg, out, resume=False, train=None, test=None):
    t = Trainer(cfg, out, train or blobs(256, 0), test or blobs(64, 1), resume=resume, log=lambda *a: None)
    return t, t.run()


def raw_params(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_tensors(out / ckpt.CHECKPOINT_DIR / RAW_WEIGHTS)


def test_a_few_steps_lower_the_loss(tmp_path):
    t, summary = run(tiny_cfg(max_steps=40), tmp_path)
    losses = [r["bits_per_dim"] for r in t.history if "bits_per_dim" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    ev = t.test_metrics()
    assert ev["test_bits_per_dim"] < losses[0]
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "curve.png").is_file()
    assert summary["steps"] == 40


def test_resume_equals_uninterrupted(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    t_full, _ = run(tiny_cfg(max_steps=10), full)
    run(tiny_cfg(max_steps=5), half)
    t_resumed, summary = run(tiny_cfg(max_steps=10), half, resume=True)
    assert summary["steps_this_run"] == 5
    ema_params = lambda out: ckpt.load_tensors(out / ckpt.CHECKPOINT_DIR / ckpt.WEIGHTS_NAME)  # noqa: E731
    for load in (raw_params, ema_params):
        a, b = load(full), load(half)
        for k in a:
            assert torch.equal(a[k], b[k]), (load, k)
    loss = lambda t: [r["loss"] for r in t.history if "loss" in r]  # noqa: E731
    assert loss(t_full) == loss(t_resumed)
    # the metrics log of the resumed directory is one continuous history, no duplicate steps
    steps = [json.loads(l)["step"] for l in (half / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 11))


def test_ema_is_the_written_out_average_and_follows_weights_loaded_in_place():
    torch.manual_seed(0)
    model, other = Glow(**TINY_MODEL), Glow(**TINY_MODEL)
    ema = EMA(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    names = dict(model.named_parameters())

    def update(source, step):
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in source.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if k in names else v.clone()
        ema.update(source, step)

    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        update(model, step)
    model.load_state_dict(other.state_dict())  # a restore copies into the same tensors
    update(model, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update(other, 4)  # another model: its tensors are averaged in, not the first one's
    got = ema.model.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)


def test_learning_rate_schedules():
    lr = lambda decay, step, **kw: learning_rate(  # noqa: E731
        TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_decay=decay, **kw), step)
    assert [lr("none", s) for s in (0, 4, 9, 50, 109)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert lr("linear", 4) == lr("none", 4)  # warm-up first
    # decay runs from the end of warm-up (step 10) to the end of the run (step 110)
    assert lr("linear", 10) == pytest.approx(1.0) and lr("linear", 60) == pytest.approx(0.5)
    assert lr("linear", 110) == pytest.approx(0.0) and lr("linear", 110, lr_final=0.1) == pytest.approx(0.1)
    assert lr("cosine", 60) == pytest.approx(0.5) and lr("cosine", 35) == pytest.approx(0.5 + 0.5 ** 1.5)
    assert lr("cosine", 110, lr_final=0.2) == pytest.approx(0.2)
    # under a time budget the clock sets the progress, whichever of steps and time is further along
    timed = TrainConfig(lr=1.0, warmup_steps=0, max_steps=10**9, max_minutes=10.0, lr_decay="linear")
    assert run_progress(timed, 5, seconds=150.0) == pytest.approx(0.25)
    assert learning_rate(timed, 5, progress=run_progress(timed, 5, 450.0)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="step")
    with pytest.raises(ValueError, match="lr_final"):
        TrainConfig(lr_final=2.0)


def test_the_optimizer_takes_the_configured_moment_decays():
    model = torch.nn.Linear(2, 2)
    for name in ("adam", "adamax"):
        opt = train_mod.make_optimizer(TrainConfig(optimizer=name, beta1=0.8, beta2=0.99), model)
        assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        TrainConfig(beta2=1.0)


def test_a_resumed_run_uses_the_moment_decays_of_its_config_not_the_saved_ones(tmp_path):
    run(tiny_cfg(max_steps=5), tmp_path)
    t, _ = run(tiny_cfg(max_steps=6, beta1=0.8, beta2=0.99), tmp_path, resume=True)
    assert all(group["betas"] == (0.8, 0.99) for group in t.optimizer.param_groups)


def test_resume_with_lr_decay_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = tiny_cfg(max_steps=10, lr_decay="cosine", lr_final=0.1)
    full, half = tmp_path / "full", tmp_path / "half"
    t_full, _ = run(cfg, full)
    original = Trainer.train_step

    def crash_after_step_7(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_after_step_7)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, half)  # checkpoint at step 5, killed at step 7
    monkeypatch.setattr(Trainer, "train_step", original)
    t_resumed, summary = run(cfg, half, resume=True)
    assert summary["steps_this_run"] == 5
    a, b = raw_params(full), raw_params(half)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [r["lr"] for r in t_full.history if "lr" in r]
    assert lrs[1] == 5e-3 and all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.1 * 5e-3


def test_time_budget_counts_over_resumes(tmp_path):
    cfg = tiny_cfg(max_steps=1000, max_minutes=1e-6)
    t, summary = run(cfg, tmp_path)
    assert summary["stop_reason"] == "max_minutes" and summary["steps"] == 1 and t.seconds > 0
    t2, summary2 = run(cfg, tmp_path, resume=True)  # the budget is spent: nothing more to do
    assert summary2["steps_this_run"] == 0 and summary2["stop_reason"] == "max_minutes"
    assert t2.seconds == pytest.approx(t.seconds)


def test_resume_under_another_memory_mode(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    run(tiny_cfg(max_steps=8), full)
    run(tiny_cfg(max_steps=4), half)
    run(tiny_cfg(max_steps=8, memory="invertible"), half, resume=True)
    a, b = raw_params(full), raw_params(half)
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) < 1e-5


def test_checkpoint_round_trip_gives_identical_log_prob(tmp_path):
    t, _ = run(tiny_cfg(max_steps=6), tmp_path)
    loaded = Glow.from_pretrained(tmp_path)
    x = blobs(8, 3).images.float() / 255
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), t.ema.model.log_prob(x))
    assert bool(loaded.levels[0].steps[0].actnorm.initialized)


def test_resume_with_a_different_model_is_refused(tmp_path):
    run(tiny_cfg(max_steps=5), tmp_path)
    other = tiny_cfg(max_steps=10, model={**TINY_MODEL, "hidden_channels": 16})
    with pytest.raises(ValueError, match=r"different model \(model.hidden_channels: 8 in the checkpoint, 16 in "
                                         r"this run\)") as e:
        run(other, tmp_path, resume=True)
    assert "GlowConfig(" not in str(e.value)  # the key that differs, not two configs dumped whole


def test_a_trainer_state_holding_code_is_refused_in_one_sentence(tmp_path):
    run(tiny_cfg(max_steps=5), tmp_path)
    state = tmp_path / ckpt.CHECKPOINT_DIR / "trainer.pt"
    torch.save({"step": 5, "optimizer": {}, "lr_scale": 1.0, "evil": _Unpicklable()}, state)
    ckpt.write_checksums(state.parent)
    with pytest.raises(ckpt.CheckpointError, match="holds objects other than tensors and numbers") as e:
        run(tiny_cfg(max_steps=10), tmp_path, resume=True)
    assert "weights_only" not in str(e.value) and len(str(e.value).splitlines()) == 1


class _Unpicklable:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("victim", [ckpt.WEIGHTS_NAME, RAW_WEIGHTS, "trainer.pt", ckpt.CONFIG_NAME])
def test_truncated_checkpoint_gives_a_clear_error(tmp_path, victim):
    run(tiny_cfg(max_steps=5), tmp_path)
    path = tmp_path / ckpt.CHECKPOINT_DIR / victim
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt|truncated"):
        run(tiny_cfg(max_steps=10), tmp_path, resume=True)


@pytest.mark.parametrize("victim", [ckpt.WEIGHTS_NAME, RAW_WEIGHTS, "trainer.pt"])
def test_a_flipped_byte_in_a_checkpoint_is_refused_on_resume(tmp_path, victim):
    run(tiny_cfg(max_steps=5), tmp_path)
    path = tmp_path / ckpt.CHECKPOINT_DIR / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same length, parsable framing: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"corrupt file .*{victim}.*SHA-256"):
        run(tiny_cfg(max_steps=10), tmp_path, resume=True)


def test_missing_checkpoint_gives_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        Glow.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        Glow.from_pretrained(tmp_path)


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import tiny_cfg, blobs
    from glowflow import checkpoint as ckpt
    from glowflow.train import Trainer
    t = Trainer(tiny_cfg(max_steps=8), {out!r}, blobs(256, 0), None, resume=True, log=lambda *a: None)
    for _ in range(3):
        t.train_step()
    real = ckpt.save_tensors
    calls = []
    def dying(path, tensors, metadata=None):
        real(path, tensors, metadata)
        calls.append(path)
        if len(calls) == 2:  # mid-checkpoint: some files written, others not
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save_tensors = dying
    t.save_checkpoint()
""")


def test_killing_training_mid_checkpoint_loses_nothing(tmp_path):
    out = tmp_path / "run"
    run(tiny_cfg(max_steps=5), out)
    before = raw_params(out)
    script = KILLER.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    after = raw_params(out)  # the last good checkpoint is intact and still the one found
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    t, summary = run(tiny_cfg(max_steps=8), out, resume=True)
    assert summary["steps_this_run"] == 3


def test_kill_between_the_two_renames_falls_back_to_old(tmp_path):
    out = tmp_path / "run"
    run(tiny_cfg(max_steps=5), out)
    live = out / ckpt.CHECKPOINT_DIR
    live.rename(out / (ckpt.CHECKPOINT_DIR + ".old"))  # the state a kill there leaves
    model = Glow.from_pretrained(out)
    assert model.config.hidden_channels == TINY_MODEL["hidden_channels"]
    _, summary = run(tiny_cfg(max_steps=8), out, resume=True)
    assert summary["steps_this_run"] == 3


def test_a_non_finite_step_is_skipped_and_reported(tmp_path):
    cfg = tiny_cfg(max_steps=6)
    t = Trainer(cfg, tmp_path, blobs(256, 0), None, log=lambda *a: None)
    real = t.train_model
    calls = {"n": 0}

    def flaky(x, y=None, noise=None):
        out = real(x, y, noise=noise)
        calls["n"] += 1
        if calls["n"] == 3:
            return out._replace(bits_per_dim=out.bits_per_dim * float("nan"))
        return out

    t.train_model = flaky
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.run()
    skipped = [r for r in t.history if r.get("event") == "skipped"]
    assert len(skipped) == 1 and skipped[0]["step"] == 3
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_repeated_nan_restores_last_good_checkpoint_with_lower_lr(tmp_path):
    messages = []
    cfg = tiny_cfg(max_steps=12, checkpoint_every=4, max_bad_steps=3)
    t = Trainer(cfg, tmp_path, blobs(256, 0), None, log=messages.append)
    for _ in range(4):
        t.train_step()
    t.save_checkpoint()
    good = {k: v.clone() for k, v in t.model.state_dict().items()}
    with torch.no_grad():  # the weights blow up
        t.model.levels[0].steps[0].coupling.net.net[2].conv.weight.fill_(float("nan"))
    t.run()
    events = [r for r in t.history if r.get("event") == "recovered"]
    assert len(events) == 1 and events[0]["step"] == 4 and events[0]["lr_scale"] == 0.5
    assert any("non-finite" in m and "restored" in m for m in messages)
    assert t.step == 12 and all(torch.isfinite(p).all() for p in t.model.parameters())
    assert not torch.equal(good["levels.0.steps.0.actnorm.bias"], t.model.state_dict()["levels.0.steps.0.actnorm.bias"])


# ------------------------------------------------------------------------------- the CLI, end to end
def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture
def fake_fashion(tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    g = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 32)):
        x = np.zeros((n, 28, 28), np.uint8)
        x[:, 6:22, 8:20] = g.integers(100, 255, (n, 1, 1))
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", g.integers(0, 10, n))
    return root


def _tiny_preset(tmp_path, **settings) -> Path:
    """A preset file of a tiny Fashion-MNIST model on the CPU, with ``settings`` added."""
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({"dataset": "fashion-mnist", "batch_size": 16, "init_batch_size": 32, "device": "cpu",
                                  "model": {"image_shape": [1, 28, 28], "levels": 2, "steps": 1,
                                            "hidden_channels": 8}, **settings}))
    return preset


def test_cli_resume_without_a_preset_continues_with_the_runs_own_settings(tmp_path, fake_fashion, capsys):
    preset = _tiny_preset(tmp_path, max_steps=2, log_every=1, eval_every=100, checkpoint_every=2,
                          sample_every=100, seed=5)
    run_dir = tmp_path / "run"
    assert cli_main(["train", "--preset", str(preset), "--data", str(fake_fashion), "--out", str(run_dir),
                     "--no-progress"]) == 0
    # no --preset, no --dataset: the run's own (not the default preset's 2-level K=12 model)
    assert cli_main(["train", "--out", str(run_dir), "--resume", "--max-steps", "3", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3
    saved = json.loads((run_dir / ckpt.CHECKPOINT_DIR / "train_config.json").read_text())
    assert saved["seed"] == 5 and saved["max_steps"] == 3 and saved["model"]["hidden_channels"] == 8


def test_cli_train_eval_sample_encode_decode(tmp_path, fake_fashion, capsys):
    preset = _tiny_preset(tmp_path, max_steps=4, log_every=1, eval_every=4, checkpoint_every=4, sample_every=4)
    run_dir = tmp_path / "run"
    assert cli_main(["train", "--preset", str(preset), "--data", str(fake_fashion), "--out", str(run_dir),
                     "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and "test_bits_per_dim" in summary
    assert summary["test_outliers"] == 0 and summary["test_bits_per_dim_without_outliers"] == summary["test_bits_per_dim"]

    assert cli_main(["eval", str(run_dir), "--json", "--no-progress"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["num_images"] == 32 and ev["bits_per_dim"] > 0 and ev["bits_per_dim_se"] > 0
    assert ev["outliers"] == 0 and ev["bits_per_dim_median"] > 0

    grid = tmp_path / "t.png"
    assert cli_main(["sample", str(run_dir), "--n", "4", "--temperature", "0,0.7", "--out", str(grid)]) == 0
    from PIL import Image
    w, h = Image.open(grid).size
    assert h < w and h > 28 * 2  # two rows (one per temperature) of four

    from glowflow.images import save_grid
    imgs = torch.rand(2, 1, 28, 28)
    for i in range(2):
        save_grid(imgs[i:i + 1], tmp_path / f"im{i}.png", nrow=1, padding=0)
    lat = tmp_path / "z.npy"
    assert cli_main(["encode", str(run_dir), str(tmp_path / "im0.png"), str(tmp_path / "im1.png"),
                     "--out", str(lat)]) == 0
    assert np.load(lat).shape == (2, 784)
    assert cli_main(["decode", str(run_dir), str(lat), "--out", str(tmp_path / "d.png"), "--nrow", "2"]) == 0
    capsys.readouterr()


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert cli_main(["train", "--preset", "no-such-preset", "--out", str(tmp_path / "r")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli_main(["train", "--out", str(tmp_path / "r"), "--set", "model.steps"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_presets_are_valid_configs():
    from glowflow.config import build_train_config
    from glowflow.presets import list_presets

    presets = list_presets()
    assert "fashion-mnist-cpu" in presets and "cifar10-paper" in presets
    for name in presets:
        cfg = build_train_config(name)
        assert cfg.model.image_shape[1] % 2 ** cfg.model.levels == 0
    paper = build_train_config("cifar10-paper")
    assert (paper.model.levels, paper.model.steps, paper.model.hidden_channels) == (3, 32, 512)
    celeba = build_train_config("celeba-hq-256-paper")
    assert (celeba.model.n_bits, celeba.model.coupling, celeba.model.levels) == (5, "additive", 6)
    over = build_train_config("fashion-mnist-cpu", ["model.steps=3", "lr=1e-4"])
    assert over.model.steps == 3 and over.lr == 1e-4


# ------------------------------------------------------------------------------- nothing lost
def test_a_second_run_into_a_run_directory_is_refused_without_resume_or_overwrite(tmp_path):
    run(tiny_cfg(max_steps=6), tmp_path)
    before = raw_params(tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*--overwrite"):
        run(tiny_cfg(max_steps=3), tmp_path)
    after = raw_params(tmp_path)  # nothing was touched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    t = Trainer(tiny_cfg(max_steps=3), tmp_path, blobs(256, 0), blobs(64, 1), overwrite=True, log=lambda *a: None)
    t.run()
    assert int(torch.load(tmp_path / ckpt.CHECKPOINT_DIR / "trainer.pt", weights_only=True)["step"]) == 3
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in rows) == 3


def test_cli_refuses_an_existing_run_and_a_file_as_out_before_loading_data(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cli_main(["train", "--out", str(tmp_path), "--data", str(tmp_path / "no-data")]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    (tmp_path / "a-file").write_text("x")
    assert cli_main(["train", "--out", str(tmp_path / "a-file"), "--data", str(tmp_path / "no-data")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("name,make", [
    ("checkpoint", lambda d: (d / "notes.txt").write_text("mine")),  # a user's folder named checkpoint
    ("checkpoint.old", lambda d: (d / "notes.txt").write_text("mine")),
    ("samples.png", None),  # a picture of the user's with no run beside it
    ("metrics.jsonl", None),  # a file of that name that is not a run's metrics
])
@pytest.mark.parametrize("mode", ["new", "overwrite", "resume"])
def test_training_never_replaces_what_glowflow_did_not_write(tmp_path, name, make, mode):
    path = tmp_path / name
    if make:
        path.mkdir()
        make(path)
    else:
        path.write_text("user data, not JSON")
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="glowflow replaces only what it wrote itself"):
        Trainer(tiny_cfg(max_steps=2), tmp_path, blobs(64, 0), resume=mode == "resume", overwrite=mode == "overwrite",
                log=lambda *a: None)
    after = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert after == before


def test_a_run_beside_a_users_checkpoint_folder_is_refused_before_it_trains(tmp_path, fake_fashion, capsys):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "notes.txt").write_text("mine")
    assert cli_main(["train", "--out", str(tmp_path / "run"), "--data", str(fake_fashion), "--max-steps", "1"]) == 2
    assert "not a glowflow checkpoint" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint"]
    assert (tmp_path / "run" / "checkpoint" / "notes.txt").read_text() == "mine"


def test_a_nan_setting_on_resume_never_reaches_the_checkpoint(tmp_path):
    run(tiny_cfg(max_steps=5), tmp_path)
    good = {f.name: f.read_bytes() for f in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir()}
    with pytest.raises(ValueError, match="grad_clip must be a finite number"):
        run(tiny_cfg(max_steps=10, grad_clip=float("nan")), tmp_path, resume=True)
    # and whatever makes the weights non-finite, they are refused at the save, the good checkpoint kept
    t = Trainer(tiny_cfg(max_steps=10), tmp_path, blobs(256, 0), blobs(64, 1), resume=True, log=lambda *a: None)
    with torch.no_grad():
        next(t.model.parameters()).fill_(float("nan"))
    with pytest.raises(ckpt.CheckpointError, match="hold NaN or inf"):
        t.save_checkpoint()
    t.lock.release()
    assert {f.name: f.read_bytes() for f in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir()} == good


def test_bf16_and_fp16_on_a_cpu_are_refused_not_ignored(tmp_path):
    for precision in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"precision {precision} is autocast on CUDA.*cpu"):
            run(tiny_cfg(precision=precision), tmp_path / precision)
        assert not (tmp_path / precision).exists()


@pytest.mark.parametrize("device,message", [("meta", "not supported"), ("mps", "MPS .* not available"),
                                            ("tpu", "unknown device|not supported")])
def test_devices_that_cannot_train_are_refused_before_out_is_made(tmp_path, fake_fashion, capsys, device, message):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "run"
    assert cli_main(["train", "--out", str(out), "--data", str(fake_fashion), "--device", device]) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()


def test_an_evaluation_that_is_not_finite_is_an_error_not_a_result(tmp_path):
    t, _ = run(tiny_cfg(max_steps=2), tmp_path)
    model = t.ema.model
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="bits/dim is not finite for 64 of 64 images.*no result"):
        train_mod.dataset_bits_per_dim(model, blobs(64, 1))


def test_damaged_metrics_lines_are_dropped_on_resume(tmp_path):
    run(tiny_cfg(max_steps=5), tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    kept = metrics.read_text()
    metrics.write_text(kept + "[1, 2]\n" + "[" * 100_000 + "]" * 100_000 + "\n" + "{\"step\": \"x\"}\nnot json\n")
    t, _ = run(tiny_cfg(max_steps=7), tmp_path, resume=True)
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert all(isinstance(r, dict) and isinstance(r.get("step", 0), int) for r in rows)
    assert max(r.get("step", 0) for r in rows) == 7


def test_metrics_are_strict_json(tmp_path):
    """A skipped step's NaN loss is written as null: strict parsers refuse NaN."""
    t = Trainer(tiny_cfg(max_steps=2), tmp_path, blobs(64, 0), log=lambda *a: None)
    t._record({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "bits_per_dim": 1.5})
    t.lock.release()
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")) == \
        {"step": 1, "loss": None, "grad_norm": None, "bits_per_dim": 1.5}


def test_divergence_before_the_first_checkpoint_ends_in_an_error_with_the_initial_weights_kept(tmp_path):
    cfg = tiny_cfg(lr=10.0, warmup_steps=1, max_steps=60, checkpoint_every=5, max_bad_steps=2, max_recoveries=3)
    t = Trainer(cfg, tmp_path, blobs(256, 0), blobs(64, 1), log=lambda *a: None)
    initial = {k: v.clone() for k, v in t.model.state_dict().items()}
    real = t.train_model

    def exploding(x, y=None, noise=None):  # whatever the learning rate: this run cannot recover
        out = real(x, y, noise=noise)
        return out._replace(bits_per_dim=out.bits_per_dim * float("inf")) if t.step >= 1 else out

    t.train_model = exploding
    with pytest.raises(Exception, match="training diverged.*resume it with a lower --lr") as e:
        t.run()
    assert type(e.value).__name__ == "TrainingDiverged"
    events = [json.loads(r).get("event") for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events.count("recovered") == 3 and events[-1] == "diverged"
    saved = raw_params(tmp_path)  # the initial weights, to restart from
    assert all(torch.equal(saved[k], initial[k]) for k in saved if k in initial)
    assert not t.lock.held


def test_cli_divergence_exits_non_zero_with_one_message(tmp_path, capsys, fake_fashion):
    preset = _tiny_preset(tmp_path)
    code = cli_main(["train", "--preset", str(preset), "--data", str(fake_fashion), "--out", str(tmp_path / "r"),
                     "--lr", "1e9", "--max-steps", "200", "--no-progress", "--set", "warmup_steps=1",
                     "--set", "max_recoveries=2", "--set", "max_bad_steps=2"])
    err = capsys.readouterr().err
    assert code == 3 and "training diverged" in err and "Traceback" not in err
    assert Glow.from_pretrained(tmp_path / "r").initialized  # the initial weights are there


def test_a_skipped_last_step_still_saves_and_evaluates(tmp_path):
    cfg = tiny_cfg(max_steps=7, checkpoint_every=5, eval_every=1000)
    t = Trainer(cfg, tmp_path, blobs(256, 0), blobs(64, 1), log=lambda *a: None)
    real = t.train_model

    def last_fails(x, y=None, noise=None):
        out = real(x, y, noise=noise)
        return out._replace(bits_per_dim=out.bits_per_dim * float("nan")) if t.step == 6 else out

    t.train_model = last_fails
    summary = t.run()
    assert summary["steps"] == 7 and "test_bits_per_dim" in summary
    assert int(torch.load(tmp_path / ckpt.CHECKPOINT_DIR / "trainer.pt", weights_only=True)["step"]) == 7


def test_a_second_training_on_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    first = Trainer(tiny_cfg(max_steps=4), tmp_path, blobs(256, 0), None, log=lambda *a: None)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import tiny_cfg, blobs
        from glowflow.train import Trainer
        Trainer(tiny_cfg(max_steps=4), {str(tmp_path)!r}, blobs(256, 0), None, resume=True, log=print)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is in use by another training" in proc.stderr and "pid" in proc.stderr
    first.run()  # released at the end of the run
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from glowflow.io import DirectoryLock
        DirectoryLock({str(tmp_path)!r}).acquire()
        os._exit(0)  # no release: the process just ends
    """)], timeout=60)
    assert proc.returncode == 0 and (tmp_path / ".lock").read_text().startswith("pid")
    run(tiny_cfg(max_steps=2), tmp_path)


def test_temporary_checkpoints_of_dead_writers_are_removed(tmp_path):
    run(tiny_cfg(max_steps=5), tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint.tmp-{dead.stdout.strip()}-abc123"
    older_style = tmp_path / ".checkpoint.tmp-q8x7zz"
    for d in (stale, older_style):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".checkpoint.tmp-{os.getpid()}-inuse"  # a writer that is still alive is left alone
    live.mkdir()
    run(tiny_cfg(max_steps=8), tmp_path, resume=True)
    assert not stale.exists() and not older_style.exists() and live.exists()


def test_each_rank_reads_its_slice_of_the_augmented_global_batch(tmp_path):
    from glowflow.distributed import DistInfo

    cfg = tiny_cfg(augment_shift=1, augment_flip=True, batch_size=8)
    t = Trainer(cfg, tmp_path, blobs(256, 0), None, log=lambda *a: None)
    x, y, noise = t.global_batch(3)
    plain = Trainer(tiny_cfg(batch_size=8), tmp_path / "plain", blobs(256, 0), None, log=lambda *a: None)
    assert not torch.equal(x, plain.global_batch(3)[0])  # the augmentation acts
    read = []
    real_batch = t.train_data.batch
    t.train_data.batch = lambda idx: read.append(len(idx)) or real_batch(idx)
    for rank in (0, 1):
        t.dist = DistInfo(rank=rank, world_size=2)
        xr, yr, nr = t.global_batch(3)
        part = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(xr, x[part]) and torch.equal(nr, noise[part])
    assert read == [4, 4]  # each rank read only its own rows


def test_an_evaluation_whose_mean_rests_on_outliers_says_so(tmp_path, monkeypatch):
    # one image at 1000 bits/dim among images near 3: the mean is the one image, and the log says it
    fake = torch.tensor([3.0] * 31 + [1000.0], dtype=torch.float64)
    monkeypatch.setattr(train_mod, "score", lambda *a, **k: {"bits_per_dim": fake})
    messages = []
    t = Trainer(tiny_cfg(max_steps=2, eval_every=2), tmp_path, blobs(256, 0), blobs(32, 1), log=messages.append)
    summary = t.run()
    line = next(m for m in messages if "test bits/dim" in m)
    assert "1 of 32 images score over 10x the median (3.0000), the mean of the others is 3.0000" in line
    assert summary["test_outliers"] == 1 and summary["test_bits_per_dim"] == pytest.approx((93 + 1000) / 32)


def test_tensorboard_gets_the_scalars_and_the_sample_grid(tmp_path, monkeypatch):
    import glowflow.train as train_mod
    logged = {"scalars": [], "images": []}

    class Writer:  # stands in for torch's SummaryWriter (the tensorboard extra)
        def add_scalar(self, tag, value, step):
            logged["scalars"].append((tag, step))

        def add_image(self, tag, image, step):
            logged["images"].append((tag, image, step))

        def close(self):
            pass

    monkeypatch.setattr(train_mod, "_tensorboard", lambda path: Writer())
    run(tiny_cfg(max_steps=4, sample_every=2), tmp_path)
    assert ("bits_per_dim", 1) in logged["scalars"] and ("lr", 4) in logged["scalars"]
    assert [(tag, step) for tag, _, step in logged["images"]] == [("samples", 2), ("samples", 4)]
    image = logged["images"][-1][1]
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 1


def test_a_model_of_noisy_images_trains_on_seeded_noise_and_its_density_is_of_the_noisy_images(tmp_path):
    from glowflow import numerics
    cfg = tiny_cfg(max_steps=30, model={**TINY_MODEL, "noise_std": 0.1})
    t, _ = run(cfg, tmp_path)
    losses = [r["bits_per_dim"] for r in t.history if "bits_per_dim" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    g = t.gaussian(3)
    assert g.shape == (16, 1, 8, 8) and torch.equal(g, t.gaussian(3)) and not torch.equal(g, t.gaussian(4))
    model = Glow.from_pretrained(tmp_path)
    assert model.config.noise_std == 0.1
    x = blobs(4, 2).batch(torch.arange(4)).double() / 255
    model = model.double().eval()
    u, gauss = torch.rand_like(x), torch.randn_like(x)
    out = model(x, noise=u, gaussian=gauss)
    noisy = numerics.dequantize(numerics.quantize(x, model.config.n_bits), model.config.n_bits,
                                noise=u) + 0.1 * gauss
    eps, logdet, _ = model._encode(noisy, None)
    assert torch.allclose(out.log_prob, numerics.gaussian_log_prob(model._flatten(eps)) + logdet)
    assert not torch.allclose(out.log_prob, model(x, noise=u, gaussian=torch.zeros_like(x)).log_prob)
    # log_prob is that density at any noisy image, inside [0, 1] or not; a model of clean images refuses
    assert noisy.min() < 0 or noisy.max() > 1
    assert torch.allclose(model.log_prob(noisy), out.log_prob)
    from glowflow import GlowConfig
    clean = Glow(GlowConfig(**{**model.config.to_dict(), "noise_std": 0.0})).double()
    clean.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        clean.log_prob(noisy)
