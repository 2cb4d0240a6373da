"""Latent-space editing with a trained Glow: interpolation, attribute directions, manipulation.

Everything works on the model's standardised latents ``eps = model.encode(x)`` ``[B, D]``, which are
unit Gaussian under the model, so straight lines and great circles in ``eps`` stay in typical regions.
Images are encoded at the centres of their quantisation bins (``Glow.encode``), where training put
its mass.

Attribute directions follow the paper (section 5.2): encode labelled images and estimate a
direction, by default ``mean(eps | attribute) - mean(eps | not attribute)``
(:mod:`glowflow.estimators` holds the others); manipulating an image decodes
``encode(x) + alpha * direction``. Labels are a matrix ``[N, A]`` with +1 (has the attribute), -1
(does not) and 0 (unknown: left out of both means).

Stable decoding. An edit moves the latent off the data, and there the affine couplings' inverse
(a division by their sigmoid scale) can overflow: a float64 decode of the same latent overflows
too, so it is the map, not rounding. With ``stable=True`` (the default) the editing functions decode
with the coupling scales floored at :data:`STABLE_SCALE_FLOOR` (far below those data produce, so
reconstructions are exact) and, for directions, rescale each level's block of the edited latent to
the norm of the image's own and keep a share (:data:`EDIT_DETAIL` at ``|alpha| >= 1``) of the
image's fine detail (at ``alpha = 0`` nothing changes); docs/editing.md measures each. A decode a
person would see as broken (:func:`failed_decodes`) raises :class:`DecodeError` naming the alphas
or frames, or is drawn grey where asked.

Directions are stored beside the checkpoint as ``directions.safetensors`` (the ``[A, D]`` vectors,
with names and counts in its metadata; the file the loader reads) and ``directions.json`` (a readable
copy of the same metadata, and the SHA-256 of ``directions.safetensors``, checked on load).
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .checkpoint import CHECKPOINT_DIR, CheckpointError, resolve_checkpoint_dir, save_tensors
from .data import ImageDataset
from .estimators import DEFAULT_ESTIMATOR, Estimator, project_out
from .estimators import estimator as make_estimator
from .images import load_image
from .io import atomic_file, atomic_write_json, file_sha256, parse_json, read_json
from .layers import STABLE_SCALE_FLOOR
from .numerics import to_unit

# When a decode counts as failed (:func:`failed_decodes`), judged on the image as it would be drawn:
# more than MAX_FAR_FRACTION of its values more than FAR_OUTSIDE beyond [0, 1] (an overflow caught
# before it reaches inf), or more than MAX_SPECK_FRACTION of its pixels specks, each differing by more
# than SPECK_CONTRAST from all four of its neighbours (the salt-and-pepper noise an inverse makes where
# it leaves the data). Data have almost none: at most 1.7% on the 10,000 Fashion-MNIST test images
# (1-pixel stripes), none on the faces; 99.9% of those images stay under 0.5%.
FAR_OUTSIDE = 0.5
MAX_FAR_FRACTION = 0.05
SPECK_CONTRAST = 0.5
MAX_SPECK_FRACTION = 0.005
# How much of an image's own fine detail an edit keeps, at |alpha| >= 1: the latents of every level
# but the coarsest are scaled by this (by 1 at alpha 0, linearly between). The source's details were
# drawn for its own coarse content; carried whole into another they make specks (docs/editing.md).
EDIT_DETAIL = 0.7
# What a failed decode does: raise DecodeError, or come back as a grey image (with a warning).
FAILED_EDITS = ("raise", "grey")

__all__ = ["interpolate", "reconstruct", "sample", "manipulate", "edit", "DecodeError", "FAILED_EDITS",
           "STABLE_SCALE_FLOOR", "DECODE_BATCH", "failed_decodes", "specks", "EDIT_DETAIL", "edited_latents",
           "decode_latents", "valid_alpha_range", "ALPHA_STEPS", "MIN_VALID", "lerp", "slerp", "Directions",
           "DirectionAccumulator", "attribute_directions", "directions_from_images", "class_attributes",
           "pair_attributes", "resolve_class", "AttributeTable", "parse_attribute_file", "parse_attribute_csv",
           "parse_celeba_attributes", "table_image_paths", "directions_dir", "save_directions", "load_directions",
           "INTERPOLATIONS", "DIRECTIONS_WEIGHTS", "DIRECTIONS_JSON"]

DIRECTIONS_WEIGHTS = "directions.safetensors"
DIRECTIONS_JSON = "directions.json"
DIRECTIONS_FORMAT = "glowflow-directions/1"
INTERPOLATIONS = ("linear", "spherical")
DECODE_BATCH = 64  # latents decoded at a time: memory bounded whatever the number of frames


class DecodeError(ValueError):
    """Latents decoded to NaN or inf: they lie where the model's inverse overflows. ``rows`` are
    their positions in the batch."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


# ------------------------------------------------------------------------------------ helpers

def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[C, H, W]`` or ``[B, C, H, W]`` -> float ``[B, C, H, W]`` (uint8 is divided by 255)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [B, C, H, W] or [C, H, W], got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dtype == torch.uint8:
        x = to_unit(x)
    return x


def _labels(model, y, batch: int) -> torch.Tensor | None:
    """Integer labels ``[batch]`` for a class-conditional model (an int is repeated), else None."""
    if y is None or not model.config.num_classes:
        return y  # the model's own check says what is missing or unexpected
    y = torch.as_tensor(y, dtype=torch.long).reshape(-1)
    return y.expand(batch) if y.numel() == 1 else y


def _onehot_path(model, y1, y2, t: torch.Tensor) -> torch.Tensor | None:
    """Linearly blended one-hot labels ``[T, K]`` for decoding along a path from class y1 to y2."""
    k = model.config.num_classes
    if not k:
        if y1 is not None or y2 is not None:
            raise ValueError("labels were given but this model has no class-conditional prior")
        return None
    if y1 is None:
        raise ValueError(f"this model has a class-conditional prior over {k} classes: pass labels")
    y2 = y1 if y2 is None else y2
    a = F.one_hot(torch.as_tensor(int(y1)), k).float()
    b = F.one_hot(torch.as_tensor(int(y2)), k).float()
    return (1 - t)[:, None] * a + t[:, None] * b


def specks(x: torch.Tensor) -> torch.Tensor:
    """``[N]``: the fraction of each image's pixels (``x [N, C, H, W]`` in [0, 1]) that differ by
    more than :data:`SPECK_CONTRAST` from each of their four neighbours. A stripe or an edge is
    not one (it has a neighbour of its own value); a salt-and-pepper pixel is."""
    x = x.clamp(0.0, 1.0)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    neighbours = (padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])
    alone = torch.stack([(x - n).abs() > SPECK_CONTRAST for n in neighbours]).all(0)
    return alone.flatten(1).float().mean(1)


def failed_decodes(x: torch.Tensor, source_specks: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``[N]`` bool: which decodes ``x [N, C, H, W]`` (images, not yet clamped) a person would see
    as broken: not finite; more than :data:`MAX_FAR_FRACTION` of their values beyond
    ``[-FAR_OUTSIDE, 1 + FAR_OUTSIDE]``; or more than :data:`MAX_SPECK_FRACTION` of their pixels
    :func:`specks` beyond ``source_specks`` (a float, or one per decode), those of the image
    edited (a noisy photo's own reconstruction is not a failure). A background pushed far into the black (or the white) is
    drawn as it should be and is not a failure, whatever the flow's input held there."""
    flat = x.flatten(1)
    finite = torch.isfinite(flat).all(1)
    values = torch.nan_to_num(flat, 0.5, 0.5, 0.5)
    far = ((values < -FAR_OUTSIDE) | (values > 1.0 + FAR_OUTSIDE)).float().mean(1) > MAX_FAR_FRACTION
    allowed = MAX_SPECK_FRACTION + torch.as_tensor(source_specks, dtype=torch.float32).to(flat.device)
    return ~finite | far | (specks(values.view_as(x)) > allowed)


def _decode_rows(model, eps: torch.Tensor, y=None, stable: bool = True, in_range: bool = True,
                 source_specks: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """Decode ``eps [N, D]`` batch by batch -> (images clamped to [0, 1], the rows that failed,
    drawn uniform grey (0.5)). A row fails when it is not finite, or, with ``in_range``, when
    :func:`failed_decodes` says it would be seen as broken."""
    floor = STABLE_SCALE_FLOOR if stable else 0.0
    out, bad = [], []
    for start in range(0, eps.shape[0], DECODE_BATCH):
        stop = min(start + DECODE_BATCH, eps.shape[0])
        yb = y[start:stop] if isinstance(y, torch.Tensor) and y.dim() >= 1 and y.shape[0] == eps.shape[0] else y
        x = model.decode(eps[start:stop], yb, scale_floor=floor)
        allowed = 0.0 if source_specks is None else source_specks[start:stop]
        failed = failed_decodes(x, allowed) if in_range else ~torch.isfinite(x.flatten(1)).all(1)
        bad += [start + int(i) for i in failed.nonzero().flatten()]
        out.append(x.clamp_(0.0, 1.0))
    images = torch.cat(out)
    images[bad] = 0.5
    return images, bad


def _decode(model, eps: torch.Tensor, y=None, stable: bool = True, what=None, failed: str = "raise",
            source: torch.Tensor | None = None) -> torch.Tensor:
    """Decode ``eps [N, D]`` batch by batch, clamped to [0, 1]; :class:`DecodeError` if any row
    failed (:func:`failed_decodes`: not finite, far outside the image range, or specks). ``what(i)`` names
    row ``i`` in the message ("alpha 1.5", "frame 7 of 8"). ``failed="grey"``: such rows come back
    as a uniform grey image (0.5) with a warning naming them, instead of the error. ``source``: the
    images edited (``[N, ...]``, one per row, or any number), whose own specks a row may have."""
    if failed not in FAILED_EDITS:
        raise ValueError(f"failed must be one of {FAILED_EDITS}, got {failed!r}")
    images, bad = decode_latents(model, eps, y, stable, source)
    if bad:
        names = ", ".join(what(i) if what else f"latent {i}" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if failed == "grey":
            warnings.warn(f"the decode of {names} failed (not finite, far outside the image range or pixel noise): "
                          "drawn grey",
                          stacklevel=3)
            return images
        hint = ("" if stable else "; stable=True (the default) decodes most such edits")
        raise DecodeError(f"the decode of {names} is not finite (NaN or inf), far outside the image range or pixel "
                          "noise: the "
                          f"latent lies where the model's inverse leaves the data; a smaller step (alpha) keeps "
                          f"closer to the data{hint}", bad)
    return images


def _stable_edit(model, z: torch.Tensor, reference: torch.Tensor, size) -> torch.Tensor:
    """The stable form of an edited latent ``z [N, D]`` of ``reference``: each level keeps the
    norm it had (:func:`_keep_norms`), and every level but the coarsest keeps a share of the
    image's own detail that falls from 1 at ``size`` (an edit's ``|alpha|``, a float or ``[N]``) 0
    to :data:`EDIT_DETAIL` at 1 and beyond."""
    z = _keep_norms(model, z, reference)
    size = torch.as_tensor(size, dtype=z.dtype, device=z.device).abs().clamp(max=1.0).reshape(-1, 1)
    keep = 1.0 - (1.0 - EDIT_DETAIL) * size
    fine = sum(math.prod(s) for s in model.latent_shapes[:-1])
    return torch.cat([z[:, :fine] * keep, z[:, fine:]], 1)


def _keep_norms(model, z: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``z [N, D]`` with each level's block rescaled to the norm of that block of ``reference``
    (``[N, D]`` or ``[D]``): an edit then changes what a latent says, not how far from the mode it is."""
    sizes = [math.prod(s) for s in model.latent_shapes]
    reference = reference.expand_as(z)
    blocks = []
    for b, r in zip(torch.split(z, sizes, 1), torch.split(reference, sizes, 1)):
        norm = b.norm(dim=1, keepdim=True)
        blocks.append(torch.where(norm > 0, b * (r.norm(dim=1, keepdim=True) / norm.clamp_min(1e-30)), b))
    return torch.cat(blocks, 1)


# ------------------------------------------------------------------------------ interpolation

def lerp(z1: torch.Tensor, z2: torch.Tensor, t) -> torch.Tensor:
    """Straight line ``(1 - t) z1 + t z2``. ``z1, z2 [..., D]``; ``t`` a float or ``[T]`` (-> ``[T, ..., D]``)."""
    t = torch.as_tensor(t, dtype=z1.dtype, device=z1.device)
    scalar = t.dim() == 0
    t = t.reshape(-1, *([1] * z1.dim()))
    out = (1 - t) * z1 + t * z2
    return out[0] if scalar else out


def slerp(z1: torch.Tensor, z2: torch.Tensor, t) -> torch.Tensor:
    """Spherical interpolation along the great circle from ``z1`` to ``z2`` (norms blended linearly
    through the sine weights). Shapes as :func:`lerp`; falls back to :func:`lerp` where the two
    vectors are (anti)parallel and the circle is undefined."""
    t = torch.as_tensor(t, dtype=z1.dtype, device=z1.device)
    scalar = t.dim() == 0
    t = t.reshape(-1, *([1] * z1.dim()))
    dot = (z1 * z2).sum(-1, keepdim=True)
    norms = (z1.norm(dim=-1, keepdim=True) * z2.norm(dim=-1, keepdim=True)).clamp_min(1e-30)
    omega = torch.arccos((dot / norms).clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    degenerate = sin_omega < 1e-6
    safe = torch.where(degenerate, torch.ones_like(sin_omega), sin_omega)
    w1 = torch.where(degenerate, 1 - t, torch.sin((1 - t) * omega) / safe)
    w2 = torch.where(degenerate, t, torch.sin(t * omega) / safe)
    out = w1 * z1 + w2 * z2
    return out[0] if scalar else out


def _path(z1, z2, t, method: str) -> torch.Tensor:
    if method not in INTERPOLATIONS:
        raise ValueError(f"method must be one of {INTERPOLATIONS}, got {method!r}")
    return (lerp if method == "linear" else slerp)(z1, z2, t)


@torch.no_grad()
def interpolate(model, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8, method: str = "linear",
                y1=None, y2=None, stable: bool = True) -> torch.Tensor:
    """Decode ``steps`` evenly spaced points from ``encode(x1)`` to ``encode(x2)``.

    ``x1, x2``: one image each, ``[C, H, W]`` or ``[1, C, H, W]`` in [0, 1]. Returns ``[steps, C, H, W]``
    clamped to [0, 1]; the first and last are the reconstructions of ``x1`` and ``x2``. For a
    class-conditional model pass labels ``y1``, ``y2``; the one-hot label is blended along the path.
    """
    if int(steps) != steps or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps}")
    model.require_initialized()
    x1, x2 = _as_batch(x1, "x1"), _as_batch(x2, "x2")
    if x1.shape[0] != 1 or x2.shape[0] != 1:
        raise ValueError(f"interpolate takes one image per end, got batches of {x1.shape[0]} and {x2.shape[0]}")
    t = torch.linspace(0.0, 1.0, int(steps))
    onehots = _onehot_path(model, y1, y2, t)
    z1 = model.encode(x1, _labels(model, y1, 1))[0]
    z2 = model.encode(x2, _labels(model, y2 if y2 is not None else y1, 1))[0]
    return _decode(model, _path(z1, z2, t.to(z1), method), onehots, stable,
                   what=lambda i: f"frame {i + 1} of {int(steps)}", source=torch.cat([x1, x2]))


@torch.no_grad()
def reconstruct(model, x: torch.Tensor, y=None, stable: bool = True) -> torch.Tensor:
    """``decode(encode(x))`` clamped to [0, 1]: ``[B, C, H, W]`` (or ``[C, H, W]``) -> ``[B, C, H, W]``."""
    model.require_initialized()
    x = _as_batch(x, "x")
    y = _labels(model, y, x.shape[0])
    return _decode(model, model.encode(x, y), y, stable, what=lambda i: f"image {i}", source=x)


@torch.no_grad()
def sample(model, n: int, temperature: float = 0.7, y=None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int]]:
    """:meth:`Glow.sample <glowflow.model.Glow.sample>` that always draws: ``(images [n, C, H, W]
    in [0, 1], failed)``, where ``failed`` lists the samples whose decode is not finite (their
    latents lie where the inverse overflows even with the stable floor, more of them the higher the
    temperature), drawn uniform grey (0.5). A finite sample is drawn as ``glowflow sample`` draws
    it, however far outside [0, 1] it went: at a high temperature that is what the model makes."""
    model.require_initialized()
    y = _labels(model, y, n)
    return _decode_rows(model, model.draw_latents(n, temperature, generator), y, in_range=False)


# ------------------------------------------------------------------------- attribute directions

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
            x = _as_batch(images[start:stop], "images")
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


# --------------------------------------------------------------------------------- manipulation

def edited_latents(model, z0: torch.Tensor, direction: torch.Tensor, alpha, stable: bool = True) -> torch.Tensor:
    """``z0 [B, D] + alpha * direction``, in the stable form the editing functions decode
    (:func:`_stable_edit`) unless ``stable=False``; ``alpha`` a float or ``[T]`` (``B`` 1, ``T`` 1 or
    ``B == T``), broadcast as :func:`manipulate` does."""
    alphas = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(-1)
    z = z0 + alphas[:, None] * torch.as_tensor(direction).to(z0)[None, :]
    return _stable_edit(model, z, z0, alphas.expand(z.shape[0])) if stable else z


@torch.no_grad()
def decode_latents(model, eps: torch.Tensor, y=None, stable: bool = True,
                   source: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """Decode ``eps [N, D]`` as the editing functions do: ``(images [N, C, H, W] in [0, 1], failed)``,
    ``failed`` the rows a person would see as broken (:func:`failed_decodes`, allowing the specks of
    ``source``, the image each row edits), drawn grey."""
    seen = None
    if source is not None:  # the specks of the image each row edits (one per row, or the most of several)
        seen = specks(_as_batch(source, "source").to(eps.dtype))
        seen = seen if len(seen) == len(eps) else seen.max().expand(len(eps))
    return _decode_rows(model, eps, y, stable, source_specks=seen)


# The alphas a slider's range is measured at, and the share of edits that must decode.
ALPHA_STEPS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
MIN_VALID = 0.95


@torch.no_grad()
def valid_alpha_range(model, images: torch.Tensor, direction: torch.Tensor, alpha_max: float = 2.0,
                      y=None) -> tuple[float, float]:
    """``(low, high)``: how far along ``direction`` edits of ``images`` (``[N, C, H, W]``, a few held-out
    images) stay valid. On each side, the largest of :data:`ALPHA_STEPS` (at most ``alpha_max``) up
    to which every step has at least :data:`MIN_VALID` of the edits pass :func:`failed_decodes`;
    never less than the smallest step, so a slider always moves (its edits may then be refused)."""
    model.require_initialized()
    x = _as_batch(images, "images")
    z0 = model.encode(x, _labels(model, y, x.shape[0]))
    steps = [a for a in ALPHA_STEPS if a <= alpha_max] or [alpha_max]
    ends = []
    for sign in (-1.0, 1.0):
        reached = steps[0]
        for a in steps:
            _, failed = decode_latents(model, edited_latents(model, z0, direction, sign * a), y, source=x)
            if 1.0 - len(failed) / len(x) < MIN_VALID:
                break
            reached = a
        ends.append(sign * reached)
    return ends[0], ends[1]


@torch.no_grad()
def manipulate(model, x: torch.Tensor, direction: torch.Tensor, alpha=1.0, y=None,
               stable: bool = True, failed: str = "raise") -> torch.Tensor:
    """Decode ``encode(x) + alpha * direction``, clamped to [0, 1].

    ``x`` ``[B, C, H, W]`` or ``[C, H, W]``; ``direction`` ``[D]``; ``alpha`` a float or a sequence
    of T floats. With one image and T alphas the result is the strip ``[T, C, H, W]``; with B images
    and one alpha it is ``[B, C, H, W]``; with B images and B alphas, one alpha per image.
    ``alpha = 0`` gives the reconstruction ``decode(encode(x))``. ``stable`` (module docstring)
    keeps each level's latent norm and floors the coupling scales; ``False`` is the paper's formula
    as it stands. A failed decode (see :func:`_decode`) raises :class:`DecodeError` naming the
    alpha; ``failed="grey"`` draws it as a grey image instead, with a warning.
    """
    model.require_initialized()
    x = _as_batch(x, "x")
    direction = torch.as_tensor(direction)
    if direction.dim() != 1 or direction.shape[0] != model.num_dims:
        raise ValueError(f"direction must be [{model.num_dims}], got {list(direction.shape)}")
    alphas = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
    if not torch.isfinite(alphas).all():
        raise ValueError(f"alpha must be finite, got {alphas.tolist()}")
    b, t = x.shape[0], alphas.numel()
    if b != 1 and t != 1 and b != t:
        raise ValueError(f"got {b} images and {t} alphas; pass one image, one alpha, or as many of each")
    y = _labels(model, y, b)
    z0 = model.encode(x, y)
    z = edited_latents(model, z0, direction, alphas, stable)
    if y is not None and z.shape[0] != y.shape[0]:
        y = y.expand(z.shape[0])
    per_row = alphas.expand(z.shape[0]).tolist()
    return _decode(model, z, y, stable,
                   what=lambda i: f"alpha {per_row[i]:g}" + (f" (image {i})" if b > 1 else ""), failed=failed,
                   source=x if b > 1 else x.expand(z.shape[0], *x.shape[1:]))


@torch.no_grad()
def edit(model, x: torch.Tensor, directions: Directions | None = None,
         alphas: Mapping[str, float] | None = None, mix: torch.Tensor | None = None, blend: float = 0.0,
         method: str = "linear", y=None, y_mix=None, stable: bool = True) -> torch.Tensor:
    """One image moved along several directions and blended with a second one (the demo's view).

    ``eps = path(encode(x), encode(mix), blend) + sum_name alphas[name] * directions[name]``, decoded
    and clamped: ``[1, C, H, W]``. ``blend`` 0 is ``x``, 1 is ``mix``; ``method`` "linear" or
    "spherical". ``stable``: as :func:`manipulate`, the norms those of the blended point.
    """
    model.require_initialized()
    x = _as_batch(x, "x")
    if x.shape[0] != 1:
        raise ValueError(f"edit takes one image, got a batch of {x.shape[0]}")
    if not 0.0 <= float(blend) <= 1.0:
        raise ValueError(f"blend must lie in [0, 1], got {blend}")
    z = model.encode(x, _labels(model, y, 1))[0]
    t = torch.tensor([float(blend)])
    onehot = _onehot_path(model, y, y_mix, t)
    if mix is not None:
        mix = _as_batch(mix, "mix")
        z_mix = model.encode(mix, _labels(model, y_mix if y_mix is not None else y, 1))[0]
        z = _path(z, z_mix, t.to(z), method)[0]
    if alphas:
        if directions is None:
            raise ValueError("alphas were given but no directions")
        moved = z + directions.combine(alphas).to(z)
        size = max(abs(float(a)) for a in alphas.values())
        z = _stable_edit(model, moved[None], z, size)[0] if stable else moved
    moves = ", ".join(f"{k} {v:g}" for k, v in (alphas or {}).items() if v)
    return _decode(model, z[None], onehot, stable,
                   what=lambda i: "this edit" + (f" ({moves}" + (f", blend {blend:g}" if mix is not None else "") + ")"
                                                 if moves else ""), source=x if mix is None else torch.cat([x, mix]))


# ------------------------------------------------------------------------- attribute file parsers

@dataclass(frozen=True)
class AttributeTable:
    """Per-image binary attributes: ``values [N, A]`` int8 in {+1, -1, 0 (unknown)}."""

    filenames: tuple[str, ...]
    names: tuple[str, ...]
    values: torch.Tensor

    def __len__(self) -> int:
        return len(self.filenames)

    def select(self, names: Sequence[str] | None) -> "AttributeTable":
        """Only the columns ``names`` (all when None), in that order."""
        if not names:
            return self
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"unknown attributes {missing}; the file has {', '.join(self.names)}")
        idx = [self.names.index(n) for n in names]
        return AttributeTable(self.filenames, tuple(names), self.values[:, idx])

    def head(self, limit: int | None) -> "AttributeTable":
        if limit is None:
            return self
        return AttributeTable(self.filenames[:limit], self.names, self.values[:limit])


def _check_names(names: list[str], where: str) -> None:
    if not names:
        raise ValueError(f"{where}: no attribute names")
    if any(not n for n in names):
        raise ValueError(f"{where}: empty attribute name in {names}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: duplicate attribute names {dupes}")


def _check_filenames(filenames: list[str], path) -> None:
    seen = set()
    for f in filenames:
        if f in seen:
            raise ValueError(f"{path}: filename {f!r} appears more than once")
        seen.add(f)


def parse_celeba_attributes(path) -> AttributeTable:
    """Read CelebA's ``list_attr_celeba.txt``: a line with the image count N, a line of A attribute
    names, then N lines ``filename v1 ... vA`` with each v in {1, -1}, whitespace separated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute file not found: {path}")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e})") from e
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line of attribute names, "
                         f"got {len(lines)} non-empty line(s)")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise ValueError(f"{path}, line 1: expected the number of images (an integer), "
                         f"got {lines[0].strip()[:60]!r}") from None
    names = lines[1].split()
    _check_names(names, f"{path}, line 2")
    rows = lines[2:]
    if len(rows) != declared:
        raise ValueError(f"{path}: line 1 declares {declared} images but {len(rows)} rows follow")
    filenames, values = [], []
    for lineno, line in enumerate(rows, start=3):
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise ValueError(f"{path}, line {lineno}: expected a filename and {len(names)} values, "
                             f"got {len(parts)} fields")
        try:
            row = [int(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{path}, line {lineno}: values must be 1 or -1, got {parts[1:]}") from None
        if any(v not in (1, -1) for v in row):
            raise ValueError(f"{path}, line {lineno}: values must be 1 or -1, got {sorted(set(row))}")
        filenames.append(parts[0])
        values.append(row)
    _check_filenames(filenames, path)
    return AttributeTable(tuple(filenames), tuple(names),
                          torch.tensor(values, dtype=torch.int8).reshape(len(filenames), len(names)))


_TRUE = {"1", "+1", "true", "yes", "y", "t"}
_FALSE = {"0", "-1", "false", "no", "n", "f"}


def parse_attribute_csv(path) -> AttributeTable:
    """Read a CSV ``filename,attr1,attr2,...`` (a header row, then one row per image).

    A value is true (1, +1, true, yes), false (0, -1, false, no) or empty (unknown: the image is left
    out of that attribute's means).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute file not found: {path}")
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)  # line numbers as the file counts them, blank lines included
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from e
    if not rows:
        raise ValueError(f"{path}: empty; expected a header row 'filename,attr1,attr2,...'")
    header_line, header_row = rows[0]
    header = [c.strip() for c in header_row]
    if len(header) < 2:
        raise ValueError(f"{path}, line {header_line}: expected a header 'filename,attr1,...' with at least one "
                         f"attribute column, got {header_row}")
    names = header[1:]
    _check_names(names, f"{path}, line {header_line}")
    if len(rows) < 2:
        raise ValueError(f"{path}: a header but no image rows")
    filenames, values = [], []
    for lineno, row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"{path}, line {lineno}: expected {len(header)} columns like the header, "
                             f"got {len(row)}")
        filename = row[0].strip()
        if not filename:
            raise ValueError(f"{path}, line {lineno}: empty filename")
        parsed = []
        for name, cell in zip(names, row[1:]):
            v = cell.strip().lower()
            if v in _TRUE:
                parsed.append(1)
            elif v in _FALSE:
                parsed.append(-1)
            elif v == "":
                parsed.append(0)
            else:
                raise ValueError(f"{path}, line {lineno}, column {name!r}: expected 1/0, 1/-1, true/false, "
                                 f"yes/no or empty, got {cell!r}")
        filenames.append(filename)
        values.append(parsed)
    _check_filenames(filenames, path)
    return AttributeTable(tuple(filenames), tuple(names), torch.tensor(values, dtype=torch.int8))


def parse_attribute_file(path) -> AttributeTable:
    """:func:`parse_attribute_csv` for ``.csv`` files, :func:`parse_celeba_attributes` otherwise."""
    return (parse_attribute_csv if Path(path).suffix.lower() == ".csv" else parse_celeba_attributes)(path)


def table_image_paths(table: AttributeTable, image_dir) -> list[Path]:
    """The image path of every row, checked to lie inside ``image_dir`` and to exist (the first
    missing ones are named)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    root = image_dir.resolve()
    paths = [image_dir / f for f in table.filenames]
    outside = [f for f, p in zip(table.filenames, paths) if not p.resolve().is_relative_to(root)]
    if outside:  # "../../etc/passwd" or an absolute path: the table names images of this folder only
        raise ValueError(f"{len(outside)} row(s) of the attribute file name files outside {image_dir}: "
                         f"{', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}; expected paths relative to "
                         "the image folder, inside it")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in the attribute file are not in "
                                f"{image_dir}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return paths


# ---------------------------------------------------------------------------------- save / load

def directions_dir(checkpoint) -> Path:
    """Where a checkpoint's directions live: the run directory for ``RUN`` or ``RUN/checkpoint``
    (outside the checkpoint folder, which training replaces wholesale), else the checkpoint folder."""
    ckpt = resolve_checkpoint_dir(checkpoint)
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


def load_directions(directory, num_dims: int | None = None) -> tuple[Directions, dict]:
    """Read ``directory/directions.safetensors`` -> (directions, metadata dict), checked against the
    SHA-256 in ``directions.json`` and for finite values. ``num_dims`` checks that they fit the
    model's latent size."""
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
    return directions, info
