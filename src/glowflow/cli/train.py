"""``glowflow train``, ``eval`` and ``presets``."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import COUPLINGS, LR_DECAYS, MEMORY_MODES, OPTIMIZERS, PRECISIONS, build_train_config
from ..checkpoint import CHECKPOINT_DIR
from ..presets import list_presets
from ..rundir import TRAIN_CONFIG
from ..train import dataset_bits_per_dim, load_split, train
from .common import (add_batch_size, add_checkpoint, add_dataset, add_device, add_json, add_limit, add_no_progress,
                     add_out, add_seed, dataset_of, emit, load_model, positive_int)

# command-line flags that stand for a preset setting
_FLAG_SETTINGS = (("dataset", "dataset"), ("data", "data"), ("max_steps", "max_steps"),
                  ("max_minutes", "max_minutes"), ("batch_size", "batch_size"), ("lr", "lr"),
                  ("seed", "seed"), ("device", "device"), ("precision", "precision"),
                  ("memory", "memory"), ("optimizer", "optimizer"))


DEFAULT_PRESET = "fashion-mnist-cpu"


def _preset_of(args) -> str:
    """--preset; when it is not given, a resumed run's own settings (its checkpoint's
    train_config.json), else the default preset."""
    if args.preset is not None:
        return args.preset
    saved = Path(args.out) / CHECKPOINT_DIR / TRAIN_CONFIG
    return str(saved) if args.resume and saved.is_file() else DEFAULT_PRESET


def cmd_train(args) -> int:
    overrides = list(args.set or [])
    for flag, key in _FLAG_SETTINGS:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.compile:
        overrides.append("compile=true")
    if args.no_progress:
        overrides.append("progress=false")
    cfg = build_train_config(_preset_of(args), overrides)
    summary = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        emit(args, summary)
    return 0


def cmd_eval(args) -> int:
    model = load_model(args)
    name, root = dataset_of(args)
    if name is None:
        raise ValueError("which dataset? pass --dataset (the checkpoint has no training config)")
    data = load_split(name, root, args.split, model.config.image_shape, args.limit)
    if tuple(data.image_shape) != tuple(model.config.image_shape):
        raise ValueError(f"{name} images are {tuple(data.image_shape)}, the model expects "
                         f"{tuple(model.config.image_shape)}")
    res = dataset_bits_per_dim(model, data, batch_size=args.batch_size, seed=args.seed,
                               device=next(model.parameters()).device, progress=not args.no_progress)
    bound = f"{model.config.dequantization} dequantization"  # which upper bound on bits/dim this is
    emit(args, {"dataset": name, "split": args.split, "n_bits": model.config.n_bits, "bound": bound, **res})
    return 0


def cmd_presets(args) -> int:
    emit(args, list_presets())
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a preset (resumable)")
    p.add_argument("--preset", help="preset name (`glowflow presets`) or a JSON/YAML file (default: with --resume, "
                                    f"the run's own settings, else {DEFAULT_PRESET})")
    add_out(p, "the run (checkpoint, metrics, pictures) into this directory", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (its checkpoint, metrics "
                                                            "and pictures are deleted)")
    add_dataset(p, default_help=" (default: the preset's)")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimisation steps (default: the "
                                                           "preset's)")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes of training (default: the "
                                                      "preset's); with --max-steps, whichever comes first")
    add_batch_size(p, None, "images per optimisation step, over all ranks (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    add_seed(p, "the run: initialisation, data order and noise (default: the preset's)", default=None)
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: the preset's")
    add_device(p, None, " (default: the preset's)")
    p.add_argument("--precision", choices=PRECISIONS, help="arithmetic of the forward and backward passes "
                                                           "(default: the preset's)")
    p.add_argument("--memory", choices=MEMORY_MODES, help="how gradients are computed (invertible: "
                                                           "activation memory flat in depth; default: the preset's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any preset setting, e.g. --set model.steps=16 --set ema_decay=0.99 "
                        f"(lr_decay: {', '.join(LR_DECAYS)}; model.coupling: {', '.join(COUPLINGS)}, its options as "
                        "model.coupling_options.NAME=VALUE)")
    add_no_progress(p)
    add_json(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test-set bits/dim (mean and standard error) on the EMA weights")
    add_checkpoint(p)
    add_dataset(p, default_help=" (default: the one used for training)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split to score")
    add_limit(p, "images of the split")
    add_batch_size(p, 500)
    add_seed(p, "the dequantisation noise")
    add_no_progress(p)
    add_json(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("presets", help="list the shipped presets")
    add_json(p)
    p.set_defaults(func=cmd_presets)
