"""Attribute directions in a Glow's latent space: the :class:`Directions` class, their estimation
from labelled images, and their file beside a checkpoint.

Following the paper (section 5.2): encode labelled images and estimate a direction, by default
``mean(eps | attribute) - mean(eps | not attribute)`` (:mod:`glowflow.estimators` holds the others).
Labels are a matrix ``[N, A]`` with +1 (has the attribute), -1 (does not) and 0 (unknown: left out
of both means). Applying a direction to an image is :mod:`glowflow.editing`.

Directions are stored beside the checkpoint as ``directions.safetensors`` (the ``[A, D]`` vectors,
with names and counts in its metadata; the file the loader reads) and ``directions.json`` (a readable
copy of the same metadata, and the SHA-256 of ``directions.safetensors``, checked on load).
:func:`load_directions` is the one reader, for the library, the command line and the demo.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .checkpoint import CHECKPOINT_DIR, CheckpointError, resolve_model_dir, save_tensors, weights_sha256
from .data import ImageDataset
from .estimators import DEFAULT_ESTIMATOR, Estimator, project_out
from .estimators import estimator as make_estimator
from .images import load_image
from .io import atomic_file, atomic_write_json, file_sha256, parse_json, read_json
from .numerics import as_image_batch, to_unit

__all__ = ["Directions", "DirectionAccumulator", "attribute_directions", "directions_from_images",
           "class_attributes", "pair_attributes", "resolve_class", "directions_dir", "save_directions",
           "load_directions", "DIRECTIONS_WEIGHTS", "DIRECTIONS_JSON", "MAX_KEPT_LATENT_VALUES"]

DIRECTIONS_WEIGHTS = "directions.safetensors"
DIRECTIONS_JSON = "directions.json"
DIRECTIONS_FORMAT = "glowflow-directions/1"


@dataclass(frozen=True)
class Directions:
    """Named latent directions ``vectors [A, D]`` and the label counts each mean came from."""

    names: tuple[str, ...]
    vectors: torch.Tensor
    positive_counts: tuple[int, ...]
    negative_counts: tuple[int, ...]
    sources: tuple[str, ...]

    def __post_init__(self):
        for field in ("names", "positive_counts", "negative_counts", "sources"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        a = len(self.names)
        if self.vectors.dim() != 2 or self.vectors.shape[0] != a:
            raise ValueError(f"vectors must be [{a}, D] for {a} names, got {list(self.vectors.shape)}")
        if len(set(self.names)) != a:
            raise ValueError(f"direction names must be unique, got {list(self.names)}")
        if not all(len(f) == a for f in (self.positive_counts, self.negative_counts, self.sources)):
            raise ValueError("names, positive_counts, negative_counts and sources must have equal lengths")
        # A NaN here would turn every edit along any direction into a failed decode.
        bad = (~torch.isfinite(self.vectors)).sum(1)
        for name, count in zip(self.names, bad.tolist()):
            if count:
                raise ValueError(f"direction {name!r} holds NaN or inf ({count} of {self.vectors.shape[1]} "
                                 "values); recompute it")

    @property
    def num_dims(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> torch.Tensor:
        """The direction ``[D]`` called ``name``."""
        if name not in self.names:
            raise ValueError(f"no direction named {name!r}; available: {', '.join(self.names) or '(none)'}")
        return self.vectors[self.names.index(name)]

    def combine(self, alphas: Mapping[str, float]) -> torch.Tensor:
        """``sum_name alpha * direction[name]`` as ``[D]`` (names not given count as alpha 0)."""
        out = torch.zeros(self.num_dims, dtype=self.vectors.dtype)
        for name, alpha in alphas.items():
            out += float(alpha) * self[name]
        return out

    def conditioned(self, name: str, keep: Sequence[str]) -> torch.Tensor:
        """The direction ``name`` with its components along the ``keep`` directions removed: moving
        along it leaves those attributes' projections as they were (conditional manipulation)."""
        others = [self[k] for k in keep if k != name]
        return project_out(self[name], others)

    def merged(self, other: "Directions") -> "Directions":
        """These directions plus ``other``'s; a name in both takes ``other``'s vector."""
        if len(self) and other.num_dims != self.num_dims:
            raise ValueError(f"cannot merge directions of dimension {other.num_dims} into ones of {self.num_dims}")
        keep = [i for i, n in enumerate(self.names) if n not in other.names]
        pick = lambda seq, extra: tuple(seq[i] for i in keep) + tuple(extra)  # noqa: E731
        return Directions(pick(self.names, other.names),
                          torch.cat([self.vectors[keep], other.vectors.to(self.vectors.dtype)]),
                          pick(self.positive_counts, other.positive_counts),
                          pick(self.negative_counts, other.negative_counts),
                          pick(self.sources, other.sources))

    def info(self) -> list[dict]:
        return [{"name": n, "positive_count": p, "negative_count": q, "source": s, "norm": float(v.norm())}
                for n, p, q, s, v in zip(self.names, self.positive_counts, self.negative_counts,
                                         self.sources, self.vectors)]


class DirectionAccumulator:
    """Running sums for ``mean(eps | +1) - mean(eps | -1)`` per attribute, in float64, so a dataset
    can be encoded batch by batch with memory ``O(A * D)`` instead of ``O(N * D)``."""

    def __init__(self, names: Sequence[str], num_dims: int):
        self.names = tuple(names)
        a = len(self.names)
        self.sum_pos = torch.zeros(a, num_dims, dtype=torch.float64)
        self.sum_neg = torch.zeros(a, num_dims, dtype=torch.float64)
        self.count_pos = torch.zeros(a, dtype=torch.long)
        self.count_neg = torch.zeros(a, dtype=torch.long)

    def update(self, latents: torch.Tensor, attributes: torch.Tensor) -> None:
        """``latents [B, D]``; ``attributes [B, A]`` with values in {+1, -1, 0}."""
        attributes = torch.as_tensor(attributes)
        b, a = latents.shape[0], len(self.names)
        if attributes.shape != (b, a):
            raise ValueError(f"attributes must be [{b}, {a}] for {b} latents and {a} names, "
                             f"got {list(attributes.shape)}")
        if latents.shape[1] != self.sum_pos.shape[1]:
            raise ValueError(f"latents must be [B, {self.sum_pos.shape[1]}], got {list(latents.shape)}")
        bad = ~((attributes == 1) | (attributes == -1) | (attributes == 0))
        if bad.any():
            raise ValueError(f"attribute values must be +1, -1 or 0, got {sorted(set(attributes[bad].tolist()))}")
        pos, neg = (attributes > 0).double(), (attributes < 0).double()
        z = latents.detach().double().cpu()
        self.sum_pos += pos.T @ z
        self.sum_neg += neg.T @ z
        self.count_pos += pos.sum(0).long()
        self.count_neg += neg.sum(0).long()

    def result(self, source: str = "") -> Directions:
        empty = [f"{n!r} ({int(p)} with, {int(q)} without)" for n, p, q in
                 zip(self.names, self.count_pos, self.count_neg) if p == 0 or q == 0]
        if empty:
            raise ValueError("each attribute needs at least one example with it and one without; "
                             f"not so for {', '.join(empty)}")
        mean_pos = self.sum_pos / self.count_pos[:, None]
        mean_neg = self.sum_neg / self.count_neg[:, None]
        return Directions(self.names, (mean_pos - mean_neg).float(), self.count_pos.tolist(),
                          self.count_neg.tolist(), [source] * len(self.names))


def attribute_directions(latents: torch.Tensor, attributes: torch.Tensor, names: Sequence[str],
                         source: str = "") -> Directions:
    """``mean(latents | +1) - mean(latents | -1)`` for each column of ``attributes [N, A]``."""
    acc = DirectionAccumulator(names, latents.shape[1])
    acc.update(latents, attributes)
    return acc.result(source)


def class_attributes(labels: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """One column per class, class vs rest: ``[N, K]`` int8 with +1 where ``label == k``, else -1."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    k = len(class_names)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k}) for {k} class names, got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return (F.one_hot(labels, k) * 2 - 1).to(torch.int8)


def resolve_class(name_or_index: str | int, class_names: Sequence[str]) -> int:
    """A class index from its name (case-insensitive) or its index."""
    key = str(name_or_index).strip()
    lowered = [c.lower() for c in class_names]
    if key.lower() in lowered:
        return lowered.index(key.lower())
    if key.isdigit() and int(key) < len(class_names):
        return int(key)
    raise ValueError(f"unknown class {name_or_index!r}; expected one of {', '.join(class_names)} "
                     f"or an index below {len(class_names)}")


def pair_attributes(labels: torch.Tensor, class_names: Sequence[str], positive, negative) -> tuple[torch.Tensor, str]:
    """One column, class ``positive`` (+1) vs class ``negative`` (-1), others 0; and its name
    ``"<positive>-vs-<negative>"``."""
    p, n = resolve_class(positive, class_names), resolve_class(negative, class_names)
    if p == n:
        raise ValueError(f"positive and negative must be different classes, both are {class_names[p]!r}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    column = (labels == p).to(torch.int8) - (labels == n).to(torch.int8)
    return column[:, None], f"{class_names[p]}-vs-{class_names[n]}"


# Latents kept in memory for an estimator that needs them (all but mean and coarse): 2**28 values,
# 1 GiB in float32. Larger sets take --limit, or an estimator that works from running sums.
MAX_KEPT_LATENT_VALUES = 2**28


@torch.no_grad()
def directions_from_images(model, images, attributes: torch.Tensor, names: Sequence[str],
                           labels: torch.Tensor | None = None, batch_size: int = 64,
                           source: str = "", progress=None, estimator: str | Estimator = DEFAULT_ESTIMATOR,
                           groups: torch.Tensor | None = None) -> Directions:
    """Encode ``images`` batch by batch and estimate one direction per attribute.

    ``images``: a tensor ``[N, C, H, W]`` (uint8, or float in [0, 1]), an :class:`ImageDataset`
    (read a batch at a time, so a memory-mapped set is never loaded whole) or a sequence of N image
    paths (read and resized to the model's ``image_shape``). ``attributes [N, A]`` in {+1, -1, 0}.
    ``labels [N]`` only for class-conditional models. ``estimator``: a name of
    :data:`glowflow.estimators.ESTIMATORS` or an :class:`~glowflow.estimators.Estimator`; the mean
    estimators work from running sums, the others keep the latents (at most
    :data:`MAX_KEPT_LATENT_VALUES` values). ``groups [N]`` (the person of each photo) for the
    paired estimator. ``progress(done, total)`` is called per batch.
    """
    model.require_initialized()
    est = make_estimator(estimator)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    attributes = torch.as_tensor(attributes)
    n = len(images)
    if attributes.dim() != 2 or attributes.shape[0] != n:
        raise ValueError(f"attributes must be [{n}, A] for {n} images, got {list(attributes.shape)}")
    if est.needs_groups and (groups is None or len(groups) != n):
        raise ValueError(f"the {est.name} estimator needs a group (e.g. the person) for each of the {n} images")
    if not est.streams and n * model.num_dims > MAX_KEPT_LATENT_VALUES:
        raise ValueError(f"the {est.name} estimator keeps every latent: {n} images x {model.num_dims} values is more "
                         f"than {MAX_KEPT_LATENT_VALUES:,}; use fewer images (--limit) or the mean or coarse estimator")
    acc = DirectionAccumulator(names, model.num_dims)
    kept = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if isinstance(images, torch.Tensor):
            x = as_image_batch(images[start:stop], "images")
        elif isinstance(images, ImageDataset):
            x = to_unit(images.batch(slice(start, stop)))
        else:
            x = torch.stack([load_image(p, model.config.image_shape) for p in images[start:stop]])
        y = None if labels is None else labels[start:stop]
        z = model.encode(x, y).cpu()
        acc.update(z, attributes[start:stop])
        if not est.streams:
            kept.append(z.float())
        if progress is not None:
            progress(stop, n)
    counted = acc.result(source)  # checks that every attribute has examples on both sides
    sizes = [math.prod(s) for s in model.latent_shapes]
    if est.streams:
        vectors = [est.from_means(acc.sum_pos[i] / acc.count_pos[i], acc.sum_neg[i] / acc.count_neg[i], sizes)
                   for i in range(len(counted))]
    else:
        latents = torch.cat(kept)
        groups = None if groups is None else torch.as_tensor(groups).reshape(-1)
        vectors = []
        for i in range(len(counted)):
            pos, neg = attributes[:, i] > 0, attributes[:, i] < 0
            vectors.append(est.direction(latents[pos], latents[neg], sizes,
                                         None if groups is None else groups[pos],
                                         None if groups is None else groups[neg]))
    note = f"{source}; estimator {est.name}" if source else f"estimator {est.name}"
    return Directions(counted.names, torch.stack(vectors).float(), counted.positive_counts,
                      counted.negative_counts, [note] * len(counted))


# ---------------------------------------------------------------------------------- save / load

def directions_dir(checkpoint) -> Path:
    """Where a checkpoint's directions live: the run directory for ``RUN`` or ``RUN/checkpoint``
    (outside the checkpoint folder, which training replaces wholesale), else the checkpoint folder."""
    ckpt = resolve_model_dir(checkpoint)
    return ckpt.parent if ckpt.name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old") else ckpt


def save_directions(directions: Directions, directory, weights_sha: str | None = None) -> Path:
    """Write ``directory/directions.safetensors`` (atomically replaced) and ``directions.json``,
    which holds its SHA-256 (``directions_sha256``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"format": DIRECTIONS_FORMAT, "num_dims": directions.num_dims, "weights_sha256": weights_sha,
            "directions": directions.info()}
    target = directory / DIRECTIONS_WEIGHTS
    with atomic_file(target) as tmp:
        save_tensors(tmp, {"directions": directions.vectors.detach().float()},
                     metadata={"format": DIRECTIONS_FORMAT, "info": json.dumps(info)})
        digest = file_sha256(tmp)
    atomic_write_json(directory / DIRECTIONS_JSON, {**info, "directions_sha256": digest})
    return target


def _verify_directions_file(path: Path) -> None:
    """Refuse ``path`` if its bytes no longer match the SHA-256 in ``directions.json`` beside it:
    safetensors checks its header, not the numbers, so a flipped bit would load as a wrong direction.
    Without a recorded checksum (an older glowflow wrote it) the file loads, with a warning."""
    manifest = path.with_name(DIRECTIONS_JSON)
    recorded = read_json(manifest, CheckpointError) if manifest.is_file() else None
    if recorded is not None and not isinstance(recorded, dict):
        raise CheckpointError(f"corrupt {manifest}: expected a JSON object, got {type(recorded).__name__}")
    expected = (recorded or {}).get("directions_sha256")
    if expected is None:
        warnings.warn(f"{path} has no checksum in {manifest.name}: loaded unchecked (recompute the directions "
                      "with `glowflow directions` to add one)", stacklevel=3)
    elif file_sha256(path) != expected:
        raise CheckpointError(f"corrupt file {path}: its SHA-256 does not match the one in {manifest} (the bytes "
                              "changed after it was written, or its writing was interrupted); recompute the "
                              "directions with `glowflow directions`")


def load_directions(directory=None, num_dims: int | None = None, *,
                    checkpoint=None) -> tuple[Directions, dict]:
    """Read ``directory/directions.safetensors`` -> (directions, metadata dict), checked against the
    SHA-256 in ``directions.json`` and for finite values. ``num_dims`` checks that they fit the
    model's latent size. With ``checkpoint``, ``directory`` defaults to where that checkpoint's
    directions live (:func:`directions_dir`), and a warning says when they were computed with other
    weights than the checkpoint's."""
    if directory is None:
        if checkpoint is None:
            raise ValueError("load_directions needs a directory or a checkpoint")
        directory = directions_dir(checkpoint)
    path = Path(directory) / DIRECTIONS_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"no directions at {path}; compute them with `glowflow directions`")
    _verify_directions_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vectors = f.get_tensor("directions")
        info = parse_json(meta["info"])
        entries = info["directions"]
        if meta.get("format") != DIRECTIONS_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {DIRECTIONS_FORMAT!r}")
        directions = Directions([e["name"] for e in entries], vectors.float(),
                                [int(e["positive_count"]) for e in entries],
                                [int(e["negative_count"]) for e in entries],
                                [str(e.get("source", "")) for e in entries])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"corrupt or foreign directions file {path}: {type(e).__name__}: {e}") from e
    if num_dims is not None and directions.num_dims != num_dims:
        raise CheckpointError(f"{path} holds directions of dimension {directions.num_dims}, but the model's "
                              f"latents have {num_dims}: they were computed for a different model")
    stored = info.get("weights_sha256")
    if checkpoint is not None and stored and stored != weights_sha256(checkpoint):
        warnings.warn(f"the directions in {directory} were computed with other weights than those now in "
                      f"{checkpoint}; recompute them with `glowflow directions`", stacklevel=2)
    return directions, info
