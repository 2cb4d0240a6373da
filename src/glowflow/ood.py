"""Out-of-distribution (OOD) detection with a flow's exact likelihood, and the metrics that grade it.

Convention throughout: **out-of-distribution is the positive class, and a higher score means "more
OOD"**. The scores, each per input (or per group of M inputs), from per-image bits/dim ``b(x)``:

- ``likelihood``: ``b(x)`` itself. A Glow trained on Fashion-MNIST gives MNIST digits *lower*
  bits/dim than Fashion-MNIST's own test images (Nalisnick et al., "Do Deep Generative Models Know
  What They Don't Know?", ICLR 2019), so this score fails there: AUROC far below 0.5.
- ``typicality_mM``: groups of M inputs scored by ``|mean of their b - b_typical|`` (Nalisnick et
  al., "Detecting Out-of-Distribution Inputs to Deep Generative Models Using Typicality", 2019;
  ``b`` is ``-log p / (D ln 2)`` plus a constant, so this is their statistic in bits per dimension).
  They estimate the typical value on held-out training data; here ``b_typical`` is the mean over a
  reference set, by default images of the in-distribution's training split, which the model saw.
- ``complexity_C``: ``S(x) = b(x) - L(x)``, with ``L(x)`` the bits per dimension of the image
  compressed losslessly by C (Serrà et al., "Input Complexity and Out-of-Distribution Detection
  with Likelihood-based Generative Models", ICLR 2020, who used PNG, JPEG2000 and FLIF). ``png`` is
  the whole PNG file at maximum compression; ``zlib``, ``bz2`` and ``lzma`` compress the raw bytes.
- ``likelihood_ratio``: ``b(x) - b_background(x) = -(log p(x) - log p_bg(x)) / (D ln 2)``, the
  negated log-likelihood ratio against a background model trained on inputs whose pixels were
  replaced by uniform random values with probability mu (Ren et al., "Likelihood Ratios for
  Out-of-Distribution Detection", NeurIPS 2019; ``TrainConfig.perturb_rate``). Both models score
  the same dequantisation noise.

Metrics (exact, ties counted as half / as one threshold): :func:`auroc`, :func:`aupr`,
:func:`fpr_at_tpr`.
"""
from __future__ import annotations

import bz2
import io as _bytes_io
import lzma
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import io
from .images import to_pil
from .inputs import InputSet, load_input, parse_set
from .likelihood import score
from .plots import pyplot, save_figure

__all__ = ["auroc", "aupr", "fpr_at_tpr", "detection_metrics", "typicality_scores", "compressed_bits_per_dim",
           "complexity_scores", "likelihood_ratio_scores", "run_ood", "OODReport", "plot_histogram",
           "markdown_table", "write_report", "default_reference", "COMPRESSORS", "REFERENCE_IMAGES", "TPR_LEVEL"]

COMPRESSORS = ("png", "zlib", "bz2", "lzma")
REFERENCE_IMAGES = 10_000  # training images (evenly spaced) that estimate the typical bits/dim
TPR_LEVEL = 0.95


# ------------------------------------------------------------------------------------ metrics
def _pair(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(scores_in, dtype=np.float64).ravel()
    b = np.asarray(scores_out, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"OOD metrics need scores of both sets, got {a.size} in and {b.size} out")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("OOD scores contain NaN or inf")
    return a, b


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve, OOD positive: P(s_out > s_in) + P(s_out = s_in) / 2 over all pairs
    (the Mann-Whitney statistic, from mid-ranks, so ties count one half). 1: every OOD input
    scores above every in-distribution one; 0.5: no better than chance; 0: exactly reversed."""
    a, b = _pair(scores_in, scores_out)
    values, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first copy
    mid_rank = first_rank + (counts - 1) / 2.0
    rank_sum_out = mid_rank[inverse[a.size:]].sum()
    return float((rank_sum_out - b.size * (b.size + 1) / 2.0) / (a.size * b.size))


def _curve(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when flagging ``s >= t``, for each distinct score t, highest first."""
    thresholds = np.unique(np.concatenate([a, b]))[::-1]
    tp = np.searchsorted(-np.sort(b)[::-1], -thresholds, side="right")  # count of b >= t
    fp = np.searchsorted(-np.sort(a)[::-1], -thresholds, side="right")
    return tp, fp


def aupr(scores_in, scores_out) -> float:
    """Area under the precision-recall curve, OOD positive, as average precision: the sum over
    thresholds t (each distinct score, flagging ``s >= t``) of the recall gained at t times the
    precision at t (scikit-learn's ``average_precision_score``). Tied scores form one threshold.
    A perfect detector has 1; chance has about the OOD share of the inputs."""
    a, b = _pair(scores_in, scores_out)
    tp, fp = _curve(a, b)
    new_positives = np.diff(tp, prepend=0)  # divided by their count once, so a perfect detector gives 1 exactly
    return float((new_positives * (tp / (tp + fp))).sum() / b.size)


def fpr_at_tpr(scores_in, scores_out, tpr: float = TPR_LEVEL) -> float:
    """The share of in-distribution inputs flagged (``s >= t``) at the highest threshold t that
    flags at least ``tpr`` of the OOD inputs: the false-positive rate at 95% true-positive rate
    ("FPR95") by default. Inputs tied at t are all flagged."""
    a, b = _pair(scores_in, scores_out)
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    k = max(1, math.ceil(tpr * b.size - 1e-9))  # OOD inputs that must be flagged
    t = np.sort(b)[::-1][k - 1]
    return float((a >= t).mean())


def detection_metrics(scores_in, scores_out) -> dict:
    """``{"auroc", "aupr", "fpr95"}`` of one score, OOD positive, higher = more OOD."""
    return {"auroc": auroc(scores_in, scores_out), "aupr": aupr(scores_in, scores_out),
            "fpr95": fpr_at_tpr(scores_in, scores_out)}


# ------------------------------------------------------------------------------------- scores
def typicality_scores(bits_per_dim, typical: float, m: int, generator: torch.Generator | None = None) -> np.ndarray:
    """``|mean of each group of m bits/dim - typical|``: ``[N // m]`` groups of consecutive inputs
    (after a permutation drawn from ``generator``, if given); the last ``N % m`` are left out."""
    bpd = np.asarray(bits_per_dim, dtype=np.float64).ravel()
    if m < 1 or m > bpd.size:
        raise ValueError(f"typicality groups of M = {m} inputs need 1 <= M <= {bpd.size} (the inputs there are)")
    if generator is not None:
        bpd = bpd[torch.randperm(bpd.size, generator=generator).numpy()]
    groups = bpd[:bpd.size // m * m].reshape(-1, m)
    return np.abs(groups.mean(1) - typical)


def _compressed_bytes(image: torch.Tensor, compressor: str) -> int:
    if compressor == "png":
        buffer = _bytes_io.BytesIO()
        to_pil(image).save(buffer, format="PNG", optimize=True)  # maximum zlib level and the best filters
        return len(buffer.getvalue())
    raw = image.contiguous().numpy().tobytes()
    if compressor == "zlib":
        return len(zlib.compress(raw, 9))
    if compressor == "bz2":
        return len(bz2.compress(raw, 9))
    # a raw LZMA2 stream (no container) with a dictionary the size of the image: preset 9's 64 MiB
    # dictionary would only cost an allocation per image
    lzma2 = {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": max(4096, len(raw))}
    return len(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[lzma2]))


def compressed_bits_per_dim(images: torch.Tensor, compressor: str = "png") -> np.ndarray:
    """L(x): bits per dimension of each uint8 image ``[N, C, H, W]`` compressed losslessly, ``8 *
    bytes / (C H W)``. ``png``: the whole PNG file (header included) at maximum compression; the
    others (:data:`COMPRESSORS`) compress the raw ``C, H, W`` bytes at their highest level (``lzma``:
    a raw LZMA2 stream, preset 9e). Constant overheads (headers) shift every L alike, so they do not
    change a detector's ranking."""
    if compressor not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {', '.join(COMPRESSORS)}, got {compressor!r}")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("images must be a uint8 tensor [N, C, H, W]")
    dims = math.prod(images.shape[1:])
    return np.array([8.0 * _compressed_bytes(x, compressor) / dims for x in images], dtype=np.float64)


def complexity_scores(bits_per_dim, images: torch.Tensor, compressor: str = "png") -> np.ndarray:
    """Serrà et al.'s S(x) = bits/dim(x) - L(x): ``[N]``."""
    return np.asarray(bits_per_dim, dtype=np.float64) - compressed_bits_per_dim(images, compressor)


def likelihood_ratio_scores(bits_per_dim, background_bits_per_dim) -> np.ndarray:
    """``b(x) - b_bg(x)``: Ren et al.'s log-likelihood ratio, negated and in bits per dimension."""
    return np.asarray(bits_per_dim, dtype=np.float64) - np.asarray(background_bits_per_dim, dtype=np.float64)


# ---------------------------------------------------------------------------------------- run
@dataclass
class OODReport:
    """What :func:`run_ood` found. ``metrics``: one row per (score, out-set) with ``auroc``, ``aupr``,
    ``fpr95``, ``n_in``, ``n_out``; ``scores[score][set]``: the per-input (or per-group) scores;
    ``bits_per_dim[set]``: per-image bits/dim; ``sets``: per set, images and mean bits/dim."""

    in_set: str
    out_sets: list[str]
    reference: str | None
    typical_bits_per_dim: float | None
    metrics: list[dict]
    scores: dict[str, dict[str, np.ndarray]]
    bits_per_dim: dict[str, np.ndarray]
    sets: dict[str, dict]
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"in": self.in_set, "out": self.out_sets, "reference": self.reference,
                "typical_bits_per_dim": self.typical_bits_per_dim, "metrics": self.metrics, "sets": self.sets,
                "settings": self.settings}


def _load(spec: str, shape, roots, seed: int, limit: int | None, spread: bool) -> InputSet:
    data = load_input(spec, shape, roots, seed, limit, spread)
    if data.failures:
        name, message = data.failures[0]
        raise ValueError(f"{spec}: {len(data.failures)} file(s) cannot be read, e.g. {message}; remove or fix them")
    if len(data) == 0:
        raise ValueError(f"{spec}: holds no images")
    return data


def default_reference(in_set: str) -> str:
    """The training split of the in-set's dataset: where the typical bits/dim is estimated."""
    named = parse_set(in_set)
    if named is None or named.kind != "dataset":
        raise ValueError(f"the typicality test needs a reference set for {in_set!r} (pass --reference SET, e.g. "
                         "a folder of training images)")
    return f"{named.name}:train"


def run_ood(model, in_set: str, out_sets: list[str], background=None, reference: str | None = None,
            roots: dict | None = None, typicality_m=(1, 5), compressors=("png",), limit: int | None = None,
            reference_limit: int | None = REFERENCE_IMAGES, batch_size: int = 500, seed: int = 0, draws: int = 1,
            device=None, progress: bool = False, spread: bool = False) -> OODReport:
    """Score the in-set and each out-set with every detector and grade each detector per out-set.

    ``background``: a second model (Ren et al.'s, trained with ``perturb_rate``) for the likelihood
    ratio, skipped when None. ``reference``: the set whose mean bits/dim is the typical value
    (default :func:`default_reference`, ``reference_limit`` images). Typicality groups of M > 1 are
    formed after a permutation seeded by ``seed``; M = 1 keeps each set's order. ``limit``: the first N
    images of each set (``reference_limit``: of the reference set); with ``spread``, N evenly spaced.
    """
    shape = tuple(model.config.image_shape)
    if background is not None and tuple(background.config.image_shape) != shape:
        raise ValueError(f"the background model takes {background.config.image_shape} images, the model "
                         f"{list(shape)}; train it on the same data")
    if not out_sets:
        raise ValueError("name at least one out-of-distribution set")
    if any(m < 1 for m in typicality_m):
        raise ValueError(f"typicality group sizes M must be >= 1, got {list(typicality_m)}")
    for c in compressors:
        if c not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {', '.join(COMPRESSORS)}, got {c!r}")

    def bpd_of(m, data: InputSet) -> np.ndarray:
        res = score(m, data.images, data.labels, batch_size, seed, draws, device, progress, desc=data.spec)
        return res["bits_per_dim"].numpy()

    names = [in_set, *out_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"each set once: {names}")
    data = {s: _load(s, shape, roots, seed, limit, spread) for s in names}
    for s, d in data.items():
        if typicality_m and len(d) < max(typicality_m):
            raise ValueError(f"{s} holds {len(d)} images: too few for typicality groups of M = {max(typicality_m)}")
    bpd = {s: bpd_of(model, d) for s, d in data.items()}
    scores: dict[str, dict[str, np.ndarray]] = {"likelihood": dict(bpd)}
    typical = None
    if typicality_m:
        reference = reference or default_reference(in_set)
        ref = _load(reference, shape, roots, seed, reference_limit, spread)
        typical = float(bpd_of(model, ref).mean())
        for m in typicality_m:  # groups of M > 1 drawn at random (a set may list its images class by class)
            scores[f"typicality_m{m}"] = {
                s: typicality_scores(bpd[s], typical, m, torch.Generator().manual_seed(seed) if m > 1 else None)
                for s in names}
    for c in compressors:
        scores[f"complexity_{c}"] = {s: complexity_scores(bpd[s], data[s].images, c) for s in names}
    bpd_background = {}
    if background is not None:
        bpd_background = {s: bpd_of(background, d) for s, d in data.items()}
        scores["likelihood_ratio"] = {s: likelihood_ratio_scores(bpd[s], bpd_background[s]) for s in names}
    metrics = []
    for name, per_set in scores.items():
        for s in out_sets:
            metrics.append({"score": name, "out": s, "n_in": int(per_set[in_set].size),
                            "n_out": int(per_set[s].size), **detection_metrics(per_set[in_set], per_set[s])})
    sets = {s: {"images": len(d), "bits_per_dim_mean": float(bpd[s].mean()),
                "note": next((n for n in d.notes if n), "")} for s, d in data.items()}
    for s, b in bpd_background.items():
        sets[s]["background_bits_per_dim_mean"] = float(b.mean())
    settings = {"typicality_m": list(typicality_m), "compressors": list(compressors), "limit": limit,
                "reference_limit": reference_limit, "spread": spread, "seed": seed, "draws": draws,
                "background": background is not None}
    return OODReport(in_set, list(out_sets), reference if typicality_m else None, typical, metrics, scores, bpd,
                     sets, settings)


# -------------------------------------------------------------------------------------- report
_SCORE_TITLES = {"likelihood": "bits/dim (likelihood)", "likelihood_ratio": "likelihood ratio (Ren et al.)"}


def _title(name: str) -> str:
    if name.startswith("typicality_m"):
        return f"typicality, M = {name[len('typicality_m'):]} (Nalisnick et al.)"
    if name.startswith("complexity_"):
        return f"complexity S, {name[len('complexity_'):].upper()} (Serrà et al.)"
    return _SCORE_TITLES.get(name, name)


def markdown_table(report: OODReport) -> str:
    """One row per score, one column per out-set, each cell ``AUROC / AUPR / FPR95``."""
    head = "| score | " + " | ".join(f"`{s}`" for s in report.out_sets) + " |"
    lines = [head, "|---" * (len(report.out_sets) + 1) + "|"]
    cells: dict[str, dict[str, str]] = {}
    for r in report.metrics:
        cells.setdefault(r["score"], {})[r["out"]] = f"{r['auroc']:.3f} / {r['aupr']:.3f} / {r['fpr95']:.3f}"
    for name, row in cells.items():
        lines.append(f"| {_title(name)} | " + " | ".join(row[s] for s in report.out_sets) + " |")
    sizes = ", ".join(f"`{s}` {v['images']} images, mean {v['bits_per_dim_mean']:.3f} bits/dim"
                      for s, v in report.sets.items())
    lines += ["", f"In-distribution: `{report.in_set}`. Each cell: AUROC / AUPR / FPR at 95% TPR, "
                  "out-of-distribution positive. Sets: " + sizes + "."]
    if report.typical_bits_per_dim is not None:
        lines.append(f"Typical bits/dim {report.typical_bits_per_dim:.4f}, the mean over `{report.reference}`.")
    return "\n".join(lines) + "\n"


def plot_histogram(bits_per_dim: dict[str, np.ndarray], path, title: str = "") -> Path:
    """Histograms of per-image bits/dim, one per set, on one axis (as Nalisnick et al. 2019's Figure 1
    shows log p(x)), as a PNG a person can read (1200 x 720 pixels). The first set (the
    in-distribution one) is drawn in black over the others."""
    plt = pyplot()
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in bits_per_dim.values()])
    lo, hi = np.percentile(values, [0.2, 99.8])
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
    bins = np.linspace(lo, hi, 121)
    fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for i, (name, v) in enumerate(bits_per_dim.items()):
        v = np.asarray(v, dtype=np.float64)
        outside = int(((v < lo) | (v > hi)).sum())
        label = (f"{name} ({v.size} images, mean {v.mean():.2f})" +
                 (f", {outside} beyond the axis drawn at its ends" if outside else ""))
        first = i == 0  # the in-distribution set: black, drawn over the others
        colour = "black" if first else next(colours)
        ax.hist(np.clip(v, lo, hi), bins=bins, density=True, histtype="stepfilled", alpha=0.15 if first else 0.35,
                color=colour, zorder=3 if first else 2)
        ax.hist(np.clip(v, lo, hi), bins=bins, density=True, histtype="step", linewidth=2.0 if first else 1.2,
                color=colour, label=label, zorder=4 if first else 2)
    ax.set_xlabel("bits/dim (lower = more likely under the model)", fontsize=12)
    ax.set_ylabel("density", fontsize=12)
    if title:
        ax.set_title(title, fontsize=13)
    ax.legend(fontsize=10)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(report: OODReport, directory, title: str = "") -> dict:
    """``results.json``, ``table.md`` and ``histogram.png`` in ``directory``, each written atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"the report directory {directory} is a file; pass a directory (it is created if missing)")
    paths = {"results": directory / "results.json", "table": directory / "table.md",
             "histogram": directory / "histogram.png"}
    io.atomic_write_json(paths["results"], report.to_json())
    io.atomic_write_text(paths["table"], markdown_table(report))
    plot_histogram(report.bits_per_dim, paths["histogram"], title)
    return {k: str(v) for k, v in paths.items()}
