"""Exact likelihood as a tool: per-image bits/dim and log p(x), the number a test set reports.

:func:`score` is the one loop that turns images into bits/dim; evaluation during training,
``glowflow eval``, ``glowflow score`` and ``glowflow ood`` all call it, so a dataset's mean
bits/dim and an image's score come from the same code and the same dequantisation noise.
:func:`score_inputs` scores what a user names (files, folders, ``.npy`` arrays, dataset splits,
synthetic sets: :mod:`glowflow.inputs`), one row per image, an unreadable input or file being a
row with its ``error`` while the rest are scored.
"""
from __future__ import annotations

import csv
import io as _text_io
import math

import torch

from . import io
from .data import ImageDataset
from .inputs import load_input
from .numerics import to_unit
from .progress import Progress

__all__ = ["score", "summarize_bits_per_dim", "describe_outliers", "score_inputs", "summarize_rows", "write_score_csv",
           "SCORE_COLUMNS", "OUTLIER_RATIO"]

# one row per image of score_inputs, and the columns of its CSV file
SCORE_COLUMNS = ("input", "name", "bits_per_dim", "log_prob", "note", "error")


@torch.no_grad()
def score(model, images, labels: torch.Tensor | None = None, batch_size: int = 500, seed: int = 0,
          draws: int = 1, device: torch.device | str | None = None, progress: bool = False,
          desc: str = "score") -> dict[str, torch.Tensor]:
    """Per-image scores of uint8 images ``[N, C, H, W]`` (a tensor or an :class:`ImageDataset`).

    Returns float64 tensors ``[N]``: ``bits_per_dim`` (the paper's metric, of the image quantised to
    the model's bit depth and dequantised with uniform noise) and ``log_prob`` (nats, the density of
    the dequantised image on [0, 1]^D; ``bits_per_dim`` is a function of it). With ``draws`` > 1 both
    are averaged over that many noise draws. The noise comes from one generator seeded by ``seed``,
    drawn batch by batch, so the same call gives the same numbers.
    """
    if isinstance(images, ImageDataset):
        labels = images.labels if labels is None else labels
        dataset = images
    else:
        dataset = ImageDataset(images, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    n = len(dataset)
    conditional = bool(model.config.num_classes)
    if conditional and labels is None:
        raise ValueError("this model is class-conditional: scoring needs the images' labels")
    gen = torch.Generator().manual_seed(seed)
    bpd_out, logp_out = [], []
    bar = Progress(n, desc, enabled=progress, unit="img")
    for start in range(0, n, batch_size):
        x = to_unit(dataset.batch(slice(start, start + batch_size)))
        y = labels[start:start + batch_size].to(device) if conditional else None
        bpd = torch.zeros(len(x), dtype=torch.float64)
        logp = torch.zeros(len(x), dtype=torch.float64)
        for _ in range(draws):
            noise = torch.rand(x.shape, generator=gen)
            gaussian = torch.randn(x.shape, generator=gen).to(device) if model.config.noise_std else None
            out = model(x.to(device), y, noise=noise.to(device), gaussian=gaussian)
            bpd += out.bits_per_dim.double().cpu()
            logp += out.log_prob.double().cpu()
        bpd_out.append(bpd / draws)
        logp_out.append(logp / draws)
        bar.update(len(x))
    bar.close()
    empty = torch.zeros(0, dtype=torch.float64)
    return {"bits_per_dim": torch.cat(bpd_out) if bpd_out else empty,
            "log_prob": torch.cat(logp_out) if logp_out else empty}


# An image scoring over this many times its set's median bits/dim is an outlier. A model can put a
# test image so far out (one latent a hundred thousand standard deviations from its prior) that the
# one image is the whole mean; a summary then says so, and gives the mean of the other images.
OUTLIER_RATIO = 10.0


def summarize_bits_per_dim(bpd: torch.Tensor) -> dict:
    """Mean and standard error over images of per-image bits/dim, the median, how many images score
    over ``OUTLIER_RATIO`` times the median (``outliers``) and the mean of the others
    (``bits_per_dim_without_outliers``; the mean itself when there are none)."""
    n = bpd.numel()
    if not n:
        return {"bits_per_dim": float("nan"), "bits_per_dim_se": float("nan"), "num_images": 0,
                "bits_per_dim_median": float("nan"), "outliers": 0, "bits_per_dim_without_outliers": float("nan")}
    se = float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    median = float(bpd.median())
    far = bpd > OUTLIER_RATIO * median if median > 0 else torch.zeros_like(bpd, dtype=torch.bool)
    return {"bits_per_dim": float(bpd.mean()), "bits_per_dim_se": se, "num_images": n,
            "bits_per_dim_median": median, "outliers": int(far.sum()),
            "bits_per_dim_without_outliers": float(bpd[~far].mean())}


def describe_outliers(outliers: int, num_images: int, median: float, without_outliers: float) -> str:
    """A clause for a log line when a mean of bits/dim rests on outliers (the numbers of
    :func:`summarize_bits_per_dim`), else ''."""
    if not outliers:
        return ""
    return (f"; {outliers} of {num_images} images score over {OUTLIER_RATIO:g}x the median ({median:.4f}), "
            f"the mean of the others is {without_outliers:.4f}")


def _row(spec: str, name: str, bpd=None, logp=None, note: str = "", error: str = "") -> dict:
    return {"input": spec, "name": name, "bits_per_dim": bpd, "log_prob": logp, "note": note, "error": error}


def score_inputs(model, specs, roots: dict | None = None, draws: int = 1, batch_size: int = 500, seed: int = 0,
                 device: torch.device | str | None = None, progress: bool = False,
                 limit: int | None = None, spread: bool = False) -> list[dict]:
    """Score each input of ``specs`` (:mod:`glowflow.inputs` spells them); one row per image.

    A row is a dict of :data:`SCORE_COLUMNS`: the input as given, the image's name (its file, or
    ``input[index]``), ``bits_per_dim``, ``log_prob`` (nats, the density of the dequantised image
    on [0, 1]^D, as :func:`score`), a note of any conversion to the model's shape, and ``error``:
    an input that cannot be read at all, or a file of a folder that cannot, is one row with the
    message and no scores, and the other inputs are still scored. Each input is scored as
    :func:`score` with ``seed`` (the same noise for every input); ``roots`` maps dataset names to
    their directories; ``limit`` keeps the first N images of each input (with ``spread``: N evenly spaced).
    """
    rows = []
    shape = model.config.image_shape
    for spec in specs:
        try:
            batch = load_input(spec, shape, roots, seed, limit, spread)
            if model.config.num_classes and batch.labels is None and len(batch):
                raise ValueError(f"{spec}: this model is class-conditional and the input has no labels")
        except (ValueError, FileNotFoundError, OSError, MemoryError) as e:  # one bad input is one error row
            rows.append(_row(spec, spec, error=str(e) or type(e).__name__))
            continue
        if len(batch):
            res = score(model, batch.images, batch.labels, batch_size, seed, draws, device, progress, desc=spec)
            rows += [_row(spec, name, b, p, note) for name, b, p, note in
                     zip(batch.names, res["bits_per_dim"].tolist(), res["log_prob"].tolist(), batch.notes)]
        rows += [_row(spec, name, error=message) for name, message in batch.failures]
    return rows


def summarize_rows(rows: list[dict]) -> list[dict]:
    """Per input, in order: images scored, failures, and :func:`summarize_bits_per_dim` of the scored."""
    out = {}
    for r in rows:
        out.setdefault(r["input"], {"scored": [], "errors": 0})
        if r["error"]:
            out[r["input"]]["errors"] += 1
        else:
            out[r["input"]]["scored"].append(r["bits_per_dim"])
    return [{"input": spec, "errors": v["errors"],
             **summarize_bits_per_dim(torch.tensor(v["scored"], dtype=torch.float64))} for spec, v in out.items()]


def write_score_csv(rows: list[dict], path) -> None:
    """The rows of :func:`score_inputs` as a CSV file (header :data:`SCORE_COLUMNS`), written atomically."""
    buffer = _text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SCORE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                         for k in SCORE_COLUMNS})
    io.atomic_write_text(path, buffer.getvalue())
