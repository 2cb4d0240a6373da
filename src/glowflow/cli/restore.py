"""``glowflow restore``: denoise, inpaint, super-resolve, deblur or compressed-sense images with the
flow as the prior (:mod:`glowflow.restore`); with a model of noisy images (orl-faces-denoise), the
posterior mean of a denoising by Tweedie's formula (:func:`glowflow.restore.denoise`).

  glowflow restore orl-faces noisy.png --task denoise --noise 0.1 --out restored/
  glowflow restore orl-faces-denoise noisy.png --task denoise --out restored/
  glowflow restore orl-faces face.png --task inpaint --mask hole.png --out restored/
  glowflow restore orl-faces small.png --task superres --factor 2 --out restored/
  glowflow restore orl-faces face.png --task inpaint --region eyes --degrade --out restored/
  glowflow restore orl-faces face.png --task cs --ratio 0.4 --degrade --out restored/

Each IMAGE is an observation (a noisy, masked, small or blurred image) unless ``--degrade`` says it
is a clean original: then glowflow makes the observation itself (the operator, then noise of
``--noise`` drawn from ``--seed``) and reports PSNR and SSIM of the restoration against it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import restore as rs
from ..images import load_image, save_grid
from ..progress import Progress
from .common import (add_batch_size, add_checkpoint, add_json, add_no_progress, add_out, add_seed, emit,
                     float_between, int_between, load_model, positive_int, resolve_positionals)

SCALE_DEFAULT = 4
DEFAULT_VIEWS, DEFAULT_SAMPLES = 2, 16  # the MAP's (a model of noisy images: every view, no samples)


def _operator(args, shape) -> rs.Operator:
    """The task's operator from the flags, refusing flags of another task."""
    task = args.task
    if task != "inpaint" and (args.mask is not None or args.region is not None):
        raise ValueError("--mask and --region are for --task inpaint")
    if task == "inpaint":
        if (args.mask is None) == (args.region is None):
            raise ValueError("--task inpaint needs the missing pixels: --mask PNG (white where missing) or "
                             f"--region {{{','.join(rs.REGIONS)}}}")
        if args.mask is not None:
            mask = load_image(args.mask, (1, *shape[1:]))[0]
            return rs.Inpaint(shape, (mask < 0.5).float())
        return rs.Inpaint.region(shape, args.region, args.fraction, args.seed)
    if task == "superres":
        return rs.Downsample(shape, args.factor)
    if task == "deblur":
        return rs.Blur(shape, args.blur)
    if task == "cs":
        if not args.degrade:
            raise ValueError("compressed-sensing measurements are numbers, not an image: pass --degrade to "
                             "measure each IMAGE (a clean original) and restore it from the measurements")
        return rs.CompressedSensing(shape, args.ratio, args.seed)
    return rs.Denoise(shape)


def _observations(args, model, op):
    """Observations ``[N, ...]``, the originals (``--degrade``) or None, and pictures of the
    observations at the model's size."""
    shape = model.config.image_shape
    if args.degrade:
        originals = torch.stack([load_image(p, shape) for p in args.images])
        y = rs.degrade(originals, op, args.noise, args.seed)
    else:
        originals = None
        observed = op.observation_shape()
        y = torch.stack([load_image(p, observed) for p in args.images])
    return y, originals, op.picture(y)


def cmd_restore(args) -> int:
    resolve_positionals(args)
    model = load_model(args)
    tweedie = bool(model.config.noise_std)  # a model of noisy images: the posterior mean by Tweedie's formula
    if args.noise is None:
        args.noise = model.config.noise_std if tweedie else rs.DEFAULT_NOISE["denoise" if args.task == "denoise"
                                                                              else "other"]
    if tweedie and args.task != "denoise":
        raise ValueError(f"this model is of noisy images (noise_std {model.config.noise_std}): it denoises only; "
                         f"for --task {args.task} use a model of clean images")
    if tweedie and args.samples:
        raise ValueError("--samples: posterior samples need a model of clean images; this one gives the "
                         "posterior mean directly")
    if tweedie and args.views is not None:
        raise ValueError("--views: a model of noisy images averages over the image moved by up to --shift pixels "
                         "instead")
    if not tweedie and args.shift is not None:
        raise ValueError("--shift: only the posterior mean of a model of noisy images averages over moves; "
                         "the MAP estimate takes --views")
    if args.views is None:
        args.views = DEFAULT_VIEWS
    if args.shift is None:
        args.shift = rs.DEFAULT_DENOISE_SHIFT
    if args.samples is None:
        args.samples = 0 if tweedie else DEFAULT_SAMPLES
    op = _operator(args, model.config.image_shape)
    y, originals, pictures = _observations(args, model, op)
    n = y.shape[0]
    batches = [slice(i, min(i + args.batch_size, n)) for i in range(0, n, args.batch_size)]
    work = 1 if tweedie else args.views * args.steps + (rs.posterior_steps(args.samples) if args.samples else 0)
    bar = Progress(len(batches) * work, "restore", enabled=not args.no_progress, unit="step")
    restored, spread = [], []
    with bar:
        for k, part in enumerate(batches):
            done = k * work

            def progress(step, total, *_):
                bar.update(done + step - bar.n)

            if tweedie:
                restored.append(rs.denoise(model, y[part], args.noise, shift=args.shift, mirror=not args.no_mirror,
                                           seed=args.seed).cpu())
                progress(1, 1)
                continue
            result = rs.restore(model, y[part], op, args.noise, gamma=args.gamma, prior=args.prior, steps=args.steps,
                                optimizer=args.optimizer, init=args.init, views=args.views,
                                mirror=not args.no_mirror, progress=progress)
            restored.append(result.images.cpu())
            if args.samples:
                done += args.views * args.steps
                post = rs.posterior_samples(model, y[part], op, args.noise, result.latents,
                                            num_samples=args.samples, seed=args.seed, progress=progress)
                spread.append(post.std.cpu())
    restored = torch.cat(restored)
    args.out.mkdir(parents=True, exist_ok=True)
    columns = [pictures, restored]
    std_max = None
    if spread:
        std = torch.cat(spread)
        std_max = float(std.max())
        columns.append(std / max(std_max, 1e-8))  # brightest: the least certain pixel of all
    if originals is not None:
        columns.append(originals)
    rows = []
    for i, path in enumerate(args.images):
        name = Path(path).stem
        save_grid(restored[i:i + 1], args.out / f"{name}-restored.png", padding=0)
        save_grid(pictures[i:i + 1], args.out / f"{name}-observed.png", padding=0)
        row = {"image": str(path), "restored": str(args.out / f"{name}-restored.png")}
        if originals is not None:
            row["psnr_db"] = round(float(rs.psnr(restored[i:i + 1], originals[i:i + 1])), 3)
            row["observed_psnr_db"] = round(float(rs.psnr(pictures[i:i + 1], originals[i:i + 1])), 3)
            if min(model.config.image_shape[1:]) >= rs.SSIM_WINDOW:
                row["ssim"] = round(float(rs.ssim(restored[i:i + 1], originals[i:i + 1])), 4)
        if spread:
            row["mean_std"] = round(float(std[i].mean()), 5)
        rows.append(row)
    strip = torch.stack(columns, 1).flatten(0, 1)
    save_grid(strip, args.out / "strip.png", nrow=len(columns), scale=args.scale)
    heads = ["observation", "restored"] + (["uncertainty"] if spread else []) + (["original"] if originals is not None else [])
    result = {"task": args.task, "out": str(args.out), "strip": str(args.out / "strip.png"), "columns": heads,
              "noise": args.noise, "method": "posterior mean (Tweedie)" if tweedie else "MAP",
              "images": rows}
    if tweedie:
        result.update(shift=args.shift, mirror=not args.no_mirror)
    else:
        result.update(views=args.views, gamma=args.gamma, steps=args.steps)
    if std_max is not None:
        result["uncertainty_white_is_std"] = round(std_max, 5)
    if originals is not None:
        result["mean_psnr_db"] = round(sum(r["psnr_db"] for r in rows) / n, 3)
        if "ssim" in rows[0]:
            result["mean_ssim"] = round(sum(r["ssim"] for r in rows) / n, 4)
    if args.json:
        emit(args, result)
    else:
        for r in rows:
            scores = f"  PSNR {r['psnr_db']:.2f} dB (observed {r['observed_psnr_db']:.2f})" if "psnr_db" in r else ""
            scores += f"  SSIM {r['ssim']:.3f}" if "ssim" in r else ""
            print(f"{r['image']} -> {r['restored']}{scores}")
        if "mean_psnr_db" in result:
            print(f"mean PSNR {result['mean_psnr_db']:.2f} dB" +
                  (f", SSIM {result['mean_ssim']:.3f}" if "mean_ssim" in result else ""))
        print(f"strip ({' | '.join(heads)}): {args.out / 'strip.png'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("restore", help="denoise, inpaint, super-resolve, deblur or compressed-sense images with "
                                       "the flow as the prior")
    add_checkpoint(p, "IMAGE...")
    p.add_argument("--task", required=True, choices=list(rs.OPERATORS),
                   help="denoise: IMAGE is noisy; inpaint: pixels are missing (--mask or --region); superres: "
                        "IMAGE is small (1/--factor of the model's size); deblur: IMAGE is blurred (--blur); cs: "
                        "random measurements of the image (--ratio; needs --degrade)")
    p.add_argument("--degrade", action="store_true",
                   help="IMAGE is a clean original: make the observation from it (the task's operator, then noise "
                        "of --noise drawn from --seed), restore, and report PSNR and SSIM against it")
    p.add_argument("--noise", type=float_between(0, 1, "a noise level in [0, 1]"),
                   help="standard deviation of the observation's Gaussian noise, for images in [0, 1] (default: "
                        f"{rs.DEFAULT_NOISE['denoise']} for denoise, {rs.DEFAULT_NOISE['other']} for the other tasks; a model "
                        "of noisy images: its own noise_std)")
    p.add_argument("--mask", type=Path, help="inpaint: a picture of the model's size, white where pixels are missing")
    p.add_argument("--region", choices=rs.REGIONS,
                   help="inpaint: the missing pixels by name (eyes and mouth for centred upright faces)")
    p.add_argument("--fraction", type=float_between(0, 0.99, "a fraction in (0, 0.99]", open_low=True), default=0.3,
                   help="inpaint --region centre or random: the share of pixels missing")
    p.add_argument("--factor", type=int_between(2, 16, "an integer 2..16"), default=2,
                   help="superres: how many times smaller the observation is")
    p.add_argument("--blur", type=float_between(0, 16, "a blur in (0, 16] pixels", open_low=True), default=1.0,
                   help="deblur: standard deviation of the Gaussian blur in pixels")
    p.add_argument("--ratio", type=float_between(0, 1, "a ratio in (0, 1]", open_low=True), default=0.4,
                   help="cs: measurements as a share of the pixels")
    p.add_argument("--gamma", type=float_between(0, 1e6, "a number >= 0"), default=rs.DEFAULT_GAMMA,
                   help="weight of the prior ||z||^2/2 against the data misfit (1: the posterior's mode over latents)")
    p.add_argument("--prior", choices=rs.PRIORS, default="norm",
                   help="norm: gamma ||z||^2/2; likelihood: gamma times the image's exact -log p(x)")
    p.add_argument("--iterations", dest="steps", type=positive_int, default=rs.DEFAULT_STEPS,
                   help="optimiser steps (per view)")
    p.add_argument("--views", type=int_between(1, len(rs.VIEWS), f"an integer 1..{len(rs.VIEWS)}"),
                   help="restore the image as it is and mirrored / shifted, and average (each view costs --iterations; "
                        f"docs/restore.md; default {DEFAULT_VIEWS}; not with a model of noisy images: --shift)")
    p.add_argument("--shift", type=int_between(0, 16, "an integer 0..16"),
                   help="with a model of noisy images: average the posterior mean over the image moved by up to "
                        f"this many pixels each way, and mirrored (default {rs.DEFAULT_DENOISE_SHIFT})")
    p.add_argument("--no-mirror", action="store_true",
                   help="views are shifts only: for images that are not left-right symmetric (shoes pointing one way)")
    p.add_argument("--optimizer", choices=rs.OPTIMIZERS, default="lbfgs", help="the MAP solver")
    p.add_argument("--init", choices=rs.INITS, default=rs.DEFAULT_INIT,
                   help="start from the latent of the naive estimate, or from the mean latent")
    p.add_argument("--samples", type=int_between(0, 1000, "an integer 0..1000"),
                   help=f"posterior samples (Langevin) for the uncertainty column; 0 leaves it out (default {DEFAULT_SAMPLES}; "
                        "none with a model of noisy images)")
    add_seed(p, "the noise --degrade adds, the random mask or measurements, and the posterior samples")
    add_batch_size(p, 16, "images restored together (bounds memory)")
    p.add_argument("--scale", type=int_between(1, 16, "an integer 1..16"), default=SCALE_DEFAULT,
                   help="enlarge each image of the strip this many times (nearest neighbour)")
    add_out(p, "the restored images (NAME-restored.png), the observations (NAME-observed.png) and strip.png "
               "into this folder", required=True)
    add_no_progress(p)
    add_json(p)
    p.set_defaults(func=cmd_restore)
