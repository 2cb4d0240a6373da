"""The ablation runner: the grid, what it writes, resuming, and the ordering check on made-up numbers."""
from __future__ import annotations

import json

import pytest
import torch

from glowflow import ablation as ablate
from glowflow.cli import ablate as cli_ablate
from glowflow.data import ImageDataset
from glowflow.model import GlowConfig
from glowflow.train import TrainConfig


def _tiny_data(n: int, seed: int) -> ImageDataset:
    """Blurry 8x8 grey images: enough structure that a few steps lower the bits/dim."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 2, 2, generator=g)
    x = torch.nn.functional.interpolate(base, size=(8, 8), mode="bilinear", align_corners=False)
    return ImageDataset((x * 255).round().to(torch.uint8), torch.zeros(n, dtype=torch.int64), name="tiny")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    cfg = TrainConfig(model=GlowConfig(image_shape=(1, 8, 8), levels=1, steps=2, hidden_channels=8),
                      dataset="tiny", batch_size=8, init_batch_size=16, lr=1e-3, warmup_steps=2,
                      max_steps=4, eval_every=2, test_limit=12, log_every=1, device="cpu", progress=False)
    return cfg, _tiny_data(48, 0), _tiny_data(16, 1)


def _run(cfg, train, test, out, **kw):
    logs = []
    kw = {"seeds": 1, "permutations": ("reverse", "invconv"), "couplings": ("additive", "affine"), **kw}
    res = ablate.run_ablation(cfg, out, train_data=train, test_data=test, progress=False, log=logs.append, **kw)
    return res, logs


def test_tiny_ablation_writes_every_curve_figure_and_table(tiny, tmp_path):
    cfg, train, test = tiny
    res, logs = _run(cfg, train, test, tmp_path)
    on_disk = json.loads((tmp_path / ablate.RESULTS).read_text())
    assert on_disk["summary"] == json.loads(json.dumps(res["summary"]))
    assert len(on_disk["runs"]) == 4 and len(logs) == 4
    cells = {(r["coupling"], r["permutation"], r["seed"]) for r in on_disk["runs"]}
    assert cells == {(c, p, 0) for c in ("additive", "affine") for p in ("reverse", "invconv")}
    for r in on_disk["runs"]:
        assert r["steps"] == 4 and r["stop_reason"] == "max_steps"
        assert [p["step"] for p in r["test_curve"]] == [2, 4]  # every eval_every, the same for all
        assert all(p["seconds"] >= p["train_seconds"] >= 0 for p in r["test_curve"])
        assert r["final_test_bits_per_dim"] == r["test_curve"][-1]["test_bits_per_dim"]
        # only the varied settings differ from the base config
        assert r["config"]["model"]["coupling"] == r["coupling"]
        assert r["config"]["model"]["permutation"] == r["permutation"]
        assert r["config"]["seed"] == r["config"]["model"]["seed"] == r["seed"]
        assert r["config"]["lr"] == cfg.lr and r["config"]["model"]["hidden_channels"] == 8
        assert (tmp_path / f"{r['coupling']}-{r['permutation']}-seed{r['seed']}" / ablate.RUN_RESULT).is_file()
    assert on_disk["meta"]["test_images"] == 12 and on_disk["meta"]["evaluated_weights"] == "ema"
    assert len(on_disk["summary"]["table"]) == 4
    assert all(row["seeds"] == [0] for row in on_disk["summary"]["table"])
    assert set(on_disk["summary"]["permutation_ordering"]) == {"additive", "affine"}
    png = (tmp_path / ablate.FIGURE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = (tmp_path / ablate.TABLE).read_text()
    assert "| additive | 1x1 conv |" in table and "| affine | reverse |" in table
    assert "additive: 1x1 conv < shuffle < reverse: not checkable (missing shuffle)" in table


def test_same_seed_same_run_and_different_seeds_differ(tiny, tmp_path):
    cfg, train, test = tiny
    a, _ = _run(cfg, train, test, tmp_path / "a", permutations=("shuffle",), couplings=("affine",), seeds=[3, 4])
    b, _ = _run(cfg, train, test, tmp_path / "b", permutations=("shuffle",), couplings=("affine",), seeds=[3])
    bpd = lambda run: [p["test_bits_per_dim"] for p in run["test_curve"]]  # noqa: E731
    assert bpd(a["runs"][0]) == bpd(b["runs"][0])
    assert bpd(a["runs"][0]) != bpd(a["runs"][1])
    (row,) = a["summary"]["table"]
    finals = [r["final_test_bits_per_dim"] for r in a["runs"]]
    assert row["seeds"] == [3, 4]
    assert row["final_test_bits_per_dim_mean"] == pytest.approx(sum(finals) / 2)
    assert row["final_test_bits_per_dim_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)


def test_finished_runs_are_skipped_and_other_settings_refused(tiny, tmp_path):
    cfg, train, test = tiny
    _run(cfg, train, test, tmp_path, permutations=("reverse",), couplings=("additive",))
    marker = tmp_path / "additive-reverse-seed0" / ablate.RUN_RESULT
    before = marker.stat().st_mtime_ns
    # a second, larger ablation in the same place trains only the new cell
    res, logs = _run(cfg, train, test, tmp_path, permutations=("reverse", "shuffle"), couplings=("additive",))
    assert res["skipped"] == 1 and len(res["runs"]) == 2
    assert "skipped" in logs[0] and "skipped" not in logs[1]
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="other settings"):
        _run(cfg, train, test, tmp_path, permutations=("reverse",), couplings=("additive",), budget_steps=6)


def test_budgets_replace_the_presets_and_minutes_stop_a_run(tiny, tmp_path):
    cfg, train, test = tiny
    spec = ablate.RunSpec("affine", "invconv", 0)
    assert ablate.run_config(cfg, spec).max_steps == 4
    both = ablate.run_config(cfg, spec, budget_steps=7, budget_minutes=2.0)
    assert (both.max_steps, both.max_minutes) == (7, 2.0)
    minutes_only = ablate.run_config(cfg, spec, budget_minutes=1e-6)
    assert minutes_only.max_minutes == 1e-6 and minutes_only.max_steps > 10**9
    res, _ = _run(cfg, train, test, tmp_path, permutations=("invconv",), couplings=("affine",), budget_minutes=1e-6)
    run = res["runs"][0]
    assert run["steps"] == 1 and run["stop_reason"] == "max_minutes"  # steps reached are reported
    assert [p["step"] for p in run["test_curve"]] == [1]


def test_bad_arguments_are_refused(tiny, tmp_path):
    cfg, train, test = tiny
    with pytest.raises(ValueError, match="permutations"):
        _run(cfg, train, test, tmp_path, permutations=("swap",))
    with pytest.raises(ValueError, match="seeds"):
        _run(cfg, train, test, tmp_path, seeds=0)
    with pytest.raises(ValueError, match="budget_steps"):
        _run(cfg, train, test, tmp_path, budget_steps=0)


def test_ordering_check_holds():
    finals = {"invconv": [3.00, 3.10, 3.05], "shuffle": [3.20, 3.15, 3.25], "reverse": [3.30, 3.40, 3.20]}
    check = ablate.check_ordering(finals)
    assert check["holds"] is True
    assert check["observed"] == ["invconv", "shuffle", "reverse"]
    first, second = check["pairs"]
    assert (first["better"], first["worse"]) == ("invconv", "shuffle")
    assert first["gap"] == pytest.approx(0.15)
    assert first["seeds_agreeing"] == 3
    # paired by seed: reverse - shuffle = 0.10, 0.25, -0.05 -> lower in 2 of 3 seeds, mean 0.1
    assert second["gap"] == pytest.approx(0.1) and second["seeds_agreeing"] == 2
    assert second["gap_std"] == pytest.approx(0.15)


def test_ordering_check_does_not_hold_and_missing():
    finals = {"invconv": [3.2, 3.3], "shuffle": [3.1, 3.2], "reverse": [3.4, 3.5]}
    check = ablate.check_ordering(finals)
    assert check["holds"] is False
    assert check["observed"] == ["shuffle", "invconv", "reverse"]
    assert check["pairs"][0]["gap"] == pytest.approx(-0.1) and check["pairs"][0]["seeds_agreeing"] == 0
    tie = ablate.check_ordering({"invconv": [3.0], "shuffle": [3.0], "reverse": [3.5]})
    assert tie["holds"] is False  # a tie is not "beats"
    assert ablate.check_ordering({"invconv": [3.0], "reverse": [3.5]})["holds"] is None
    assert ablate.check_ordering({"a": [1.0], "b": [2.0]}, order=("a", "b"))["holds"] is True


def test_summary_pairs_seeds_and_formats_the_verdict():
    def run(c, p, s, v):
        return {"coupling": c, "permutation": p, "seed": s, "final_test_bits_per_dim": v, "steps": 10,
                "seconds": 1.0, "test_curve": [{"step": 10, "test_bits_per_dim": v}]}
    runs = [run("affine", "invconv", 0, 3.0), run("affine", "invconv", 1, 3.1),
            run("affine", "shuffle", 0, 3.2), run("affine", "shuffle", 1, 3.3),
            run("affine", "reverse", 0, 3.1),  # seed 1 missing: the check uses seed 0 only
            run("additive", "invconv", 0, 3.5), run("additive", "shuffle", 0, 3.4), run("additive", "reverse", 0, 3.6)]
    summary = ablate.summarize(runs)
    affine = summary["permutation_ordering"]["affine"]
    assert affine["holds"] is False and affine["observed"] == ["invconv", "reverse", "shuffle"]
    assert all(p["seeds"] == 1 for p in affine["pairs"])
    row = next(r for r in summary["table"] if (r["coupling"], r["permutation"]) == ("affine", "invconv"))
    assert row["final_test_bits_per_dim_mean"] == pytest.approx(3.05)
    assert row["final_test_bits_per_dim_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert summary["coupling_ordering"]["invconv"]["holds"] is True  # affine 3.0 < additive 3.5 (seed 0)
    table = ablate.format_table(summary, {"test_images": 5, "dataset": "x", "budget": "10 steps per run"})
    assert "- affine: 1x1 conv < shuffle < reverse does NOT hold" in table
    assert "- additive: 1x1 conv < shuffle < reverse does NOT hold (observed: shuffle < 1x1 conv < reverse" in table
    assert "| affine | 1x1 conv | 3.0500 ± 0.0707 | 2 | 10 |" in table
    assert "| additive | 1x1 conv | 3.5000 | 1 | 10 |" in table  # one seed: no spread, not "± 0.0000"
    assert "shuffle − 1x1 conv = +0.2000, 1x1 conv lower in 1/1 seeds" in table


def test_cli_registers_ablate():
    from glowflow.cli import build_parser

    args = build_parser().parse_args(["ablate", "--data", "mnist", "--budget-steps", "5", "--num-seeds", "2"])
    assert (args.data, args.budget_steps, args.num_seeds, args.func) == ("mnist", 5, 2, cli_ablate.cmd_ablate)


def test_variants_are_paired_by_seed_and_compared_with_the_baseline(tmp_path):
    from glowflow import variants

    base = TrainConfig.from_dict({"model": {"image_shape": [1, 8, 8], "levels": 2, "steps": 1, "hidden_channels": 4},
                                  "batch_size": 8, "init_batch_size": 16, "max_steps": 4, "eval_every": 2,
                                  "test_limit": 8, "device": "cpu", "progress": False})
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (32, 1, 8, 8), generator=g, dtype=torch.uint8))
    vs = [variants.parse_variant("base:"), variants.parse_variant("wider:model.hidden_channels=8 lr=0.002")]
    assert vs[1].overrides == ("model.hidden_channels=8", "lr=0.002")
    res = variants.run_variants(base, tmp_path, vs, seeds=2, train_data=data, test_data=data, progress=False,
                                log=lambda *a: None)
    rows = {r["variant"]: r for r in res["summary"]["table"]}
    runs = {(r["variant"], r["seed"]): r for r in res["runs"]}
    diffs = [runs["wider", s]["final_test_bits_per_dim"] - runs["base", s]["final_test_bits_per_dim"] for s in (0, 1)]
    assert rows["wider"]["difference_from_baseline"] == pytest.approx(sum(diffs) / 2)
    assert rows["wider"]["seeds_lower"] == sum(d < 0 for d in diffs) and "difference_from_baseline" not in rows["base"]
    assert runs["wider", 0]["config"]["model"]["hidden_channels"] == 8 and runs["wider", 0]["config"]["lr"] == 0.002
    assert runs["base", 1]["config"]["seed"] == 1 == runs["base", 1]["config"]["model"]["seed"]
    assert (tmp_path / "table.md").read_text().count("\n|") >= 3 and (tmp_path / "figure.png").is_file()
    again = variants.run_variants(base, tmp_path, vs, seeds=2, train_data=data, test_data=data, progress=False)
    assert again["summary"] == res["summary"]  # finished runs are read, not repeated
    with pytest.raises(ValueError, match="variant 'bad'.*unknown"):
        variants.run_variants(base, tmp_path / "x", [variants.parse_variant("bad:no_such_key=1")], seeds=1,
                              train_data=data, test_data=data, progress=False)


def test_the_variant_figure_shows_every_seed_and_adds_curves_only_when_there_are_any(tmp_path):
    from PIL import Image

    from glowflow import variants

    vs = [variants.parse_variant("base:"), variants.parse_variant("b32:batch_size=32")]

    def runs(points):
        return [{"variant": v.name, "seed": s, "final_test_bits_per_dim": 3.8 - 0.1 * i + 0.01 * s,
                 "test_curve": [{"step": 10 * (k + 1), "train_seconds": 60.0 * (k + 1),
                                 "test_bits_per_dim": 4.0 - 0.1 * k} for k in range(points)]}
                for i, v in enumerate(vs) for s in range(3)]

    variants.plot_variants(runs(1), vs, tmp_path / "final.png")  # one evaluation per run: no curve panel
    variants.plot_variants(runs(3), vs, tmp_path / "curves.png")
    single, double = (Image.open(tmp_path / n).size for n in ("final.png", "curves.png"))
    assert single[0] < 900 < 1200 < double[0]


def test_variant_table_gives_a_spread_only_over_more_than_one_seed():
    from glowflow.variants import Variant, format_variant_table, summarize_variants
    variants = [Variant("base"), Variant("b", ("lr=0.002",))]
    meta = {"test_images": 10, "dataset": "d", "budget": "5 steps per run"}

    def runs(seeds):
        return [{"variant": v, "seed": s, "steps": 5, "final_test_bits_per_dim": 3.0 + 0.1 * s + (0.05 if v == "b" else 0)}
                for v in ("base", "b") for s in seeds]

    one = format_variant_table(summarize_variants(runs([0]), variants), meta)
    assert "| 3.0000 |" in one and "| 3.0500 |" in one and "+0.0500 |" in one and "±" not in one.split("\n", 2)[2]
    two = format_variant_table(summarize_variants(runs([0, 1]), variants), meta)
    assert "3.0500 ± 0.0707" in two and "+0.0500 ± 0.0000" in two
