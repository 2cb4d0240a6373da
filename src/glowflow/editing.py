"""Editing with a trained Glow through its latent space: safe decoding, interpolation, reconstruction,
sampling and manipulation along a direction.

Everything works on the model's standardised latents ``eps = model.encode(x)`` ``[B, D]``, which are
unit Gaussian under the model, so straight lines and great circles in ``eps`` stay in typical regions.
Images are encoded at the centres of their quantisation bins (``Glow.encode``), where training put
its mass. Manipulating an image decodes ``encode(x) + alpha * direction`` (the paper, section 5.2);
the directions themselves are :mod:`glowflow.directions`.

Stable decoding. An edit moves the latent off the data, and there the affine couplings' inverse
(a division by their sigmoid scale) can overflow: a float64 decode of the same latent overflows
too, so it is the map, not rounding. With ``stable=True`` (the default) the editing functions decode
with the coupling scales floored at :data:`STABLE_SCALE_FLOOR` (far below those data produce, so
reconstructions are exact) and, for directions, rescale each level's block of the edited latent to
the norm of the image's own and keep a share (:data:`EDIT_DETAIL` at ``|alpha| >= 1``) of the
image's fine detail (at ``alpha = 0`` nothing changes); docs/editing.md measures each. A decode a
person would see as broken (:func:`failed_decodes`) raises :class:`DecodeError` naming the alphas
or frames, or is drawn grey where asked.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .layers import STABLE_SCALE_FLOOR
from .numerics import as_image_batch

# When a decode counts as failed (:func:`failed_decodes`), judged on the image as it would be drawn:
# more than MAX_FAR_FRACTION of its values more than FAR_OUTSIDE beyond [0, 1] (an overflow caught
# before it reaches inf), or more than MAX_SPECK_FRACTION of its pixels specks, each differing by more
# than SPECK_CONTRAST from all four of its neighbours (the salt-and-pepper noise an inverse makes where
# it leaves the data). Real images have almost none (docs/editing.md counts them on the test sets).
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
           "decode_latents", "valid_alpha_range", "ALPHA_STEPS", "MIN_VALID", "lerp", "slerp", "INTERPOLATIONS"]

INTERPOLATIONS = ("linear", "spherical")
DECODE_BATCH = 64  # latents decoded at a time: memory bounded whatever the number of frames


class DecodeError(ValueError):
    """Latents decoded to NaN or inf: they lie where the model's inverse overflows. ``rows`` are
    their positions in the batch."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


# ------------------------------------------------------------------------------------ helpers

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
    x1, x2 = as_image_batch(x1, "x1"), as_image_batch(x2, "x2")
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
    x = as_image_batch(x, "x")
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
        seen = specks(as_image_batch(source, "source").to(eps.dtype))
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
    x = as_image_batch(images, "images")
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
    x = as_image_batch(x, "x")
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
def edit(model, x: torch.Tensor, directions=None,
         alphas: Mapping[str, float] | None = None, mix: torch.Tensor | None = None, blend: float = 0.0,
         method: str = "linear", y=None, y_mix=None, stable: bool = True) -> torch.Tensor:
    """One image moved along several directions and blended with a second one (the demo's view).

    ``eps = path(encode(x), encode(mix), blend) + sum_name alphas[name] * directions[name]``, decoded
    and clamped: ``[1, C, H, W]``; ``directions`` a :class:`glowflow.directions.Directions`.
    ``blend`` 0 is ``x``, 1 is ``mix``; ``method`` "linear" or
    "spherical". ``stable``: as :func:`manipulate`, the norms those of the blended point.
    """
    model.require_initialized()
    x = as_image_batch(x, "x")
    if x.shape[0] != 1:
        raise ValueError(f"edit takes one image, got a batch of {x.shape[0]}")
    if not 0.0 <= float(blend) <= 1.0:
        raise ValueError(f"blend must lie in [0, 1], got {blend}")
    z = model.encode(x, _labels(model, y, 1))[0]
    t = torch.tensor([float(blend)])
    onehot = _onehot_path(model, y, y_mix, t)
    if mix is not None:
        mix = as_image_batch(mix, "mix")
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

