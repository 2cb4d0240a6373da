"""``glowflow sample``, ``encode`` and ``decode``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..images import load_image, save_grid
from .common import add_checkpoint, add_json, emit, float_list, load_model, positive_int


def cmd_sample(args) -> int:
    model = load_model(args)
    gen = torch.Generator().manual_seed(args.seed)
    y = None
    if model.config.num_classes:
        y = (torch.full((args.n,), args.label) if args.label is not None
             else torch.arange(args.n) % model.config.num_classes)
    rows = [model.sample(args.n, temperature=t, y=y, generator=gen) for t in args.temperature]
    images = torch.cat(rows)
    nrow = args.n if len(args.temperature) > 1 else args.nrow
    path = save_grid(images, args.out, nrow=nrow, scale=args.scale)
    emit(args, {"out": str(path), "n": args.n, "temperatures": args.temperature})
    return 0


def cmd_encode(args) -> int:
    model = load_model(args)
    x = torch.stack([load_image(p, model.config.image_shape) for p in args.images])
    y = torch.full((len(x),), args.label) if args.label is not None else None
    with torch.no_grad():
        eps = model.encode(x, y)
    np.save(args.out, eps.double().cpu().numpy())
    emit(args, {"out": str(args.out), "shape": list(eps.shape)})
    return 0


def cmd_decode(args) -> int:
    model = load_model(args)
    try:
        arr = np.load(args.latents, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{args.latents} is not a readable .npy array of latents: {e}") from e
    eps = torch.from_numpy(np.atleast_2d(arr))
    y = torch.full((len(eps),), args.label) if args.label is not None else None
    with torch.no_grad():
        x = model.decode(eps, y).clamp(0, 1)
    path = save_grid(x, args.out, nrow=args.nrow, scale=args.scale)
    emit(args, {"out": str(path), "n": len(x)})
    return 0


def register(sub) -> None:
    p = sub.add_parser("sample", help="write a grid of samples (one row per temperature if several)")
    add_checkpoint(p)
    p.add_argument("--n", type=positive_int, default=64, help="samples (per temperature)")
    p.add_argument("--temperature", type=float_list, default=[0.7], help="e.g. 0.7 or 0,0.5,0.7,1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, help="class for a class-conditional model")
    p.add_argument("--nrow", type=positive_int, default=8)
    p.add_argument("--scale", type=positive_int, default=1, help="enlarge each image this many times")
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    add_json(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("encode", help="images -> standardised latents (.npy, [N, D])")
    add_checkpoint(p)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--label", type=int)
    p.add_argument("--out", type=Path, default=Path("latents.npy"))
    add_json(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="latents (.npy, [N, D]) -> image grid")
    add_checkpoint(p)
    p.add_argument("latents", type=Path)
    p.add_argument("--label", type=int)
    p.add_argument("--nrow", type=positive_int, default=8)
    p.add_argument("--scale", type=positive_int, default=1, help="enlarge each image this many times")
    p.add_argument("--out", type=Path, default=Path("decoded.png"))
    add_json(p)
    p.set_defaults(func=cmd_decode)
