"""Plots written during training and by the ablation runner (matplotlib, no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

from . import io

__all__ = ["pyplot", "plot_curves", "save_figure"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Lay out ``fig``, write it as a PNG atomically, and close it."""
    fig.tight_layout()
    path = Path(path)
    with io.atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return path


def plot_curves(history: list[dict], path) -> None:
    """Train bits/dim per logged step and test bits/dim per evaluation, against steps."""
    plt = pyplot()
    def finite(value) -> bool:  # a skipped step logs NaN, written to metrics.jsonl as null
        return isinstance(value, (int, float)) and math.isfinite(value)

    train = [(r["step"], r["bits_per_dim"]) for r in history if "event" not in r and finite(r.get("bits_per_dim"))]
    test = [(r["step"], r["test_bits_per_dim"]) for r in history if finite(r.get("test_bits_per_dim"))]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train (batch)", alpha=0.7)
    if test:
        ax.plot(*zip(*test), "o-", label="test (EMA weights)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    if train or test:
        values = [v for _, v in train + test]
        lo = min(values)
        ax.set_ylim(lo - 0.1, min(max(values), lo + 3.0))
        ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
