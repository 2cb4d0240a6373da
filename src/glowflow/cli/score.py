"""``glowflow score`` (per-image bits/dim and log p(x) of anything) and ``glowflow ood``
(out-of-distribution detectors graded on named sets). Sets are spelt as :mod:`glowflow.inputs` says."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..data import canonical_name
from ..inputs import SET_HELP, parse_set
from ..likelihood import describe_outliers, score_inputs, summarize_rows, write_score_csv
from ..model import Glow
from ..ood import COMPRESSORS, REFERENCE_IMAGES, markdown_table, run_ood, write_report
from .common import (add_batch_size, add_checkpoint, add_deprecated, add_json, add_limit, add_no_progress, add_out,
                     add_seed, deprecated, emit, int_list, load_model, positive_int, train_settings, warn)


# ----------------------------------------------------------------------------------- arguments
def data_root(text: str) -> tuple[str | None, str]:
    """An argparse type: ``NAME=DIR`` (the root of dataset NAME) or a bare ``DIR``."""
    name, sep, root = text.partition("=")
    if not sep:
        return None, text
    try:
        return canonical_name(name), root
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def compressor_list(text: str) -> list[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values or any(v not in COMPRESSORS for v in values):
        raise argparse.ArgumentTypeError(f"expected compressors among {','.join(COMPRESSORS)}, got {text!r}")
    return values


def roots_of(args, specs: list[str]) -> dict[str, str]:
    """Dataset name -> root: ``--data NAME=DIR``; a bare ``--data DIR`` for the first dataset the
    sets name; then the dataset the checkpoint was trained on, where it was."""
    roots = {}
    saved = train_settings(args.checkpoint)
    if saved.get("dataset") and saved.get("data"):
        try:
            roots[canonical_name(saved["dataset"])] = saved["data"]
        except ValueError:
            pass
    named = []
    for spec in specs:
        try:
            n = parse_set(spec)
        except ValueError:  # a misspelt set: reported where it is read
            continue
        if n is not None and n.kind == "dataset":
            named.append(n.name)
    for name, root in args.data or []:
        if name is None:
            if not named:
                raise ValueError(f"--data {root}: none of the sets is a dataset; give folders by their path")
            name = named[0]
        roots[name] = root
    return roots


def add_scoring(p) -> None:
    p.add_argument("--data", action="append", type=data_root, metavar="[NAME=]DIR",
                   help="where dataset NAME lives (repeatable); a bare DIR is the first dataset named "
                        "(default: the training data for that dataset, else data/NAME or /usr/share/datasets/NAME)")
    add_batch_size(p, 500)
    p.add_argument("--draws", type=positive_int, default=1, help="average over this many dequantisation draws")
    add_seed(p, "the dequantisation noise and the synthetic sets")
    add_limit(p, "images of each set", spread=True)
    add_no_progress(p)


# ----------------------------------------------------------------------------------- score
def _number(v) -> str:
    return "" if v is None else f"{v:.4f}"


def cmd_score(args) -> int:
    model = load_model(args)
    rows = score_inputs(model, args.inputs, roots_of(args, args.inputs), draws=args.draws,
                        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress, limit=args.limit,
                        spread=args.spread)
    failed = [r for r in rows if r["error"]]
    for r in failed:
        warn(f"not scored: {r['error'] if r['error'].startswith(r['name']) else r['name'] + ': ' + r['error']}")
    if len(failed) == len(rows):
        raise ValueError(f"nothing could be scored ({len(failed)} input(s) or file(s) failed; see the warnings)")
    if args.out:
        write_score_csv(rows, args.out)
    summary = summarize_rows(rows)
    result = {"inputs": summary, "scored": len(rows) - len(failed), "errors": len(failed), "draws": args.draws,
              "seed": args.seed, "n_bits": model.config.n_bits, "out": str(args.out) if args.out else None}
    if args.json:
        emit(args, {**result, "rows": rows})
        return 0
    if not args.out:
        print("name\tbits_per_dim\tlog_prob_nats\tnote")
        for r in rows:
            note = f"error: {r['error']}" if r["error"] else r["note"]
            print(f"{r['name']}\t{_number(r['bits_per_dim'])}\t{_number(r['log_prob'])}\t{note}")
    for s in summary:
        errors = f", {s['errors']} not scored" if s["errors"] else ""
        if not s["num_images"]:
            print(f"{s['input']}: nothing scored{errors}")
            continue
        se = "" if math.isnan(s["bits_per_dim_se"]) else f" ± {s['bits_per_dim_se']:.4f}"
        outliers = describe_outliers(s["outliers"], s["num_images"], s["bits_per_dim_median"],
                                     s["bits_per_dim_without_outliers"])
        print(f"{s['input']}: {s['num_images']} images, mean bits/dim {s['bits_per_dim']:.4f}{se}{errors}{outliers}")
    if args.out:
        print(f"out: {args.out}")
    return 0


# ----------------------------------------------------------------------------------- ood
def _ood_sets_and_report(args) -> tuple[list[str], Path | None]:
    """The out-of-distribution sets (``--ood``) and the report directory (``--out``), accepting the
    old spellings (``--out SET`` for the sets, ``--report DIR``) with a warning."""
    outs, report = list(args.out or []), getattr(args, "report", None)
    sets = list(args.ood_sets or [])
    if not sets and outs:
        deprecated("ood --out SET", "--ood SET (--out names the report directory)")
        sets, outs = outs, []
    if not sets:
        raise ValueError("name at least one out-of-distribution set: --ood SET (repeatable)")
    if len(outs) > 1 or (outs and report is not None):
        raise ValueError(f"--out is the one report directory; the out-of-distribution sets are --ood SET, got --out "
                         f"{' --out '.join(outs)}")
    return sets, Path(outs[0]) if outs else report


def cmd_ood(args) -> int:
    args.out_sets, args.report = _ood_sets_and_report(args)
    model = load_model(args)
    background = None
    if args.background is not None:
        background = Glow.from_pretrained(args.background, map_location=next(model.parameters()).device)
    specs = [args.in_set, *args.out_sets] + ([args.reference] if args.reference else [])
    report = run_ood(model, args.in_set, args.out_sets, background, args.reference, roots_of(args, specs),
                     typicality_m=args.typicality_m, compressors=args.compressors, limit=args.limit,
                     reference_limit=args.reference_limit, batch_size=args.batch_size, seed=args.seed,
                     draws=args.draws, progress=not args.no_progress, spread=args.spread)
    report.settings.update(checkpoint=str(args.checkpoint),
                           background=str(args.background) if args.background else None)
    result = report.to_json()
    if args.report:
        result["report"] = write_report(report, args.report, title=f"per-image bits/dim under {args.checkpoint}")
    if args.json:
        emit(args, result)
        return 0
    print(markdown_table(report), end="")
    if args.report:
        print(f"report: {result['report']['results']}, {result['report']['table']}, {result['report']['histogram']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("score", help="per-image bits/dim and log p(x) of image files, folders, .npy arrays, "
                                     "dataset splits and synthetic sets")
    add_checkpoint(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=SET_HELP)
    add_scoring(p)
    add_out(p, "one row per image to this CSV file (default: print them)")
    add_deprecated(p, "--csv", "--out", dest="out", type=Path)
    add_json(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("ood", help="out-of-distribution detection: AUROC, AUPR and FPR95 of the likelihood, "
                                   "typicality, input complexity and likelihood-ratio scores")
    add_checkpoint(p)
    p.add_argument("--in", dest="in_set", required=True, metavar="SET", help=f"the in-distribution set: {SET_HELP}")
    p.add_argument("--ood", dest="ood_sets", action="append", metavar="SET",
                   help="an out-of-distribution set (repeatable), spelt as --in")
    p.add_argument("--out", action="append", metavar="DIR",
                   help="write the report (results.json, table.md, histogram.png) into this directory")
    add_deprecated(p, "--report", "--out", dest="report", type=Path)
    p.add_argument("--background", type=Path, help="a background model for the likelihood ratio: the shipped "
                   "fashion-mnist-background, or one of glowflow train --preset fashion-mnist-cpu-background")
    p.add_argument("--reference", metavar="SET", help="the set whose mean bits/dim is the typical value "
                                                      "(default: the training split of --in's dataset)")
    p.add_argument("--reference-limit", type=positive_int, default=REFERENCE_IMAGES, metavar="N",
                   help="use only the first N images of the reference set (evenly spaced with --spread)")
    p.add_argument("--typicality-m", type=int_list, default=[1, 5], help="typicality group sizes M, e.g. 1,5")
    p.add_argument("--compressors", type=compressor_list, default=["png"],
                   help=f"lossless compressors for input complexity: {','.join(COMPRESSORS)}")
    add_scoring(p)
    add_json(p)
    p.set_defaults(func=cmd_ood)
