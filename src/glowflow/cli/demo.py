"""``glowflow demo``: serve the interactive latent-editing page for a checkpoint."""
from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import torch

from .. import data
from ..checkpoint import CheckpointError
from ..model import Glow
from ..demo import MAX_UPLOAD_MB
from ..images import ImageError, load_image
from .common import (add_checkpoint, add_dataset, add_deprecated, add_json, dataset_of, float_between, load_model, port,
                     positive_int)
from ..directions import load_directions


def cmd_demo(args) -> int:
    try:
        from ..demo.server import create_app, serve  # the 'demo' extra: fastapi, uvicorn
    except ImportError as e:
        raise ValueError(f"the demo needs the 'demo' extra ({e.name} is missing): "
                         "pip install 'glowflow[demo]'") from e
    model = load_model(args)
    try:
        directions, _ = load_directions(args.directions, model.num_dims, checkpoint=args.checkpoint)
    except CheckpointError as e:
        if args.directions:
            raise
        print(f"note: {e}; the page will have no attribute sliders", file=sys.stderr)
        directions = None
    test_images, test_names, class_names = demo_test_images(model, args)
    denoiser = (Glow.from_pretrained(args.denoiser, map_location=next(model.parameters()).device)
                if args.denoiser is not None else None)
    app = create_app(model, directions, test_images, test_names, class_names,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), alpha_max=args.alpha_max,
                     host=args.host, port=args.port, denoiser=denoiser)  # the app answers only requests for this address
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}, reachable from other machines; the demo has no "
              "authentication", file=sys.stderr)
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}/"  # IPv6 in brackets
    if args.json:
        print(json.dumps({"url": url, "directions": [] if directions is None else list(directions.names),
                          "test_images": 0 if test_images is None else len(test_images)}), flush=True)
    else:
        print(f"glowflow demo: {url}  (Ctrl-C to stop)", flush=True)
    serve(app, args.host, args.port)
    return 0


def demo_test_images(model, args):
    """``(images [N, C, H, W] or None, names, class names)`` offered on the page as starting points:
    a folder's images, or the first images of a dataset split (by default the training dataset's)."""
    n = args.limit
    c, h, w = model.config.image_shape
    if args.test_images:
        folder = args.test_images
        if not folder.is_dir():
            raise FileNotFoundError(f"--test-images: folder not found: {folder}")
        images, names = [], []
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            if len(images) >= n:
                break
            try:
                images.append(load_image(path, (c, h, w)))
                names.append(path.name)
            except ImageError:
                continue  # not an image: skip it
        return (torch.stack(images), names, None) if images else (None, None, None)
    dataset, root = dataset_of(args)
    if not dataset:
        return None, None, None
    try:
        ds = data.get_dataset(dataset, root, split=args.split, image_size=h, channels=c, limit=n)
    except (ValueError, FileNotFoundError) as e:
        if args.dataset:
            raise
        print(f"note: no test images ({e})", file=sys.stderr)
        return None, None, None
    if ds.labels is not None and ds.class_names:
        names = [f"{i}: {ds.class_names[int(k)]}" for i, k in enumerate(ds.labels)]
    else:
        names = [f"{dataset} {i}" for i in range(len(ds))]
    return ds.batch(slice(0, n)), names, ds.class_names if model.config.num_classes else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


upload_mb = float_between(0, MAX_UPLOAD_MB, f"a size in MB above 0 and at most {MAX_UPLOAD_MB}", open_low=True)


def register(sub) -> None:
    p = sub.add_parser("demo", help="serve the interactive latent-editing web page")
    add_checkpoint(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; requests must name it (default 127.0.0.1: this machine only, "
                        "as localhost, 127.0.0.1 or [::1]); 0.0.0.0 or :: serves other machines under any name")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--directions", type=Path, help="folder with directions.safetensors "
                                                   "(default: next to the checkpoint)")
    p.add_argument("--test-images", type=Path, help="folder of images offered as starting points")
    add_dataset(p, default_help=" (or: offer the first images of this dataset's split; default: the "
                                "training dataset)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="the split whose images are offered")
    p.add_argument("--limit", type=positive_int, default=12, metavar="N",
                   help="use only the first N images of the split or folder as the page's starting points")
    add_deprecated(p, "--num-test-images", "--limit", dest="limit", type=positive_int)
    p.add_argument("--alpha-max", type=float, default=2.0,
                   help="sliders span at most [-alpha-max, alpha-max] (default 2), each narrowed to where its edits "
                        "of the test images stay valid; the server refuses more")
    p.add_argument("--max-upload-mb", type=upload_mb, default=4.0,
                   help=f"largest image a request may upload, in MB, at most {MAX_UPLOAD_MB} (default 4)")
    p.add_argument("--denoiser", type=Path, help="a model of noisy images (the shipped orl-faces-denoise): the "
                   "restore panel denoises noise up to its level with it (its posterior mean, in seconds)")
    add_json(p)
    p.set_defaults(func=cmd_demo)
