"""Paired comparisons of training variants: does a change (a lever) lower test bits/dim?

A variant is a name and ``--set`` style overrides of a base preset. Every variant is trained with
seeds 0..n-1 on one budget (steps, or wall-clock minutes); seed ``i`` sets the initial weights and
the data order for every variant, so the per-seed difference from the baseline (the first
variant) is a paired comparison. Test bits/dim of the EMA weights on one fixed test subset, as in
:mod:`glowflow.ablation`, whose runner this shares. Layout of ``out_dir``::

    <variant>-seed<i>/   one run directory each, with result.json
    results.json         every curve, the per-variant summary, the paired differences
    table.md             the summary as a table
    figure.png           final test bits/dim per variant and seed; curves against training time

A finished run (its result.json, with the same settings) is read, not repeated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .ablation import (FIGURE, RESULTS, RUN_RESULT, TABLE, Cell, budget_text, comparison_data, machine_info,
                       mean_std, read_result, spread, train_one, with_budget)
from .config import TrainConfig
from .presets import apply_overrides
from .io import atomic_write_json, atomic_write_text
from .plots import pyplot, save_figure
from .progress import Progress

__all__ = ["Variant", "parse_variant", "variant_config", "run_variants", "summarize_variants",
           "format_variant_table", "plot_variants"]

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class Variant:
    """A named change of the base config: ``overrides`` as ``--set`` takes them (``key=value``)."""

    name: str
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"variant names are letters, digits and . _ + -: got {self.name!r}")
        object.__setattr__(self, "overrides", tuple(self.overrides))


def parse_variant(text: str) -> Variant:
    """``"wide: model.hidden_channels=96 model.steps=8"`` -> Variant("wide", (...)); ``"base:"`` or
    ``"base"`` is the base config unchanged."""
    name, _, rest = text.partition(":")
    return Variant(name.strip(), tuple(rest.split()))


def variant_config(base: TrainConfig, variant: Variant, seed: int, budget_steps: int | None = None,
                   budget_minutes: float | None = None, eval_every: int | None = None) -> TrainConfig:
    """``base`` with the variant's overrides, then the seed and budget of one run."""
    try:
        cfg = TrainConfig.from_dict(apply_overrides(base.to_dict(), list(variant.overrides)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"variant {variant.name!r}: {e}") from None
    return with_budget(cfg, seed, budget_steps, budget_minutes, eval_every)


def summarize_variants(runs: Sequence[dict], variants: Sequence[Variant]) -> dict:
    """Per variant: mean ± std of the final test bits/dim and of the steps reached; for each variant
    but the first, the paired difference from the first (negative: lower bits/dim, better)."""
    by = {v.name: {r["seed"]: r for r in runs if r["variant"] == v.name} for v in variants}
    base = variants[0].name
    rows = []
    for v in variants:
        rs = by[v.name]
        if not rs:
            continue
        finals = [r["final_test_bits_per_dim"] for r in rs.values()]
        mean, std = mean_std(finals)
        row = {"variant": v.name, "overrides": list(v.overrides), "seeds": sorted(rs),
               "final_test_bits_per_dim_mean": mean, "final_test_bits_per_dim_std": std,
               "steps_mean": mean_std([r["steps"] for r in rs.values()])[0]}
        seeds = sorted(set(rs) & set(by[base]))
        if v.name != base and seeds:
            diffs = [rs[s]["final_test_bits_per_dim"] - by[base][s]["final_test_bits_per_dim"] for s in seeds]
            gap, gap_std = mean_std(diffs)
            row.update(difference_from_baseline=gap, difference_std=gap_std,
                       seeds_lower=sum(d < 0 for d in diffs), paired_seeds=len(diffs))
        rows.append(row)
    return {"baseline": base, "table": rows}


def format_variant_table(summary: dict, meta: dict) -> str:
    lines = [f"Final test bits/dim on {meta['test_images']} {meta['dataset']} test images (EMA weights), "
             f"mean ± std over seeds; budget: {meta['budget']}. Difference: paired by seed, from "
             f"`{summary['baseline']}` (negative is better).", "",
             "| variant | overrides | test bits/dim | steps | difference | lower in |", "|---|---|---|---|---|---|"]
    for r in summary["table"]:
        diff = (f"{r['difference_from_baseline']:+.4f}{spread(r['difference_std'], r['paired_seeds'])}"
                if "difference_from_baseline" in r else "(baseline)")
        lower = f"{r['seeds_lower']}/{r['paired_seeds']}" if "seeds_lower" in r else ""
        lines.append(f"| {r['variant']} | `{' '.join(r['overrides']) or '-'}` | {r['final_test_bits_per_dim_mean']:.4f}"
                     f"{spread(r['final_test_bits_per_dim_std'], len(r['seeds']))} | {r['steps_mean']:.0f} | {diff} | "
                     f"{lower} |")
    return "\n".join(lines) + "\n"


def plot_variants(runs: Sequence[dict], variants: Sequence[Variant], path, title: str = "") -> None:
    """Final test bits/dim per variant, one dot per seed (seeds joined across variants, since they
    are paired) and the mean; beside it, when runs were evaluated more than once, test bits/dim
    against training seconds, one line per variant (the mean over seeds at each evaluation all
    seeds reached)."""
    plt = pyplot()
    shown = [(v, [r for r in runs if r["variant"] == v.name and r["test_curve"]]) for v in variants]
    shown = [(v, rs) for v, rs in shown if rs]
    curves = any(len(r["test_curve"]) > 1 for _, rs in shown for r in rs)
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 7, 4.5), dpi=110, squeeze=False)
    ax = axes[0][0]
    finals: dict[int, list[tuple[int, float]]] = {}
    for i, (v, rs) in enumerate(shown):
        ys = [r["final_test_bits_per_dim"] for r in rs]
        ax.scatter([i] * len(ys), ys, s=18, color="0.35", zorder=3)
        ax.plot([i - 0.25, i + 0.25], [mean_std(ys)[0]] * 2, color="C3", linewidth=2.5, zorder=4)
        for r in rs:
            finals.setdefault(r["seed"], []).append((i, r["final_test_bits_per_dim"]))
    for points in finals.values():
        ax.plot(*zip(*points), color="0.6", linewidth=0.7, zorder=2)
    ax.set_xticks(range(len(shown)), [f"{v.name}\n(n={len(rs)})" for v, rs in shown])
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_ylabel("final test bits/dim (EMA weights)")
    ax.set_title("each seed (grey, paired seeds joined) and the mean (red)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if curves:
        ax = axes[0][1]
        for v, rs in shown:
            n = min(len(r["test_curve"]) for r in rs)
            xs = [mean_std([r["test_curve"][i]["train_seconds"] for r in rs])[0] for i in range(n)]
            ys = [mean_std([r["test_curve"][i]["test_bits_per_dim"] for r in rs])[0] for i in range(n)]
            ax.plot(xs, ys, ".-", label=f"{v.name} (n={len(rs)})")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("test bits/dim (EMA weights), mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def run_variants(base: TrainConfig, out_dir, variants: Sequence[Variant], seeds: int | Sequence[int] = 3,
                 budget_steps: int | None = None, budget_minutes: float | None = None,
                 eval_every: int | None = None, train_data=None, test_data=None, progress: bool = True,
                 log=print) -> dict:
    """Train every (variant, seed) on one budget and write results.json, table.md, figure.png.
    The first variant is the baseline of the paired differences. Returns results.json's content."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or not variants:
        raise ValueError("give at least one seed and one variant")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    configs = {(v.name, s): variant_config(base, v, s, budget_steps, budget_minutes, eval_every)
               for v in variants for s in seed_list}  # every override checked before any training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_data, test_data = comparison_data(base, train_data, test_data)
    first = configs[names[0], seed_list[0]]
    meta = {"dataset": base.dataset, "test_images": min(len(test_data), first.test_limit or len(test_data)),
            "train_images": len(train_data), "budget": budget_text(first), "seeds": seed_list,
            "variants": [{"name": v.name, "overrides": list(v.overrides)} for v in variants],
            "machine": machine_info("cuda" if torch.cuda.is_available() and first.device != "cpu" else "cpu")}
    cells = [Cell((("variant", v.name),), s) for s in seed_list for v in variants]  # seed-major: pairs finish together
    bar = Progress(len(cells), "variants", enabled=progress, unit="run")
    write = bar.write if progress else log
    runs = []
    for i, cell in enumerate(cells, 1):
        cfg = configs[cell.labels[0][1], cell.seed]
        result = read_result(out / cell.name / RUN_RESULT, cfg)
        if result is None:
            result = train_one(cfg, cell, out / cell.name, train_data, test_data)
        runs.append(result)
        write(f"[{i}/{len(cells)}] {cell.name}: {result['steps']} steps, test bits/dim "
              f"{result['final_test_bits_per_dim']:.4f}")
        bar.update(1)
    bar.close()
    summary = summarize_variants(runs, variants)
    results = {"meta": meta, "summary": summary, "runs": runs}
    atomic_write_json(out / RESULTS, results, indent=1)
    atomic_write_text(out / TABLE, format_variant_table(summary, meta))
    plot_variants(runs, variants, out / FIGURE, title=f"{meta['dataset']}: {meta['budget']}")
    return results
