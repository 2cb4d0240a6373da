"""CLI commands for training and using a model: train, eval, sample, encode, decode, presets."""
from __future__ import annotations

import os

import torch

from .cli import emit, float_list


def _load(args):
    from .model import Glow
    from .distributed import resolve_device

    return Glow.from_pretrained(args.checkpoint, map_location=resolve_device(args.device))


def _train_settings(checkpoint) -> dict:
    """The training config saved beside a checkpoint (for its dataset), or {}."""
    from . import checkpoint as ckpt
    from .train import TRAIN_CONFIG

    try:
        return ckpt.read_json(ckpt.resolve_checkpoint_dir(checkpoint) / TRAIN_CONFIG)
    except ckpt.CheckpointError:
        return {}


# ---------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from .config import build_train_config
    from .train import train

    overrides = list(args.set or [])
    for flag, key in (("dataset", "dataset"), ("data", "data"), ("max_steps", "max_steps"),
                      ("max_minutes", "max_minutes"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("seed", "seed"), ("device", "device"), ("precision", "precision"),
                      ("memory", "model.memory"), ("optimizer", "optimizer")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.compile:
        overrides.append("compile=true")
    if args.no_progress:
        overrides.append("progress=false")
    cfg = build_train_config(args.preset, overrides)
    summary = train(cfg, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        emit(args, summary)
    return 0


# ---------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from .train import evaluate, load_split

    model = _load(args)
    saved = _train_settings(args.checkpoint)
    name = args.dataset or saved.get("dataset")
    if name is None:
        raise ValueError("which dataset? pass --dataset (the checkpoint has no training config)")
    root = args.data or (saved.get("data") if name == saved.get("dataset") else None)
    data = load_split(name, root, args.split, model.config.image_shape, args.limit)
    if tuple(data.image_shape) != tuple(model.config.image_shape):
        raise ValueError(f"{name} images are {tuple(data.image_shape)}, the model expects "
                         f"{tuple(model.config.image_shape)}")
    res = evaluate(model, data.images, data.labels, batch_size=args.batch_size, seed=args.seed,
                   device=next(model.parameters()).device, progress=not args.no_progress)
    emit(args, {"dataset": name, "split": args.split, "n_bits": model.config.n_bits, **res})
    return 0


# ---------------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    from .images import save_grid

    model = _load(args)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    y = None
    if model.config.num_classes:
        y = torch.full((args.n,), args.label) if args.label is not None else torch.arange(args.n) % model.config.num_classes
    for t in args.temperature:
        rows.append(model.sample(args.n, temperature=t, y=y, generator=gen))
    images = torch.cat(rows)
    nrow = args.n if len(args.temperature) > 1 else args.nrow
    path = save_grid(images, args.out, nrow=nrow)
    emit(args, {"out": str(path), "n": args.n, "temperatures": args.temperature})
    return 0


# ---------------------------------------------------------------------------------------- encode / decode
def cmd_encode(args) -> int:
    import numpy as np

    from .images import load_image

    model = _load(args)
    x = torch.stack([load_image(p, model.config.image_shape) for p in args.images])
    y = torch.full((len(x),), args.label) if args.label is not None else None
    with torch.no_grad():
        eps = model.encode(x, y)
    np.save(args.out, eps.double().cpu().numpy())
    emit(args, {"out": args.out, "shape": list(eps.shape)})
    return 0


def cmd_decode(args) -> int:
    import numpy as np

    from .images import save_grid

    model = _load(args)
    try:
        arr = np.load(args.latents, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{args.latents} is not a readable .npy array of latents: {e}") from e
    eps = torch.from_numpy(np.atleast_2d(arr))
    y = torch.full((len(eps),), args.label) if args.label is not None else None
    with torch.no_grad():
        x = model.decode(eps, y).clamp(0, 1)
    path = save_grid(x, args.out, nrow=args.nrow)
    emit(args, {"out": str(path), "n": len(x)})
    return 0


def cmd_presets(args) -> int:
    from .config import list_presets

    emit(args, list_presets())
    return 0


# ---------------------------------------------------------------------------------------- parsers
def _common(p, checkpoint: bool = True):
    if checkpoint:
        p.add_argument("checkpoint", help="run directory or checkpoint directory (config.json + model.safetensors)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a preset (resumable)")
    p.add_argument("--preset", default="fashion-mnist-cpu", help="preset name or a JSON/YAML file")
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics, pictures)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--data", help="dataset root directory")
    p.add_argument("--dataset", help="fashion-mnist, mnist, cifar10, imagenet32, imagenet64 or folder")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--batch-size", type=int, help="global batch size (over all ranks)")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--optimizer", choices=["adam", "adamax"])
    p.add_argument("--device")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--memory", choices=["none", "checkpoint", "invertible"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any preset setting, e.g. --set model.steps=16 --set ema_decay=0.99")
    p.add_argument("--no-progress", action="store_true")
    _common(p, checkpoint=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test-set bits/dim (mean and standard error) on the EMA weights")
    _common(p)
    p.add_argument("--data", help="dataset root (default: the one used for training)")
    p.add_argument("--dataset", help="dataset name (default: the one used for training)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="write a grid of samples (one row per temperature if several)")
    _common(p)
    p.add_argument("--n", type=int, default=64, help="samples (per temperature)")
    p.add_argument("--temperature", type=float_list, default=[0.7], help="e.g. 0.7 or 0,0.5,0.7,1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, help="class for a class-conditional model")
    p.add_argument("--nrow", type=int, default=8)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("encode", help="images -> standardised latents (.npy, [N, D])")
    _common(p)
    p.add_argument("images", nargs="+")
    p.add_argument("--label", type=int)
    p.add_argument("--out", default="latents.npy")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="latents (.npy, [N, D]) -> image grid")
    _common(p)
    p.add_argument("latents")
    p.add_argument("--label", type=int)
    p.add_argument("--nrow", type=int, default=8)
    p.add_argument("--out", default="decoded.png")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("presets", help="list the shipped presets")
    _common(p, checkpoint=False)
    p.set_defaults(func=cmd_presets)
