"""``glowflow sample``, ``encode`` and ``decode``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import io
from ..images import as_uint8, load_image, save_grid
from ..layers import STABLE_SCALE_FLOOR
from .common import (add_batch_size, add_checkpoint, add_json, add_n, add_out, add_picture_output, add_seed,
                     check_count, emit, float_list, load_model, positive_int)

# images decoded (or encoded) at a time by default: memory stays bounded whatever --n is
SAMPLE_BATCH = 256


def _labels(model, label: int | None, n: int) -> torch.Tensor | None:
    k = model.config.num_classes
    if not k:
        if label is not None:
            raise ValueError("--label is for class-conditional models; this one has no classes")
        return None
    if label is not None and not 0 <= label < k:
        raise ValueError(f"--label must lie in [0, {k}), got {label}")
    return torch.full((n,), label) if label is not None else torch.arange(n) % k


@torch.no_grad()
def _in_batches(fn, inputs: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """``fn(inputs, labels)`` over ``batch_size`` rows at a time, the outputs concatenated."""
    return torch.cat([fn(inputs[i:i + batch_size], None if labels is None else labels[i:i + batch_size])
                      for i in range(0, len(inputs), batch_size)])


def cmd_sample(args) -> int:
    check_count(args, args.n * len(args.temperature), "sample")
    if any(t < 0 for t in args.temperature):
        raise ValueError(f"temperatures must be >= 0, got {args.temperature}")
    model = load_model(args)
    gen = torch.Generator().manual_seed(args.seed)
    y = _labels(model, args.label, args.n)
    rows = []
    for t in args.temperature:
        for start in range(0, args.n, args.batch_size):
            stop = min(args.n, start + args.batch_size)
            batch_y = None if y is None else y[start:stop]
            rows.append(as_uint8(model.sample(stop - start, temperature=t, y=batch_y, generator=gen,
                                              scale_floor=0.0 if args.exact else STABLE_SCALE_FLOOR)))
    images = torch.cat(rows)
    nrow = args.n if len(args.temperature) > 1 else args.nrow
    path = save_grid(images, args.out, nrow=nrow, scale=args.scale)
    emit(args, {"out": str(path), "n": args.n, "temperatures": args.temperature})
    return 0


def cmd_encode(args) -> int:
    model = load_model(args)
    x = torch.stack([load_image(p, model.config.image_shape) for p in args.images])
    y = _labels(model, args.label, len(x)) if args.label is not None or model.config.num_classes else None
    eps = _in_batches(model.encode, x, y, args.batch_size)
    io.atomic_save_npy(args.out, eps.double().cpu().numpy())
    emit(args, {"out": str(args.out), "shape": list(eps.shape)})
    return 0


def cmd_decode(args) -> int:
    model = load_model(args)
    eps = _read_latents(args.latents, model.num_dims)
    check_count(args, len(eps), "decode")
    y = _labels(model, args.label, len(eps)) if args.label is not None or model.config.num_classes else None
    x = _in_batches(model.decode, eps, y, args.batch_size).clamp(0, 1)
    path = save_grid(x, args.out, nrow=args.nrow, scale=args.scale)
    emit(args, {"out": str(path), "n": len(x)})
    return 0


def _read_latents(path: Path, num_dims: int) -> torch.Tensor:
    """A ``.npy`` array of latents ``[N, D]`` (or one ``[D]``), refused with a message if it is not."""
    arr = io.read_npy(path, "array of latents")
    if isinstance(arr, np.lib.npyio.NpzFile):
        names = ", ".join(arr.files[:5]) or "nothing"
        arr.close()
        raise ValueError(f"{path} is an .npz archive (holding {names}); expected one .npy array [N, {num_dims}] "
                         "as `glowflow encode` writes")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{path} holds {arr.dtype} values; expected real numbers, an array [N, {num_dims}]")
    arr = np.atleast_2d(arr)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != num_dims:
        raise ValueError(f"{path} holds an array of shape {list(arr.shape)}; expected latents [N, {num_dims}] "
                         "with N >= 1")
    return torch.from_numpy(arr.astype(np.float64))


def _add_label(p, what: str = "class of the images (class-conditional models only; default: cycle through "
                                "the classes)") -> None:
    p.add_argument("--label", type=int, help=what)


def register(sub) -> None:
    p = sub.add_parser("sample", help="write a grid of samples (one row per temperature if several)")
    add_checkpoint(p)
    add_n(p, "samples per temperature", 64)
    p.add_argument("--temperature", type=float_list, default=[0.7],
                   help="scale of the prior's standard deviation, one or several: e.g. 0.7 or 0,0.5,0.7,1.0")
    add_seed(p, "the samples' noise")
    _add_label(p)
    p.add_argument("--nrow", type=positive_int, default=8, help="images per row of the grid (one temperature)")
    p.add_argument("--exact", action="store_true",
                   help="decode without the coupling-scale floor (Glow.sample's scale_floor=0): the exact "
                        "inverse, which can overflow at temperatures near 1")
    add_batch_size(p, SAMPLE_BATCH, "images decoded at a time (bounds memory)")
    add_picture_output(p, Path("samples.png"))
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("encode", help="images -> standardised latents (.npy, [N, D])")
    add_checkpoint(p)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to encode")
    _add_label(p)
    add_batch_size(p, SAMPLE_BATCH, "images encoded at a time (bounds memory)")
    add_out(p, "the latents [N, D] to this .npy file", default=Path("latents.npy"))
    add_json(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="latents (.npy, [N, D]) -> image grid")
    add_checkpoint(p)
    p.add_argument("latents", type=Path, help="a .npy array [N, D] of latents, as `glowflow encode` writes")
    _add_label(p)
    p.add_argument("--nrow", type=positive_int, default=8, help="images per row of the grid")
    add_batch_size(p, SAMPLE_BATCH, "latents decoded at a time (bounds memory)")
    add_picture_output(p, Path("decoded.png"))
    p.set_defaults(func=cmd_decode)
