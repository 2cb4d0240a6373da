"""CLI commands for latent-space editing: interpolate, directions, manipulate, demo.

  glowflow interpolate A.png B.png --checkpoint RUN --steps 8 --out grid.png
  glowflow directions RUN --dataset fashion-mnist --data /usr/share/datasets/fashion-mnist --limit 2000
  glowflow directions RUN --dataset fashion-mnist --positive Sneaker --negative "Ankle boot"
  glowflow directions RUN --attributes list_attr_celeba.txt --images img_align_celeba --limit 5000
  glowflow directions RUN --attributes labels.csv            (images beside the CSV)
  glowflow manipulate IMG --checkpoint RUN --attribute Smiling --alphas -1,-0.5,0,0.5,1 --out strip.png
  glowflow demo RUN [--port 8000] [--test-images DIR | --dataset fashion-mnist]
"""
from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path

from .cli import float_list

# argparse takes "-1,-0.5,0" for an option flag; this lets such number lists through as values.
_NUMBER_LIST = re.compile(r"^-\.?\d")


def register(sub) -> None:
    p = sub.add_parser("interpolate", help="decode a straight (or spherical) latent path between two images")
    p.add_argument("image_a", type=Path)
    p.add_argument("image_b", type=Path)
    _checkpoint_option(p)
    p.add_argument("--steps", type=int, default=8, help="images on the path, ends included (default 8)")
    p.add_argument("--method", choices=("linear", "spherical"), default="linear")
    p.add_argument("--label-a", type=int, help="class of A (class-conditional models only)")
    p.add_argument("--label-b", type=int, help="class of B (default: that of A)")
    p.add_argument("--out", type=Path, required=True, help="PNG grid to write")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("directions", help="compute attribute directions mean(z|attr) - mean(z|not attr)")
    p.add_argument("checkpoint", type=Path, help="run directory or checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a labelled dataset (fashion-mnist, mnist, cifar10): one direction "
                                       "per class, class vs rest")
    src.add_argument("--attributes", type=Path, help="CelebA list_attr_celeba.txt, or a CSV "
                                                     "filename,attr1,attr2,... (by the .csv suffix)")
    p.add_argument("--data", type=Path, help="dataset root (default: the dataset's usual place)")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--images", type=Path, help="image folder for --attributes (default: the file's folder)")
    p.add_argument("--only", help="comma-separated attribute names to keep (--attributes)")
    p.add_argument("--positive", help="with --negative: one direction from this class vs that class")
    p.add_argument("--negative")
    p.add_argument("--limit", type=int, help="use the first N images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--replace", action="store_true", help="drop directions saved before instead of merging")
    p.add_argument("--out", type=Path, help="where to save (default: next to the checkpoint)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=cmd_directions)

    p = sub.add_parser("manipulate", help="move an image along a saved attribute direction")
    p._negative_number_matcher = _NUMBER_LIST  # noqa: SLF001 (see _NUMBER_LIST)
    p.add_argument("image", type=Path)
    _checkpoint_option(p)
    p.add_argument("--attribute", required=True, help="name of a saved direction")
    p.add_argument("--alphas", default="-1,-0.5,0,0.5,1", type=float_list,
                   help="comma-separated steps along the direction (default -1,-0.5,0,0.5,1)")
    p.add_argument("--directions", type=Path, help="folder with directions.safetensors "
                                                   "(default: next to the checkpoint)")
    p.add_argument("--label", type=int, help="class of the image (class-conditional models only)")
    p.add_argument("--out", type=Path, required=True, help="PNG strip to write")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=cmd_manipulate)

    p = sub.add_parser("demo", help="serve the interactive latent-editing web page")
    p.add_argument("checkpoint", type=Path, help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--directions", type=Path, help="folder with directions.safetensors "
                                                   "(default: next to the checkpoint)")
    p.add_argument("--test-images", type=Path, help="folder of images offered as starting points")
    p.add_argument("--dataset", help="or: offer the first images of this dataset's split")
    p.add_argument("--data", type=Path, help="dataset root for --dataset")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--num-test-images", type=int, default=12)
    p.add_argument("--alpha-max", type=float, default=1.0, help="sliders span [-alpha-max, alpha-max]")
    p.add_argument("--max-upload-mb", type=float, default=4.0)
    p.set_defaults(func=cmd_demo)


def _checkpoint_option(p) -> None:
    p.add_argument("--checkpoint", "-c", type=Path, required=True,
                   help="run directory or checkpoint directory (config.json + model.safetensors)")


def _load_model(path: Path):
    from .model import Glow
    return Glow.from_pretrained(path)


def _load_directions(model, checkpoint: Path, folder: Path | None):
    from . import latent
    folder = folder or latent.directions_dir(checkpoint)
    directions, info = latent.load_directions(folder, model.num_dims)
    stored = info.get("weights_sha256")
    if stored and stored != latent.weights_sha256(checkpoint):
        print(f"warning: the directions in {folder} were computed with other weights than those now in "
              f"{checkpoint}; recompute them with `glowflow directions`", file=sys.stderr)
    return directions


def _image_shape(model) -> tuple[int, int, int]:
    return tuple(model.config.image_shape)


# ---------------------------------------------------------------------------------- commands

def cmd_interpolate(args) -> int:
    from . import latent
    from .cli import emit
    from .images import load_image, save_grid

    model = _load_model(args.checkpoint)
    x1 = load_image(args.image_a, _image_shape(model))
    x2 = load_image(args.image_b, _image_shape(model))
    images = latent.interpolate(model, x1, x2, args.steps, args.method, args.label_a, args.label_b)
    save_grid(images, args.out, nrow=args.steps)
    emit(args, {"out": str(args.out), "steps": args.steps, "method": args.method})
    return 0


def cmd_manipulate(args) -> int:
    from . import latent
    from .cli import emit
    from .images import load_image, save_grid

    model = _load_model(args.checkpoint)
    directions = _load_directions(model, args.checkpoint, args.directions)
    x = load_image(args.image, _image_shape(model))
    strip = latent.manipulate(model, x, directions[args.attribute], args.alphas, args.label)
    save_grid(strip, args.out, nrow=len(args.alphas))
    emit(args, {"out": str(args.out), "attribute": args.attribute, "alphas": args.alphas})
    return 0


def cmd_directions(args) -> int:
    from . import latent
    from .checkpoint import CheckpointError
    from .cli import emit

    if (args.positive is None) != (args.negative is None):
        raise ValueError("--positive and --negative go together")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    model = _load_model(args.checkpoint)
    if args.dataset:
        images, attributes, names, labels, source = _class_labelled(model, args)
    else:
        images, attributes, names, labels, source = _attribute_file(model, args)

    def progress(done, total):
        if not args.json:
            print(f"\rencoded {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    directions = latent.directions_from_images(model, images, attributes, names, labels,
                                               args.batch_size, source, progress)
    out = args.out or latent.directions_dir(args.checkpoint)
    if not args.replace:
        try:
            directions = latent.load_directions(out, model.num_dims)[0].merged(directions)
        except CheckpointError as e:
            if (Path(out) / latent.DIRECTIONS_WEIGHTS).exists():
                print(f"warning: {e}; replacing it with the new directions only", file=sys.stderr)
    latent.save_directions(directions, out, latent.weights_sha256(args.checkpoint))
    emit(args, {"saved": str(Path(out) / latent.DIRECTIONS_WEIGHTS), "num_images": len(images),
                "directions": {d["name"]: [d["positive_count"], d["negative_count"]] for d in directions.info()}})
    return 0


def _class_labelled(model, args):
    """Images, class-vs-rest (or one pair) attributes, names, labels-for-the-model and a source note."""
    from . import data, latent

    c, h, w = _image_shape(model)
    if h != w:
        raise ValueError(f"dataset images are square; the model expects {h}x{w}")
    if args.only:
        raise ValueError("--only selects columns of an --attributes file; with --dataset use --positive/--negative")
    ds = data.get_dataset(args.dataset, args.data, split=args.split, image_size=h, channels=c, limit=args.limit)
    if ds.labels is None or not ds.class_names:
        raise ValueError(f"{args.dataset} has no class labels to build directions from")
    if args.positive is not None:
        attributes, name = latent.pair_attributes(ds.labels, ds.class_names, args.positive, args.negative)
        names = [name]
    else:
        attributes, names = latent.class_attributes(ds.labels, ds.class_names), list(ds.class_names)
    labels = ds.labels if model.config.num_classes else None
    return ds.images, attributes, names, labels, f"{args.dataset} {args.split} classes"


def _attribute_file(model, args):
    from . import latent

    if args.positive is not None:
        raise ValueError("--positive/--negative pick classes of a --dataset; with --attributes use --only")
    if model.config.num_classes:
        raise ValueError("this model is class-conditional; attribute files carry no class labels to "
                         "encode with, use an unconditional model")
    table = latent.parse_attribute_file(args.attributes)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    table = table.select(only).head(args.limit)
    paths = latent.table_image_paths(table, args.images or args.attributes.parent)
    return paths, table.values, list(table.names), None, str(args.attributes.name)


def cmd_demo(args) -> int:
    try:
        from .demo.server import create_app, serve
    except ImportError as e:
        raise ValueError(f"the demo needs the 'demo' extra ({e.name} is missing): "
                         "pip install 'glowflow[demo]'") from e
    from .checkpoint import CheckpointError

    model = _load_model(args.checkpoint)
    try:
        directions = _load_directions(model, args.checkpoint, args.directions)
    except CheckpointError as e:
        if args.directions:
            raise
        print(f"note: {e}; the page will have no attribute sliders", file=sys.stderr)
        directions = None
    test_images, test_names, class_names = _demo_test_images(model, args)
    app = create_app(model, directions, test_images, test_names, class_names,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), alpha_max=args.alpha_max)
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host}, reachable from other machines; the demo has no "
              "authentication", file=sys.stderr)
    print(f"glowflow demo: http://{args.host}:{args.port}/  (Ctrl-C to stop)", flush=True)
    serve(app, args.host, args.port)
    return 0


def _demo_test_images(model, args):
    import torch

    from .images import ImageError, load_image

    n = args.num_test_images
    c, h, w = _image_shape(model)
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
    dataset, root = args.dataset, args.data
    if dataset is None:
        dataset, root = _training_dataset(args.checkpoint)
    if dataset:
        from . import data
        try:
            ds = data.get_dataset(dataset, root, split=args.split, image_size=h, channels=c, limit=n)
        except (ValueError, FileNotFoundError, NotImplementedError) as e:
            if args.dataset:
                raise
            print(f"note: no test images ({e})", file=sys.stderr)
            return None, None, None
        if ds.labels is not None and ds.class_names:
            names = [f"{i}: {ds.class_names[int(k)]}" for i, k in enumerate(ds.labels)]
        else:
            names = [f"{dataset} {i}" for i in range(len(ds))]
        return ds.images, names, ds.class_names if model.config.num_classes else None
    return None, None, None


def _training_dataset(checkpoint) -> tuple[str | None, str | None]:
    """The dataset a run was trained on, from its ``train_config.json`` (None if not recorded)."""
    from .checkpoint import CheckpointError, read_json, resolve_checkpoint_dir
    from .train import TRAIN_CONFIG

    try:
        cfg = read_json(resolve_checkpoint_dir(checkpoint) / TRAIN_CONFIG)
    except CheckpointError:
        return None, None
    return cfg.get("dataset"), cfg.get("data")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
