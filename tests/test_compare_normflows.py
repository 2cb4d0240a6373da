"""Smoke test of benchmarks/compare_normflows.py on a tiny Glow: both libraries build the same
architecture, score the same inputs, and the script prints the JSON it promises."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("normflows")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_normflows.py"
# Parameter counts of the two builds may differ only by glowflow's output log-scales and the split
# priors (conditional conv vs per-element Gaussian); on the tiny config that stays within this factor.
PARAM_FACTOR = 1.5


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_normflows", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def tiny(bench):
    return bench.BenchConfig(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=8, batch_size=4,
                             warmup=1, iters=2, sample_batch=3, sample_repeats=2)


def _batch(bench, cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (cfg.batch_size, *cfg.image_shape), generator=gen, dtype=torch.uint8)
    return bench.batch_with_noise(x, gen)


def test_both_build_the_same_flow_and_give_finite_log_prob(bench, tiny):
    glow, nflow = bench.build_glowflow(tiny), bench.build_normflows(tiny)
    x01, x_deq, noise = _batch(bench, tiny)
    lp_g = bench.log_prob_glowflow(glow, x_deq)
    lp_n = bench.log_prob_normflows(nflow, x_deq)
    assert lp_g.shape == lp_n.shape == (tiny.batch_size,)
    assert torch.isfinite(lp_g).all() and torch.isfinite(lp_n).all()

    # normflows' latents cover every dimension exactly once, as glowflow's do.
    assert sum(math.prod(q.shape) for q in nflow.q0) == tiny.num_dims == sum(
        math.prod(s) for s in glow.latent_shapes)

    g, n = bench.param_breakdown(glow), bench.param_breakdown(nflow)
    for parts in (g, n):  # the breakdown accounts for every parameter
        assert parts["total"] == parts["actnorm"] + parts["invconv"] + parts["coupling"] + parts["priors"]
    assert g["actnorm"] == n["actnorm"] and g["invconv"] == n["invconv"]
    # Couplings differ only by glowflow's per-output-channel log-scale on the zero-initialised conv.
    extra, c = 0, tiny.image_shape[0]
    for i in range(tiny.levels):
        c *= 4
        extra += tiny.steps * 2 * (c // 2)
        c -= c // 2
    assert g["coupling"] - n["coupling"] == extra
    ratio = g["total"] / n["total"]
    assert 1 / PARAM_FACTOR < ratio < PARAM_FACTOR


def test_bits_per_dim_helper_matches_glowflow_forward_on_the_same_noise(bench, tiny):
    glow = bench.build_glowflow(tiny)
    x01, x_deq, noise = _batch(bench, tiny, seed=1)
    with torch.no_grad():
        via_forward = glow(x01, noise=noise).bits_per_dim
        via_helper = bench.bits_per_dim(bench.log_prob_glowflow(glow, x_deq), tiny.num_dims)
    torch.testing.assert_close(via_helper, via_forward, rtol=1e-5, atol=1e-5)
    # -(log p - D log 256) / (D ln 2), written out once more.
    lp = bench.log_prob_glowflow(glow, x_deq).detach()
    expected = -(lp - tiny.num_dims * math.log(256)) / (tiny.num_dims * math.log(2))
    torch.testing.assert_close(via_helper, expected)


def test_main_prints_the_promised_json(bench, capsys, tmp_path):
    out_file = tmp_path / "nested" / "result.json"
    threads = torch.get_num_threads()  # main() sets the thread count; keep it from leaking
    try:
        result = bench.main(["--image-shape", "1,8,8", "--levels", "2", "--steps", "1",
                             "--hidden-channels", "4",
                             "--batch-size", "2", "--warmup", "1", "--iters", "2", "--sample-batch", "2",
                             "--sample-repeats", "2", "--output", str(out_file)])
    finally:
        torch.set_num_threads(threads)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    assert json.loads(out_file.read_text()) == printed  # --output writes the same JSON
    for key in ("config", "versions", "machine", "params", "train", "sample", "notes"):
        assert key in printed
    assert printed["machine"]["torch_threads"] >= 1 and printed["versions"]["normflows"]
    for name in ("glowflow", "normflows"):
        assert printed["train"][name]["steps_per_s"] > 0
        assert math.isfinite(printed["train"][name]["last_loss_bpd"])
        assert printed["sample"][name]["finite"]
    assert printed["train"]["ratio_steps_per_s_glowflow_over_normflows"] > 0


def test_rejects_shapes_the_levels_cannot_squeeze(bench):
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        bench.BenchConfig(image_shape=(1, 28, 28), levels=3)


def test_budget_training_and_test_bpd_on_synthetic_images(bench, tiny):
    models = {"glowflow": bench.build_glowflow(tiny), "normflows": bench.build_normflows(tiny)}
    images = torch.randint(0, 256, (40, *tiny.image_shape), generator=torch.Generator().manual_seed(2),
                           dtype=torch.uint8)
    # the budget includes the initialisation: long enough for a step on a loaded machine too
    out, runs = bench.train_for_budget(models, images, tiny, budget_s=1.5, slice_s=0.25)
    for name, model in models.items():
        assert out[name]["steps"] >= 1 and out[name]["nonfinite_losses"] == 0
        norms = out[name]["grad_norm_max_per_50_steps"]  # the default recipe clips, and says how hard
        assert len(norms) == len(out[name]["train_bpd_per_50_steps"]) and 0 <= out[name]["clipped_steps"] <= out[name]["steps"]
        assert out[name]["wall_s"] >= 1.5
        curve = out[name]["train_bpd_per_50_steps"]
        assert len(curve) == math.ceil(out[name]["steps"] / 50) and all(math.isfinite(v) for v in curve)
        assert runs[name].model is model and runs[name].steps == out[name]["steps"]
        for scored in (model, runs[name].ema.model):
            bpd = bench.evaluate_bpd(name, scored, images[:10], tiny, batch=4)
            assert math.isfinite(bpd) and bpd > 0
        # the EMA moved away from the initial weights, and is not the raw model
        assert any(not torch.equal(e, p) for e, p in zip(runs[name].ema.model.parameters(), model.parameters()))


def test_budget_recipe_warms_up_then_decays_with_the_clock(bench, tiny):
    from dataclasses import replace
    images = torch.randint(0, 256, (16, *tiny.image_shape), generator=torch.Generator().manual_seed(3),
                           dtype=torch.uint8)
    cfg = replace(tiny, lr=1e-2, warmup_steps=4, lr_decay="linear")
    run = bench.BudgetRun("normflows", bench.build_normflows(cfg), images, cfg, budget_s=100.0)
    assert run.learning_rate(0.0) == pytest.approx(1e-2 / 4)  # first warm-up step
    run.steps = 10
    assert run.learning_rate(0.0) == pytest.approx(1e-2)
    assert run.learning_rate(75.0) == pytest.approx(1e-2 * 0.25)  # a quarter of the budget left
    assert run.learning_rate(100.0) == pytest.approx(0.0)
    constant = bench.BudgetRun("glowflow", bench.build_glowflow(cfg), images, replace(cfg, lr_decay="none", ema=0.0),
                               budget_s=100.0)
    constant.steps = 10
    assert constant.learning_rate(99.0) == pytest.approx(1e-2) and constant.ema is None
    loss = constant.step(1.0)
    assert math.isfinite(loss) and constant.steps == 11
    with pytest.raises(ValueError, match="lr_decay"):
        replace(tiny, lr_decay="step")


@pytest.mark.parametrize("name", ["glowflow", "normflows"])
def test_budget_recipe_clips_the_gradient_norm_and_records_it(bench, tiny, name):
    from dataclasses import replace
    images = torch.randint(0, 256, (16, *tiny.image_shape), generator=torch.Generator().manual_seed(4),
                           dtype=torch.uint8)
    cfg = replace(tiny, grad_clip=1e-3)  # far below any real gradient norm, so it always bites
    model = bench.build_glowflow(cfg) if name == "glowflow" else bench.build_normflows(cfg)
    run = bench.BudgetRun(name, model, images, cfg, budget_s=100.0)
    run.step(0.0)
    assert len(run.grad_norms) == 1 and run.grad_norms[0] > 1e-3
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)
    # off: nothing clipped or recorded
    off = bench.BudgetRun(name, bench.build_glowflow(cfg) if name == "glowflow" else bench.build_normflows(cfg),
                          images, replace(cfg, grad_clip=0.0), budget_s=100.0)
    off.step(0.0)
    assert off.grad_norms == []
    with pytest.raises(ValueError, match="grad_clip"):
        replace(tiny, grad_clip=-1.0)


def test_grid_times_every_configuration(bench, tiny):
    grid = (((1, 8, 8), 2, 1, 4, 2), ((3, 8, 8), 1, 2, 4, 4))
    cfg = bench.BenchConfig(**{**tiny.__dict__, "warmup": 1, "iters": 2, "sample_repeats": 2})
    res = bench.run_grid(cfg, grid)
    assert [(r["image_shape"], r["steps"], r["batch_size"]) for r in res["configs"]] == [([1, 8, 8], 1, 2),
                                                                                       ([3, 8, 8], 2, 4)]
    ratios = [r["train"]["ratio_steps_per_s_glowflow_over_normflows"] for r in res["configs"]]
    assert res["min_training_ratio"] == min(ratios) > 0
    assert len(bench.GRID) >= 4 and {g[0] for g in bench.GRID} == {(1, 28, 28), (3, 32, 32)}
    assert {g[2] for g in bench.GRID} >= {8, 32} and {g[3] for g in bench.GRID} >= {64, 128}
