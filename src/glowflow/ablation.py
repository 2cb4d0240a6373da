"""The paper's ablation (Kingma & Dhariwal 2018, Figure 3): permutation x coupling on one budget.

Every run trains the same model (levels, steps, width, learning-rate schedule) with one of the
permutations ``reverse`` / ``shuffle`` / ``invconv`` (learned 1x1 convolution) and one of the
couplings ``additive`` / ``affine``. Seed index ``i`` gives the same seed to the model's
initialisation and to the data order (batches, dequantisation noise) in all six configs.
Test bits/dim is measured on the EMA weights (as ``Trainer.test_metrics`` and ``glowflow eval`` do),
every ``eval_every`` steps and at the last step, on one fixed test subset (the first
``test_limit`` test images, the same dequantisation noise).

Layout of ``out_dir``::

    <coupling>-<permutation>-seed<i>/   one Trainer run directory each, plus result.json
    results.json                        every curve, the summary and the ordering check
    figure.png                          test bits/dim against steps, mean ± std over seeds
    table.md                            final test bits/dim per (coupling, permutation)

A run whose ``result.json`` exists (with the same settings) is skipped, so an interrupted
ablation continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .config import PERMUTATIONS, TrainConfig
from .data import get_dataset
from . import io
from .io import atomic_write_json, atomic_write_text
from .plots import pyplot, save_figure
from .progress import Progress
from .train import Trainer

__all__ = ["Cell", "RunSpec", "run_config", "run_ablation", "train_one", "summarize", "check_ordering", "format_table",
           "plot_ablation", "DEFAULT_PRESET", "DEFAULT_PERMUTATIONS", "PANEL_COUPLINGS", "PAPER_ORDER",
           "RESULTS", "FIGURE", "TABLE", "RUN_RESULT"]

DEFAULT_PRESET = "ablation-fashion-mnist-cpu"
DEFAULT_PERMUTATIONS = ("reverse", "shuffle", "invconv")  # the paper's Figure 3
PANEL_COUPLINGS = ("additive", "affine")  # the figure's panels, left to right
# The paper's claim, best (lowest bits/dim) first. "invconv" stands for either 1x1-conv variant.
PAPER_ORDER = ("invconv", "shuffle", "reverse")
RUN_RESULT = "result.json"
RESULTS = "results.json"
FIGURE = "figure.png"
TABLE = "table.md"
WEIGHTS_EVALUATED = "ema"
LABELS = {"invconv": "1x1 conv", "invconv_lu": "1x1 conv (LU)", "shuffle": "shuffle", "reverse": "reverse"}
COLOURS = {"invconv": "tab:red", "invconv_lu": "tab:purple", "shuffle": "tab:green", "reverse": "tab:blue"}
_NO_STEP_LIMIT = 2**62  # a minutes-only budget


@dataclass(frozen=True)
class Cell:
    """One run of a comparison: its labels (field -> value, in order) and its seed. The labels name
    its directory (``affine-invconv-seed0``) and stand in its result.json."""

    labels: tuple[tuple[str, str], ...]
    seed: int

    @property
    def name(self) -> str:
        return "-".join(value for _, value in self.labels) + f"-seed{self.seed}"

    def fields(self) -> dict:
        return {**dict(self.labels), "seed": self.seed}


class RunSpec(Cell):
    """One cell of the paper's grid: a coupling, a permutation, a seed."""

    def __init__(self, coupling: str, permutation: str, seed: int):
        super().__init__((("coupling", coupling), ("permutation", permutation)), seed)

    @property
    def coupling(self) -> str:
        return self.labels[0][1]

    @property
    def permutation(self) -> str:
        return self.labels[1][1]


def with_budget(cfg: TrainConfig, seed: int, budget_steps: int | None = None, budget_minutes: float | None = None,
                eval_every: int | None = None) -> TrainConfig:
    """``cfg`` as one run of a comparison: ``seed`` for both the initial weights and the data order,
    and the budget. With neither budget given, ``cfg.max_steps`` / ``cfg.max_minutes`` are the
    budget; with one or both given they replace it (a missing one means no limit of that kind)."""
    if budget_steps is None and budget_minutes is None:
        max_steps, max_minutes = cfg.max_steps, cfg.max_minutes
    else:
        max_steps = _NO_STEP_LIMIT if budget_steps is None else int(budget_steps)
        max_minutes = budget_minutes
    every = int(eval_every or cfg.eval_every)
    # checkpoints and sample grids only at the last step: they cost time and are not what is compared
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seed=seed), seed=seed, max_steps=max_steps,
                               max_minutes=max_minutes, eval_every=every, checkpoint_every=_NO_STEP_LIMIT,
                               sample_every=_NO_STEP_LIMIT, progress=False)


def run_config(base: TrainConfig, spec: RunSpec, budget_steps: int | None = None,
               budget_minutes: float | None = None, eval_every: int | None = None) -> TrainConfig:
    """``base`` with only the permutation, coupling, seed and budget changed (:func:`with_budget`)."""
    model = dataclasses.replace(base.model, coupling=spec.coupling, permutation=spec.permutation)
    return with_budget(dataclasses.replace(base, model=model), spec.seed, budget_steps, budget_minutes, eval_every)


class _TimedTrainer(Trainer):
    """A Trainer whose evaluations also record the wall-clock time since training began."""

    def run(self) -> dict:
        self._t0, self._eval_seconds = time.perf_counter(), 0.0
        return super().run()

    def test_metrics(self) -> dict:
        start = time.perf_counter()
        row = super().test_metrics()
        if row:
            row["seconds"] = round(start - self._t0, 2)  # includes the earlier evaluations
            row["train_seconds"] = round(start - self._t0 - self._eval_seconds, 2)
        self._eval_seconds += time.perf_counter() - start
        return row


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("progress", "device")}


def read_result(path: Path, cfg: TrainConfig) -> dict | None:
    if not path.is_file():
        return None
    try:
        result = io.parse_json(path.read_text())
    except ValueError:  # a write cut short: run it again
        return None
    if not isinstance(result, dict):
        return None
    if _comparable(result.get("config", {})) != _comparable(cfg.to_dict()):
        raise ValueError(f"{path} holds a run with other settings than this ablation; "
                         f"use another --out or remove {path.parent}")
    return result


def train_one(cfg: TrainConfig, spec, run_dir, train_data, test_data, log=None) -> dict:
    """Train one cell and write its ``result.json``: the test curve, the train curve, the time.

    ``spec`` (a :class:`RunSpec`, or any object with ``fields()``) names the cell in the result.
    A cell directory without ``result.json`` holds an interrupted run: it is trained again from the
    start (``overwrite``)."""
    run_dir = Path(run_dir)
    trainer = _TimedTrainer(cfg, run_dir, train_data, test_data, log=log or (lambda *a, **k: None), overwrite=True)
    summary = trainer.run()
    history = trainer.history
    curve = [{k: r[k] for k in ("step", "seconds", "train_seconds", "test_bits_per_dim", "test_bits_per_dim_se")}
             for r in history if "test_bits_per_dim" in r]
    train_curve = [[r["step"], round(r["bits_per_dim"], 4)] for r in history
                   if "event" not in r and isinstance(r.get("bits_per_dim"), (int, float))
                   and math.isfinite(r["bits_per_dim"])]
    result = {
        **spec.fields(),
        "steps": summary["steps"], "seconds": summary["seconds"], "stop_reason": summary["stop_reason"],
        "final_test_bits_per_dim": curve[-1]["test_bits_per_dim"] if curve else None,
        "nonfinite_events": sum(1 for r in history if r.get("event") in ("skipped", "recovered")),
        "test_curve": curve, "train_curve": train_curve, "config": cfg.to_dict(),
    }
    atomic_write_json(run_dir / RUN_RESULT, result, indent=1)
    return result


# ------------------------------------------------------------------------------------ statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def spread(std: float, n: int) -> str:
    """``" ± std"`` over n > 1 seeds; nothing for one seed, whose spread is unknown, not zero."""
    return f" ± {std:.4f}" if n > 1 else ""


def check_ordering(finals: Mapping[str, Sequence[float]], order: Sequence[str] = PAPER_ORDER) -> dict:
    """Does ``order`` (best first) hold for the mean final bits/dim in ``finals``?

    ``finals`` maps a name to its per-seed values, aligned by seed (seed ``i`` at index ``i`` for
    every name). ``holds`` is None when a name of ``order`` is missing. Each adjacent pair also
    says in how many seeds the better one was lower, a paired comparison: the same seed means
    the same data order.
    """
    missing = [name for name in order if name not in finals or not len(finals[name])]
    if missing:
        return {"order": list(order), "holds": None, "missing": missing}
    means = {name: mean_std(list(finals[name]))[0] for name in order}
    pairs = []
    for better, worse in zip(order, order[1:]):
        b, w = list(finals[better]), list(finals[worse])
        diffs = [y - x for x, y in zip(b, w)]
        pairs.append({"better": better, "worse": worse, "gap": means[worse] - means[better],
                      "gap_std": mean_std(diffs)[1], "seeds_agreeing": sum(d > 0 for d in diffs),
                      "seeds": len(diffs)})
    return {"order": list(order), "holds": all(p["gap"] > 0 for p in pairs),
            "observed": sorted(order, key=lambda name: means[name]), "means": means, "pairs": pairs}


def _paper_order(permutations: Sequence[str]) -> list[str]:
    """PAPER_ORDER with "invconv" replaced by whichever 1x1-conv variant was run."""
    conv = next((p for p in ("invconv", "invconv_lu") if p in permutations), "invconv")
    return [conv if name == "invconv" else name for name in PAPER_ORDER]


def summarize(runs: Sequence[dict]) -> dict:
    """Final test bits/dim per (coupling, permutation) and the paper's two orderings."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        cells.setdefault((r["coupling"], r["permutation"]), []).append(r)
    rows = []
    for (coupling, permutation), rs in cells.items():
        mean, std = mean_std([r["final_test_bits_per_dim"] for r in rs])
        rows.append({"coupling": coupling, "permutation": permutation, "seeds": [r["seed"] for r in rs],
                     "final_test_bits_per_dim_mean": mean, "final_test_bits_per_dim_std": std,
                     "steps_min": min(r["steps"] for r in rs), "steps_max": max(r["steps"] for r in rs),
                     "seconds_mean": mean_std([r["seconds"] for r in rs])[0]})
    couplings = [c for c in PANEL_COUPLINGS if any(k[0] == c for k in cells)]
    permutations = sorted({k[1] for k in cells}, key=lambda p: (list(LABELS).index(p) if p in LABELS else 99))
    finals = {k: {r["seed"]: r["final_test_bits_per_dim"] for r in rs} for k, rs in cells.items()}

    def check(keys: dict, order) -> dict:
        """The ordering check on the seeds that every compared cell has (paired by seed)."""
        present = {name: finals[k] for name, k in keys.items() if k in finals}
        seeds = sorted(set.intersection(*(set(v) for v in present.values()))) if present else []
        return check_ordering({name: [v[s] for s in seeds] for name, v in present.items()}, order)

    ordering = {c: check({p: (c, p) for p in permutations}, _paper_order(permutations)) for c in couplings}
    coupling_check = {p: check({c: (c, p) for c in couplings}, ("affine", "additive")) for p in permutations}
    return {"table": rows, "permutation_ordering": ordering, "coupling_ordering": coupling_check}


def _fmt_order(check: dict) -> str:
    names = [LABELS.get(n, n) for n in check["order"]]
    if check["holds"] is None:
        return f"{' < '.join(names)}: not checkable (missing {', '.join(check['missing'])})"
    verdict = "holds" if check["holds"] else "does NOT hold"
    gaps = "; ".join(f"{LABELS.get(p['worse'], p['worse'])} − {LABELS.get(p['better'], p['better'])} = "
                     f"{p['gap']:+.4f}{spread(p['gap_std'], p['seeds'])}, {LABELS.get(p['better'], p['better'])} lower in "
                     f"{p['seeds_agreeing']}/{p['seeds']} seeds" for p in check["pairs"])
    observed = " < ".join(LABELS.get(n, n) for n in check["observed"])
    return f"{' < '.join(names)} {verdict} (observed: {observed}; {gaps})"


def format_table(summary: dict, meta: dict) -> str:
    """The markdown table of final test bits/dim, and one line per ordering check."""
    lines = [f"Final test bits/dim on {meta['test_images']} {meta['dataset']} test images "
             f"({WEIGHTS_EVALUATED.upper()} weights), mean ± std over seeds; budget: {meta['budget']}.", "",
             "| coupling | permutation | test bits/dim | seeds | steps | s/run |",
             "|---|---|---|---|---|---|"]
    for row in summary["table"]:
        steps = (str(row["steps_min"]) if row["steps_min"] == row["steps_max"]
                 else f"{row['steps_min']}–{row['steps_max']}")
        lines.append(f"| {row['coupling']} | {LABELS.get(row['permutation'], row['permutation'])} | "
                     f"{row['final_test_bits_per_dim_mean']:.4f}"
                     f"{spread(row['final_test_bits_per_dim_std'], len(row['seeds']))} | "
                     f"{len(row['seeds'])} | {steps} | {row['seconds_mean']:.0f} |")
    lines += ["", "Gaps are mean ± std over seeds of the paired per-seed differences (same seed: same "
              "initialisation seed and data order).", ""]
    for coupling, check in summary["permutation_ordering"].items():
        lines.append(f"- {coupling}: {_fmt_order(check)}")
    for permutation, check in summary["coupling_ordering"].items():
        if check["holds"] is not None:
            lines.append(f"- {LABELS.get(permutation, permutation)}: {_fmt_order(check)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ figure
def _mean_curve(runs: Sequence[dict]) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over seeds at the evaluation steps every seed reached; when the runs stopped at
    different steps (a minutes budget), their last points are averaged at the mean last step."""
    curves = [{p["step"]: p["test_bits_per_dim"] for p in r["test_curve"]} for r in runs]
    common = sorted(set.intersection(*(set(c) for c in curves)))
    xs, means, stds = [], [], []
    for s in common:
        m, sd = mean_std([c[s] for c in curves])
        xs.append(s), means.append(m), stds.append(sd)
    last_steps = [max(c) for c in curves]
    if len(set(last_steps)) > 1:
        m, sd = mean_std([c[max(c)] for c in curves])
        xs.append(sum(last_steps) / len(last_steps)), means.append(m), stds.append(sd)
    return xs, means, stds


def plot_ablation(runs: Sequence[dict], path, title: str = "") -> None:
    """Two panels (additive, affine): test bits/dim against steps, one line per permutation with a
    mean ± std band over seeds (the layout of the paper's Figure 3)."""
    plt = pyplot()
    couplings = [c for c in PANEL_COUPLINGS if any(r["coupling"] == c for r in runs)]
    fig, axes = plt.subplots(1, max(1, len(couplings)), figsize=(5 * max(1, len(couplings)), 4), dpi=100,
                             sharey=True, squeeze=False)
    lows, highs = [], []
    for ax, coupling in zip(axes[0], couplings):
        for permutation in LABELS:
            rs = [r for r in runs if r["coupling"] == coupling and r["permutation"] == permutation and r["test_curve"]]
            if not rs:
                continue
            xs, means, stds = _mean_curve(rs)
            colour = COLOURS[permutation]
            ax.plot(xs, means, ".-", color=colour, label=f"{LABELS[permutation]} (n={len(rs)})")
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colour, alpha=0.2, linewidth=0)
            late = [m + s for x, m, s in zip(xs, means, stds) if x >= 0.2 * xs[-1]] or means
            lows.append(min(m - s for m, s in zip(means, stds)))
            highs.append(max(late))
        ax.set_title(f"{coupling} coupling")
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel(f"test bits/dim ({WEIGHTS_EVALUATED.upper()} weights)")
    if lows:
        span = max(max(highs) - min(lows), 1e-3)
        axes[0][0].set_ylim(min(lows) - 0.05 * span, max(highs) + 0.05 * span)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------ the runner
def comparison_data(base: TrainConfig, train_data=None, test_data=None):
    """The datasets a comparison trains and scores on: those given, else ``base.dataset`` loaded with
    ``base.train_limit`` / ``base.test_limit``."""
    if train_data is None:
        train_data = get_dataset(base.dataset, base.data, "train", limit=base.train_limit)
    if test_data is None:
        test_data = get_dataset(base.dataset, base.data, "test", limit=base.test_limit)
    return train_data, test_data


def machine_info(device) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}


def budget_text(cfg: TrainConfig) -> str:
    parts = []
    if cfg.max_steps < _NO_STEP_LIMIT:
        parts.append(f"{cfg.max_steps} steps")
    if cfg.max_minutes is not None:
        parts.append(f"{cfg.max_minutes:g} min")
    return " or ".join(parts) + " per run" + ", whichever came first" * (len(parts) > 1)


def run_ablation(base: TrainConfig, out_dir, seeds: int | Sequence[int] = 3,
                 permutations: Sequence[str] = DEFAULT_PERMUTATIONS, couplings: Sequence[str] = PANEL_COUPLINGS,
                 budget_steps: int | None = None, budget_minutes: float | None = None,
                 eval_every: int | None = None, train_data=None, test_data=None,
                 progress: bool = True, log=print) -> dict:
    """Train every (coupling, permutation, seed) on one budget; write results.json, figure, table.

    ``seeds`` is a count (seeds 0..n-1) or the seeds themselves. ``train_data`` / ``test_data``
    (:class:`~glowflow.data.ImageDataset`) default to ``base.dataset`` loaded with
    ``base.train_limit`` / ``base.test_limit``. Runs already done in ``out_dir`` are read, not
    repeated. Returns the content of results.json.
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must be a positive count or a non-empty list of seeds")
    for name, given, allowed in (("permutation", permutations, PERMUTATIONS), ("coupling", couplings, PANEL_COUPLINGS)):
        bad = [g for g in given if g not in allowed]
        if bad or not given:
            raise ValueError(f"{name}s must be a non-empty subset of {allowed}, got {list(given)}")
    if budget_steps is not None and budget_steps < 1:
        raise ValueError(f"budget_steps must be >= 1, got {budget_steps}")
    if budget_minutes is not None and not budget_minutes > 0:
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_data, test_data = comparison_data(base, train_data, test_data)
    specs = [RunSpec(c, p, s) for s in seed_list for c in couplings for p in permutations]
    bar = Progress(len(specs), "ablation", enabled=progress, unit="run")
    write = bar.write if progress else log
    runs, skipped = [], 0
    first_cfg = run_config(base, specs[0], budget_steps, budget_minutes, eval_every)
    meta = {"dataset": base.dataset, "test_images": min(len(test_data), first_cfg.test_limit or len(test_data)),
            "train_images": len(train_data), "budget": budget_text(first_cfg),
            "evaluated_weights": WEIGHTS_EVALUATED, "eval_every": first_cfg.eval_every, "seeds": seed_list,
            "permutations": list(permutations), "couplings": list(couplings)}

    def write_outputs():
        summary = summarize(runs)
        results = {"meta": {**meta, "machine": machine_info(first_cfg.device if first_cfg.device != "auto" else
                                                        ("cuda" if torch.cuda.is_available() else "cpu"))},
                   "summary": summary, "runs": runs}
        atomic_write_json(out / RESULTS, results, indent=1)
        atomic_write_text(out / TABLE, format_table(summary, meta))
        plot_ablation(runs, out / FIGURE, title=f"{meta['dataset']}: {meta['budget']}; "
                                               f"mean ± std over {len(seed_list)} seed{'s' * (len(seed_list) > 1)}")
        return results

    last_write = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        cfg = run_config(base, spec, budget_steps, budget_minutes, eval_every)
        run_dir = out / spec.name
        result = read_result(run_dir / RUN_RESULT, cfg)
        if result is not None:
            skipped += 1
            runs.append(result)
            write(f"[{i}/{len(specs)}] {spec.name}: done before, skipped "
                  f"(test bits/dim {result['final_test_bits_per_dim']:.4f})")
            bar.update(1)
            continue
        warn = lambda msg, name=spec.name: write(f"{name}: {msg}") if "warning" in str(msg) else None  # noqa: E731
        result = train_one(cfg, spec, run_dir, train_data, test_data, log=warn)
        runs.append(result)
        write(f"[{i}/{len(specs)}] {spec.name}: {result['steps']} steps in {result['seconds']:.0f} s "
              f"({result['stop_reason']}), test bits/dim {result['final_test_bits_per_dim']:.4f}")
        bar.update(1)
        if i < len(specs) and time.perf_counter() - last_write > 30:
            write_outputs()  # partial results to look at while the rest trains
            last_write = time.perf_counter()
    bar.close()
    results = write_outputs()
    results["skipped"] = skipped
    return results
