"""``glowflow ablate``: the paper's ablation (permutation x coupling, same budget and seeds)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from ..ablation import (DEFAULT_PERMUTATIONS, DEFAULT_PRESET, FIGURE, PANEL_COUPLINGS, RESULTS, TABLE,
                        run_ablation)
from ..config import PRECISIONS, build_train_config
from ..data import canonical_name, get_dataset
from ..variants import parse_variant, run_variants
from .common import (add_dataset, add_deprecated, add_device, add_json, add_no_progress, add_out, deprecated, emit,
                     positive_int)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _dataset_and_root(args) -> tuple[str | None, str | None]:
    """``--dataset NAME --data DIR``; the old ``--data NAME --root DIR`` still works, with a warning."""
    if args.root is not None:
        deprecated("ablate --data NAME --root DIR", "--dataset NAME --data DIR")
        return args.data, args.root
    if args.dataset is None and args.data is not None and not Path(args.data).is_dir():
        try:
            name = canonical_name(args.data)
        except ValueError:
            return None, args.data
        deprecated(f"ablate --data {args.data} (a dataset name)", f"--dataset {args.data}")
        return name, None
    return args.dataset, args.data


def cmd_ablate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.set or [])
    name, root = _dataset_and_root(args)
    if name is not None:
        overrides.append(f"dataset={name}")
        overrides.append(f"data={root}" if root else "data=null")
    elif root:
        overrides.append(f"data={root}")
    if args.limit is not None:
        overrides.append(f"test_limit={args.limit}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.precision:
        overrides.append(f"precision={args.precision}")
    base = build_train_config(args.preset, overrides)
    if base.test_limit is None:
        base = dataclasses.replace(base, test_limit=2000)
    train_data = get_dataset(base.dataset, base.data, "train", limit=base.train_limit)
    test_data = get_dataset(base.dataset, base.data, "test", limit=base.test_limit)
    if tuple(train_data.image_shape) != tuple(base.model.image_shape):
        if name is None:
            raise ValueError(f"the preset's model expects {base.model.image_shape} images, {base.dataset} has "
                             f"{tuple(train_data.image_shape)}: set model.image_shape")
        # the preset was written for another dataset: keep its architecture, take the data's shape
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, image_shape=train_data.image_shape))
    out = Path(args.out or Path("runs") / "ablation" / base.dataset)
    if args.variant:
        return _variants(args, base, out, train_data, test_data)
    results = run_ablation(base, out, seeds=args.num_seeds, permutations=_names(args.permutations),
                           couplings=_names(args.couplings), budget_steps=args.budget_steps,
                           budget_minutes=args.budget_minutes, eval_every=args.eval_every,
                           train_data=train_data, test_data=test_data, progress=not args.no_progress)
    if not args.json:
        print((out / TABLE).read_text())
    summary = results["summary"]
    emit(args, {
        "out": str(out), "results": str(out / RESULTS), "figure": str(out / FIGURE), "table": str(out / TABLE),
        "runs": len(results["runs"]), "skipped": results["skipped"], "budget": results["meta"]["budget"],
        "final_test_bits_per_dim": {f"{r['coupling']}/{r['permutation']}": round(r["final_test_bits_per_dim_mean"], 4)
                                    for r in summary["table"]},
        "paper_ordering_holds": {c: v["holds"] for c, v in summary["permutation_ordering"].items()},
    })
    return 0


def _variants(args, base, out: Path, train_data, test_data) -> int:
    variants = [parse_variant(v) for v in args.variant]
    results = run_variants(base, out, variants, seeds=args.num_seeds, budget_steps=args.budget_steps,
                           budget_minutes=args.budget_minutes, eval_every=args.eval_every, train_data=train_data,
                           test_data=test_data, progress=not args.no_progress)
    if not args.json:
        print((out / TABLE).read_text())
    rows = results["summary"]["table"]
    emit(args, {"out": str(out), "results": str(out / RESULTS), "table": str(out / TABLE), "figure": str(out / FIGURE),
                "budget": results["meta"]["budget"],
                "final_test_bits_per_dim": {r["variant"]: round(r["final_test_bits_per_dim_mean"], 4) for r in rows},
                "difference_from_baseline": {r["variant"]: round(r["difference_from_baseline"], 4)
                                             for r in rows if "difference_from_baseline" in r}})
    return 0


def register(sub) -> None:
    p = sub.add_parser("ablate", help="the paper's ablation: reverse/shuffle/1x1 conv x additive/affine, "
                                      "same budget and seeds; writes results.json, figure.png, table.md")
    add_dataset(p, default_help=" (default: the preset's)")
    p.add_argument("--root", help=argparse.SUPPRESS)  # the old spelling of --data
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"training preset for everything the ablation does not vary (default {DEFAULT_PRESET}; "
                        "GPU: ablation-cifar10-gpu)")
    add_out(p, "results.json, figure.png, table.md and the runs into this directory (default "
               "runs/ablation/<dataset>)")
    p.add_argument("--num-seeds", type=positive_int, default=3, metavar="N",
                   help="train each config with seeds 0..N-1, the same seeds for all configs (default 3)")
    add_deprecated(p, "--seeds", "--num-seeds", dest="num_seeds", type=positive_int)
    p.add_argument("--budget-minutes", type=float, help="wall-clock minutes per run")
    p.add_argument("--budget-steps", type=positive_int, help="training steps per run (fairer on a shared machine); "
                                                             "with --budget-minutes, whichever comes first")
    p.add_argument("--eval-every", type=positive_int, help="steps between test evaluations (default: the preset's)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N test images, the same "
                                                                    "for every evaluation (default: the preset's, "
                                                                    "else 2000)")
    add_deprecated(p, "--test-limit", "--limit", dest="limit", type=positive_int)
    p.add_argument("--permutations", default=",".join(DEFAULT_PERMUTATIONS),
                   help="comma-separated subset of reverse,shuffle,invconv,invconv_lu")
    p.add_argument("--couplings", default=",".join(PANEL_COUPLINGS), help="comma-separated subset of additive,affine")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset setting, e.g. model.steps=8")
    p.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE ...",
                   help="instead of the permutation x coupling grid: compare named variants of the preset, the "
                        "first the baseline, e.g. --variant base: --variant wide:'model.hidden_channels=96 "
                        "model.steps=8' (paired by seed)")
    add_device(p, None, " (default: the preset's)")
    p.add_argument("--precision", choices=PRECISIONS, help="arithmetic of training (default: the preset's)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (1 is often fastest on a busy machine)")
    add_no_progress(p)
    add_json(p)
    p.set_defaults(func=cmd_ablate)
