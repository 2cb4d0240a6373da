"""How often edits of a trained model decode to NaN/inf or to saturated noise; prints JSON.

For each saved direction (``glowflow directions RUN ...`` first), each of the first N test images
and each alpha, the edited latent ``encode(x) + alpha * d`` is decoded three ways:

- ``plain``: the paper's formula as it stands;
- ``floor``: the affine couplings' inverse with its scale floored at ``latent.STABLE_SCALE_FLOOR``;
- ``stable``: the floor, and each level's latent block rescaled to the image's own norm
  (``latent.manipulate(..., stable=True)``, the default).

A decode counts as non-finite if any pixel is NaN or inf, and as saturated if more than 5% of its
pixels fall outside [-0.5, 1.5] before clamping (noise, not an image). Also reported: the smallest
coupling scale seen while encoding the test images, against the floor, and the largest
reconstruction error ``|decode(encode(x)) - x|`` with and without the floor.

    .venv/bin/python benchmarks/edit_stability.py runs/fashion-mnist --images 12 --alphas 1,1.5,2,3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

try:
    import glowflow  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from glowflow import Glow, latent
from glowflow.cli.common import train_settings
from glowflow.data import get_dataset
from glowflow.layers import Coupling
from glowflow.numerics import to_unit


def _min_coupling_scale(model: Glow, x: torch.Tensor) -> float:
    seen = []

    def hook(module, inputs, output):
        scale = module.conditioner(module.split(inputs[0])[0])[1]
        if scale is not None:
            seen.append(float(scale.min()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Coupling)]
    try:
        model.encode(x)
    finally:
        for h in handles:
            h.remove()
    return min(seen) if seen else float("nan")


def _count(model, z, direction, alpha, mode) -> tuple[int, int]:
    e = z + alpha * direction
    if mode == "stable":
        e = latent._keep_norms(model, e, z)
    x = model.decode(e, scale_floor=0.0 if mode == "plain" else latent.STABLE_SCALE_FLOOR).flatten(1)
    non_finite = ~torch.isfinite(x).all(1)
    saturated = latent.far_outside(x) & ~non_finite  # with non_finite: what glowflow.latent calls a failed edit
    return int(non_finite.sum()), int(saturated.sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--dataset")
    p.add_argument("--data")
    p.add_argument("--images", type=int, default=12, help="first N test images")
    p.add_argument("--alphas", default="1,1.5,2,3")
    p.add_argument("--scale-images", type=int, default=2000, help="test images for the smallest-scale check")
    p.add_argument("--only", help="comma-separated direction names (default: all)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model = Glow.from_pretrained(args.checkpoint)
    saved = train_settings(args.checkpoint)
    name = args.dataset or saved.get("dataset")
    root = args.data or saved.get("data")
    c, h, w = model.config.image_shape
    size = h if name == "folder" or name == "orl-faces" else None
    ds = get_dataset(name, root, "test", image_size=size, channels=c if size else None,
                     limit=max(args.images, args.scale_images))
    x_all = to_unit(ds.batch(slice(0, len(ds))))
    x = x_all[: args.images]
    directions, _ = latent.load_directions(latent.directions_dir(args.checkpoint), model.num_dims)
    names = [n for n in directions.names if not args.only or n in args.only.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    z = model.encode(x)
    table = {}
    for mode in ("plain", "floor", "stable"):
        table[mode] = {}
        for a in alphas:
            counts = [_count(model, z, directions[n].to(z), a, mode) for n in names]
            table[mode][f"{a:g}"] = {"non_finite": sum(c[0] for c in counts), "saturated": sum(c[1] for c in counts),
                                     "edits": len(names) * len(x)}
    recon = {f"floor {f:g}": float((model.decode(z, scale_floor=f) - x).abs().max())
             for f in (0.0, latent.STABLE_SCALE_FLOOR)}
    result = {"benchmark": "edit stability", "checkpoint": str(args.checkpoint), "dataset": name,
              "directions": names, "test_images": len(x), "alphas": alphas, "counts": table,
              "smallest_coupling_scale_on_test_images": _min_coupling_scale(model, x_all),
              "scale_images": len(x_all), "stable_scale_floor": latent.STABLE_SCALE_FLOOR,
              "max_reconstruction_error": recon,
              "command": "python benchmarks/edit_stability.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
