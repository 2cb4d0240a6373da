"""``glowflow interpolate``, ``directions`` and ``manipulate``: editing through the latent space.

  glowflow interpolate RUN A.png B.png --n 8 --out grid.png
  glowflow directions RUN --dataset fashion-mnist --positive Sneaker --negative "Ankle boot"
  glowflow directions RUN --attributes list_attr_celeba.txt --images img_align_celeba --limit 5000
  glowflow directions RUN --attributes labels.csv            (images beside the CSV)
  glowflow directions RUN --attributes faces.csv --dataset orl-faces --estimator paired
  glowflow manipulate RUN IMG [IMG ...] --attribute Smiling --alphas -1,-0.5,0,0.5,1 --out strips.png
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import data, editing
from ..data.attributes import parse_attribute_file, table_image_paths
from ..directions import (DIRECTIONS_WEIGHTS, class_attributes, directions_dir, directions_from_images,
                          load_directions, pair_attributes, save_directions)
from ..checkpoint import CheckpointError, weights_sha256
from ..estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from ..images import load_image, save_grid
from ..progress import Progress
from .common import (add_batch_size, add_checkpoint, add_dataset, add_deprecated, add_json, add_limit, add_n,
                     add_no_progress, add_out, add_picture_output, allow_negative_number_lists, check_count,
                     dataset_of, emit, float_list, int_between, load_model, resolve_positionals, warn)


def cmd_interpolate(args) -> int:
    resolve_positionals(args)
    check_count(args, args.n, "interpolate --n")
    model = load_model(args)
    shape = model.config.image_shape
    x1, x2 = load_image(args.image_a, shape), load_image(args.image_b, shape)
    images = editing.interpolate(model, x1, x2, args.n, args.method, args.label_a, args.label_b,
                                stable=not args.raw)
    save_grid(images, args.out, nrow=args.n, scale=args.scale)
    emit(args, {"out": str(args.out), "n": args.n, "method": args.method})
    return 0


def cmd_manipulate(args) -> int:
    resolve_positionals(args)
    check_count(args, len(args.alphas) * len(args.images), "manipulate (images x alphas)")
    model = load_model(args)
    directions, _ = load_directions(args.directions, model.num_dims, checkpoint=args.checkpoint)
    keep = [k.strip() for k in args.keep.split(",") if k.strip()] if args.keep else []
    direction = directions.conditioned(args.attribute, keep) if keep else directions[args.attribute]
    strips = []
    for path in args.images:  # one row per image
        x = load_image(path, model.config.image_shape)
        strips.append(editing.manipulate(model, x, direction, args.alphas, args.label, stable=not args.raw,
                                        failed="grey" if args.grey_failed else "raise"))
    save_grid(torch.cat(strips), args.out, nrow=len(args.alphas), scale=args.scale)
    emit(args, {"out": str(args.out), "attribute": args.attribute, "alphas": args.alphas,
                "images": [str(p) for p in args.images]})
    return 0


def cmd_directions(args) -> int:
    if (args.positive is None) != (args.negative is None):
        raise ValueError("--positive and --negative go together")
    if args.dataset is None and args.attributes is None:
        raise ValueError("give a source of labels: --dataset NAME (its classes) or --attributes FILE "
                         "(with --dataset: only the rows of that dataset's --split images)")
    if args.out is None and not Path(args.checkpoint).exists():
        raise ValueError(f"{args.checkpoint} is a model read by name, whose folder is not yours to write into: "
                         f"pass --out DIR for its directions (then `manipulate`/`demo` take --directions DIR)")
    model = load_model(args)
    if args.attributes is None:
        images, attributes, names, labels, source, groups = _class_labelled(model, args)
    else:
        images, attributes, names, labels, source, groups = _attribute_file(model, args)
    if ESTIMATORS[args.estimator].needs_groups and groups is None:
        raise ValueError(f"the {args.estimator} estimator pairs images of the same group (person): give "
                         "--attributes with --dataset, whose labels are the groups (orl-faces: the person)")

    bar = Progress(None, "encode", enabled=not args.no_progress, unit="img")

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    with bar:
        directions = directions_from_images(model, images, attributes, names, labels, args.batch_size,
                                            source, progress, args.estimator, groups)
    out = args.out or directions_dir(args.checkpoint)
    if not args.replace:
        try:
            directions = load_directions(out, model.num_dims)[0].merged(directions)
        except CheckpointError as e:
            if (Path(out) / DIRECTIONS_WEIGHTS).exists():
                warn(f"{e}; replacing it with the new directions only")
    save_directions(directions, out, weights_sha256(args.checkpoint))
    emit(args, {"saved": str(Path(out) / DIRECTIONS_WEIGHTS), "num_images": len(images),
                "directions": {d["name"]: [d["positive_count"], d["negative_count"]] for d in directions.info()}})
    return 0


def _class_labelled(model, args):
    """Images, class-vs-rest (or one pair) attributes, names, labels-for-the-model and a source note."""
    c, h, w = model.config.image_shape
    if h != w:
        raise ValueError(f"dataset images are square; the model expects {h}x{w}")
    if args.only:
        raise ValueError("--only selects columns of an --attributes file; with --dataset use --positive/--negative")
    name, root = dataset_of(args, saved={})
    ds = data.get_dataset(name, root, split=args.split, image_size=h, channels=c, limit=args.limit)
    if ds.labels is None or not ds.class_names:
        raise ValueError(f"{name} has no class labels to build directions from")
    if args.positive is not None:
        attributes, direction = pair_attributes(ds.labels, ds.class_names, args.positive, args.negative)
        names = [direction]
    else:
        attributes, names = class_attributes(ds.labels, ds.class_names), list(ds.class_names)
    labels = ds.labels if model.config.num_classes else None
    return ds, attributes, names, labels, f"{name} {args.split} classes", None  # read a batch at a time


def _attribute_file(model, args):
    if args.positive is not None:
        raise ValueError("--positive/--negative pick classes of a --dataset; with --attributes use --only")
    if model.config.num_classes:
        raise ValueError("this model is class-conditional; attribute files carry no class labels to "
                         "encode with, use an unconditional model")
    table = parse_attribute_file(args.attributes)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    table = table.select(only)
    if args.dataset:  # e.g. only the training faces enter the means
        images, values, groups = _split_rows(model, table, args)
        source = f"{args.attributes.name}, {args.dataset} {args.split} images"
        groups = None if groups is None else groups[:args.limit]
        return images[:args.limit], values[:args.limit], list(table.names), None, source, groups
    table = table.head(args.limit)
    paths = table_image_paths(table, args.images or args.attributes.parent)
    return paths, table.values, list(table.names), None, str(args.attributes.name), None


def _split_rows(model, table, args):
    """The images of the ``--dataset`` split that ``table`` has rows for, decoded as that dataset
    decodes them, those rows' values, and the images' dataset labels (the groups of the paired
    estimator: the person, for the faces) or None."""
    if args.images:
        raise ValueError("--images is for --attributes alone; with --dataset the images are that dataset's")
    c, h, _ = model.config.image_shape
    name, root = dataset_of(args, saved={})
    ds = data.get_dataset(name, root, split=args.split, image_size=h, channels=c)
    if ds.filenames is None:
        raise ValueError(f"{name} does not name its images, so the rows of {args.attributes} cannot be matched "
                         "to them; use --images DIR instead of --dataset")
    index = {f: i for i, f in enumerate(ds.filenames)}
    rows = [i for i, f in enumerate(table.filenames) if f in index]
    if not rows:
        raise ValueError(f"none of the {len(table)} rows of {args.attributes} names an image of {name}'s "
                         f"{args.split} split (its {len(ds)} files are named like {ds.filenames[:1]})")
    picked = [index[table.filenames[i]] for i in rows]
    return ds.batch(picked), table.values[rows], None if ds.labels is None else ds.labels[picked]


def _add_raw(p) -> None:
    p.add_argument("--raw", action="store_true", help="decode the edited latent as it stands (by default the "
                                                      "coupling scales are floored and, for directions, each "
                                                      "level keeps its norm: see glowflow.editing)")


def register(sub) -> None:
    p = sub.add_parser("interpolate", help="decode a straight (or spherical) latent path between two images")
    add_checkpoint(p, "IMAGE_A", "IMAGE_B")
    add_n(p, "images on the path, ends included", 8, low=2)
    add_deprecated(p, "--steps", "--n", dest="n", type=int_between(2, None, "an integer >= 2"))
    p.add_argument("--method", choices=editing.INTERPOLATIONS, default="linear",
                   help="linear: a straight line between the latents; spherical: along the great circle")
    p.add_argument("--label-a", type=int, help="class of A (class-conditional models only)")
    p.add_argument("--label-b", type=int, help="class of B (default: that of A)")
    _add_raw(p)
    add_picture_output(p, what="the PNG row of images to this file")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("directions", help="compute attribute directions (by default mean(z|attr) - mean(z|not attr))")
    add_checkpoint(p)
    add_dataset(p)
    p.add_argument("--attributes", type=Path, help="CelebA list_attr_celeba.txt, or a CSV filename,attr1,attr2,... "
                                                   "(by the .csv suffix); with --dataset, only the rows of that "
                                                   "dataset's --split images are used (e.g. the training faces)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="which split's images enter the means")
    p.add_argument("--images", type=Path, help="image folder for --attributes (default: the file's folder)")
    p.add_argument("--only", help="comma-separated attribute names to keep (--attributes)")
    p.add_argument("--positive", help="with --negative: one direction from this class vs that class")
    p.add_argument("--negative", help="with --positive: the class the direction leads away from")
    add_limit(p, "images (rows of --attributes)")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default=DEFAULT_ESTIMATOR,
                   help="how a direction is estimated from the images with and without the attribute "
                        f"(default {DEFAULT_ESTIMATOR}; docs/editing.md compares them): "
                        + "; ".join(f"{n}: {c.description}" for n, c in ESTIMATORS.items()))
    add_batch_size(p, 64)
    p.add_argument("--replace", action="store_true", help="drop directions saved before instead of merging")
    add_out(p, "directions.safetensors into this folder (default: the run directory; required for a model "
               "read by name)")
    add_no_progress(p)
    add_json(p)
    p.set_defaults(func=cmd_directions)

    p = sub.add_parser("manipulate", help="move an image along a saved attribute direction")
    allow_negative_number_lists(p)
    add_checkpoint(p, "IMAGE...")
    p.add_argument("--attribute", required=True, help="name of a saved direction")
    p.add_argument("--alphas", default="-1,-0.5,0,0.5,1", type=float_list,
                   help="comma-separated steps along the direction (default -1,-0.5,0,0.5,1)")
    p.add_argument("--directions", type=Path, help="folder with directions.safetensors "
                                                   "(default: next to the checkpoint)")
    p.add_argument("--keep", help="comma-separated saved directions to hold still: the attribute's direction "
                                  "with its components along them removed (e.g. --attribute smiling --keep glasses)")
    p.add_argument("--label", type=int, help="class of the image (class-conditional models only)")
    p.add_argument("--grey-failed", action="store_true",
                   help="draw an alpha whose decode fails as a grey tile, with a warning, instead of stopping")
    _add_raw(p)
    add_picture_output(p, what="the PNG strips (one row per image) to this file")
    p.set_defaults(func=cmd_manipulate)
