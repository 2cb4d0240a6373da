"""Restoration with the flow as the prior against the classical methods a user would reach for;
prints JSON.

For each dataset (the 40 held-out AT&T faces with the orl-faces model; Fashion-MNIST test images,
evenly spread over the classes, with the fashion-mnist model) and each task at two or three
severities, the clean test images are degraded (:func:`glowflow.restore.degrade`, seeded) and
restored by

* the flow: :func:`glowflow.restore.restore`, the MAP estimate over latents averaged over
  ``--views`` views (mirrored and shifted, :class:`glowflow.restore.View`; Fashion-MNIST, whose
  shoes all point one way, is not mirrored), its prior weight ``gamma`` chosen per task and
  severity on ``--tune-images`` training images;
* denoising, with ``--faces-denoiser``: the posterior mean by Tweedie's formula
  (:func:`glowflow.restore.denoise`, every view) from that model of noisy faces, at the noise
  levels up to its own;
* denoising: scikit-image's ``denoise_nl_means``, ``denoise_wavelet`` and ``denoise_tv_chambolle``
  and BM3D (the ``bm3d`` wheel, where it installs), each with its parameters chosen on
  ``--tune-images`` training images (never the test ones);
* inpainting: scikit-image's ``inpaint_biharmonic``, and the mean of the observed pixels;
* super-resolution: bicubic and Lanczos upsampling (Pillow);
* compressed sensing: the least-squares solution of least norm, and a sparse one (a small L1
  weight on the image's DCT coefficients, FISTA; the weight chosen on the training images).

Scores: PSNR (dB) and SSIM (the Gaussian-window SSIM of :func:`glowflow.restore.ssim`) against the
clean image, per image, their means and standard errors; per task, the best classical method and
the flow's margin over it.

    .venv/bin/python benchmarks/restore.py --faces orl-faces --faces-data data/orl-faces \\
        --faces-denoiser orl-faces-denoise \\
        --fashion fashion-mnist --fashion-data /usr/share/datasets/fashion-mnist \\
        --out benchmarks/results/restore.json
    .venv/bin/python benchmarks/restore.py --faces orl-faces --faces-data data/orl-faces --quick
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glowflow import Glow
from glowflow import restore as rs
from glowflow.data import get_dataset

try:
    import skimage.restoration as skr
except ImportError:  # the bench extra: pip install glowflow[bench]
    sys.exit("benchmarks/restore.py needs scikit-image: pip install 'glowflow[bench]'")
try:
    import bm3d as _bm3d
except ImportError:
    _bm3d = None

# (task, severity name, operator maker, noise std)
FACE_TASKS = [
    ("denoise", "sigma 0.1", lambda s: rs.Denoise(s), 0.1),
    ("inpaint", "centre 30%", lambda s: rs.Inpaint.centre(s, 0.3), 0.01),
    ("denoise", "sigma 0.05", lambda s: rs.Denoise(s), 0.05),
    ("denoise", "sigma 0.2", lambda s: rs.Denoise(s), 0.2),
    ("inpaint", "eyes", lambda s: rs.Inpaint.region(s, "eyes"), 0.01),
    ("superres", "x2", lambda s: rs.Downsample(s, 2), 0.01),
    ("superres", "x4", lambda s: rs.Downsample(s, 4), 0.01),
    ("cs", "40% of the pixels", lambda s: rs.CompressedSensing(s, 0.4, seed=3), 0.01),
    ("cs", "10% of the pixels", lambda s: rs.CompressedSensing(s, 0.1, seed=3), 0.01),
]
FASHION_TASKS = [t for t in FACE_TASKS if (t[0], t[1]) in {("denoise", "sigma 0.1"), ("inpaint", "centre 30%"),
                                                           ("superres", "x2")}]
TWEEDIE = "flow (posterior mean)"  # a model of noisy images, Tweedie's formula
FLOW_METHODS = ("flow", TWEEDIE)
GAMMAS = {"denoise": (1.0, 1.5, 2.5), "inpaint": (0.1, 0.3, 1.0), "superres": (0.1, 0.3, 1.0),
          "cs": (0.1, 0.3, 1.0)}


# ----------------------------------------------------------------------------------- classical
def _per_image(fn):
    """A numpy function of one [H, W] image -> a function of a [B, 1, H, W] tensor."""
    def run(y, **kw):
        out = [fn(a[0].double().numpy(), **kw) for a in y]
        return torch.tensor(np.stack(out))[:, None].float().clamp(0, 1)
    return run


def _denoisers(sigma):
    grids = {
        "nl_means": (_per_image(lambda a, **k: skr.denoise_nl_means(a, sigma=sigma, fast_mode=True, **k)),
                     [dict(h=h * sigma, patch_size=p, patch_distance=d) for h in (0.6, 0.8, 1.0, 1.2)
                      for p in (3, 5) for d in (5, 7)]),
        "wavelet": (_per_image(lambda a, **k: skr.denoise_wavelet(a, sigma=sigma, rescale_sigma=True, **k)),
                    [dict(method=m, mode=md) for m in ("BayesShrink", "VisuShrink") for md in ("soft", "hard")]),
        "tv_chambolle": (_per_image(skr.denoise_tv_chambolle),
                         [dict(weight=w * sigma) for w in (0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0)]),
    }
    if _bm3d is not None:
        grids["bm3d"] = (_per_image(lambda a, **k: _bm3d.bm3d(a, **k)),
                         [dict(sigma_psd=sigma * f) for f in (0.8, 1.0, 1.2)])
    return grids


def _resize(y, factor, method):
    out = []
    for a in y:
        img = Image.fromarray(a[0].clamp(0, 1).mul(255).numpy().astype(np.float32), mode="F")
        big = img.resize((img.width * factor, img.height * factor), method)
        out.append(np.asarray(big, dtype=np.float32) / 255)
    return torch.tensor(np.stack(out))[:, None].clamp(0, 1)


def _dct_fista(op, y, lam, iterations=300):
    """min_x 0.5 ||Phi x - y||^2 + lam ||DCT(x)||_1 by FISTA on the DCT coefficients."""
    from scipy.fft import dctn, idctn
    phi = op.matrix.double().numpy()
    shape = op.image_shape[1:]
    step = 1.0 / np.linalg.norm(phi, 2) ** 2
    out = []
    for obs in y.double().numpy():
        c = dctn(np.full(shape, 0.5), norm="ortho")
        v, t = c.copy(), 1.0
        for _ in range(iterations):
            x = idctn(v, norm="ortho").ravel()
            grad = dctn((phi.T @ (phi @ x - obs)).reshape(shape), norm="ortho")
            w = v - step * grad
            c_new = np.sign(w) * np.maximum(np.abs(w) - step * lam, 0)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            v, c, t = c_new + (t - 1) / t_new * (c_new - c), c_new, t_new
        out.append(idctn(c, norm="ortho"))
    return torch.tensor(np.stack(out))[:, None].float().clamp(0, 1)


def classical(task, op, sigma):
    """name -> (function of the observations, candidate settings to tune over)."""
    if task == "denoise":
        return _denoisers(sigma)
    if task == "inpaint":
        holes = (op.mask[0] == 0).numpy()
        return {"biharmonic": (_per_image(lambda a: skr.inpaint_biharmonic(a, holes)), [{}]),
                "observed mean": (lambda y: op.naive(y), [{}])}
    if task == "superres":
        return {"bicubic": (lambda y: _resize(y, op.factor, Image.Resampling.BICUBIC), [{}]),
                "lanczos": (lambda y: _resize(y, op.factor, Image.Resampling.LANCZOS), [{}])}
    if task == "cs":
        return {"least squares": (lambda y: op.naive(y), [{}]),
                "dct sparsity": (lambda y, lam: _dct_fista(op, y, lam), [dict(lam=v) for v in (0.003, 0.01, 0.03)])}
    raise ValueError(task)


# ----------------------------------------------------------------------------------- scoring
def scores(x, ref):
    p, s = rs.psnr(x, ref).numpy(), rs.ssim(x, ref).numpy()

    def se(v):
        return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"psnr_db": round(float(p.mean()), 3), "psnr_se": round(se(p), 3),
            "ssim": round(float(s.mean()), 4), "ssim_se": round(se(s), 4)}


def flow_restore(model, y, op, sigma, gamma, views, mirror, batch):
    out = []
    for i in range(0, len(y), batch):
        r = rs.restore(model, y[i:i + batch], op, sigma, gamma=gamma, steps=rs.DEFAULT_STEPS, views=views,
                       mirror=mirror, init="zero")
        out.append(r.images)
    return torch.cat(out)


def run_dataset(name, model, test, tune, tasks, args, mirror, log, denoiser=None):
    """Each task's row: every method's scores on ``test``, the settings each was tuned to, the best
    of the flow's estimates against the best classical one. ``denoiser``: a model of noisy images
    for the denoising rows (Tweedie's posterior mean)."""
    results = []
    shape = tuple(model.config.image_shape)
    for k, (task, severity, make, sigma) in enumerate(tasks):
        if args.tasks and task not in args.tasks and f"{task}:{severity}" not in args.tasks:
            continue  # skipped rows keep their place: each row's noise and mask come from its index
        t0 = time.perf_counter()
        op = make(shape)
        y_test, y_tune = rs.degrade(test, op, sigma, seed=100 + k), rs.degrade(tune, op, sigma, seed=200 + k)
        row = {"task": task, "severity": severity, "noise_std": sigma, "methods": {}, "settings": {}}
        for method, (fn, grid) in classical(task, op, sigma).items():
            best = grid[0]
            if len(grid) > 1:
                best = max(grid, key=lambda kw: float(rs.psnr(fn(y_tune, **kw), tune).mean()))
            row["methods"][method] = scores(fn(y_test, **best), test)
            row["settings"][method] = best
        gammas = GAMMAS[task]
        gamma = max(gammas, key=lambda g: float(rs.psnr(
            flow_restore(model, y_tune[:args.tune_flow_images], op, sigma, g, 1, mirror, args.batch_size),
            tune[:args.tune_flow_images]).mean()))
        restored = flow_restore(model, y_test, op, sigma, gamma, args.views, mirror, args.batch_size)
        row["methods"]["flow"] = scores(restored, test)
        row["settings"]["flow"] = {"gamma": gamma, "views": args.views, "mirror": mirror, "steps": rs.DEFAULT_STEPS}
        if task == "denoise" and denoiser is not None and sigma <= denoiser.config.noise_std:
            tweedie = torch.cat([rs.denoise(denoiser, y_test[i:i + args.batch_size], sigma, mirror=mirror, seed=k)
                                 for i in range(0, len(y_test), args.batch_size)])
            row["methods"][TWEEDIE] = scores(tweedie, test)
            row["settings"][TWEEDIE] = {"model": args.faces_denoiser, "model_noise_std": denoiser.config.noise_std,
                                        "shift": rs.DEFAULT_DENOISE_SHIFT, "mirror": mirror}
            if row["methods"][TWEEDIE]["psnr_db"] > row["methods"]["flow"]["psnr_db"]:
                restored = tweedie
        flows = [m for m in row["methods"] if m in FLOW_METHODS]
        classical_names = [m for m in row["methods"] if m not in FLOW_METHODS]
        best_flow = max(flows, key=lambda m: row["methods"][m]["psnr_db"])
        best_classical = max(classical_names, key=lambda m: row["methods"][m]["psnr_db"])
        row["best_flow"], row["best_classical"] = best_flow, best_classical
        row["flow_margin_db"] = round(row["methods"][best_flow]["psnr_db"] - row["methods"][best_classical]["psnr_db"], 3)
        row["flow_margin_ssim"] = round(row["methods"][best_flow]["ssim"] - row["methods"][best_classical]["ssim"], 4)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        if args.pictures:
            _picture(args.pictures / f"{name}-{task}-{_slug(severity)}.png", op, y_test,
                     restored, row, test, fn_best=classical(task, op, sigma)[best_classical],
                     best_kw=row["settings"][best_classical])
        log(f"{name} {task} {severity}: {best_flow} {row['methods'][best_flow]['psnr_db']:.2f} dB (gamma {gamma}), "
            f"{best_classical} {row['methods'][best_classical]['psnr_db']:.2f} dB, {row['seconds']} s")
    return results


def _merged(old: dict, new: dict) -> dict:
    """``old`` (a whole run's report) with the rows ``new`` (a --tasks run) measured again replaced,
    each replaced row marked with the command that measured it; the rest as they were."""
    for name, part in new["datasets"].items():
        if name not in old["datasets"]:
            old["datasets"][name] = part
            continue
        rows = old["datasets"][name]["tasks"]
        for row in part["tasks"]:
            row["command"] = new["command"]
            where = [i for i, r in enumerate(rows) if (r["task"], r["severity"]) == (row["task"], row["severity"])]
            if where:
                rows[where[0]] = row
            else:
                rows.append(row)
        old["datasets"][name].update({k: v for k, v in part.items() if k != "tasks"})
    return old


def _slug(severity: str) -> str:
    """A severity's part of a picture's name: its first number ("40% of the pixels" -> "40"), or the
    name itself ("eyes")."""
    words = severity.split()
    return next((w for w in words if any(ch.isdigit() for ch in w)), words[-1]).rstrip("%")


def _picture(path, op, y, restored, row, test, fn_best, best_kw, n=6):
    """Rows: observation | best classical | flow | original, for the first n test images."""
    from glowflow.images import save_grid
    fn, _ = fn_best
    grid = torch.stack([op.picture(y[:n]), fn(y[:n], **best_kw), restored[:n], test[:n]], 1).flatten(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, path, nrow=4, scale=4 if test.shape[-1] >= 64 else 6)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", help="an orl-faces model (a name or a run)")
    p.add_argument("--faces-data", default="data/orl-faces")
    p.add_argument("--faces-denoiser", help="a model of noisy faces (orl-faces-denoise): the denoising rows also "
                                            "get its posterior mean")
    p.add_argument("--fashion", help="a Fashion-MNIST model (a name or a run)")
    p.add_argument("--fashion-data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--limit", type=int, default=40, help="test images per dataset")
    p.add_argument("--tune-images", type=int, default=8, help="training images the classical settings are chosen on")
    p.add_argument("--tune-flow-images", type=int, default=4, help="of those, the ones the flow's gamma is chosen on")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a smoke test: 4 test images, one severity per task")
    p.add_argument("--tasks", nargs="+", metavar="TASK[:SEVERITY]",
                   help="only these rows, e.g. denoise or 'denoise:sigma 0.1' (default: all); with an --out "
                        "that exists, its other rows are kept and these replaced")
    p.add_argument("--pictures", type=Path, help="write a picture per task into this folder")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    known = {name for t in FACE_TASKS for name in (t[0], f"{t[0]}:{t[1]}")}
    if args.tasks and not set(args.tasks) <= known:
        p.error(f"--tasks: unknown {sorted(set(args.tasks) - known)}; known: {sorted(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.limit, args.tune_images, args.tune_flow_images = 4, 4, 2
    torch.manual_seed(0)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    report = {"benchmark": "restore", "command": "python benchmarks/restore.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "bm3d": _bm3d is not None, "datasets": {}}
    t0 = time.perf_counter()
    for name, model_id, root, tasks, mirror in [("orl-faces", args.faces, args.faces_data, FACE_TASKS, True),
                                                ("fashion-mnist", args.fashion, args.fashion_data, FASHION_TASKS, False)]:
        if not model_id:
            continue
        model = Glow.from_pretrained(model_id).eval()
        c, h, _ = model.config.image_shape
        test_set = get_dataset(name, root, "test", image_size=h, channels=c)
        train_set = get_dataset(name, root, "train", image_size=h, channels=c)
        pick = torch.linspace(0, len(test_set) - 1, args.limit).round().long()  # spread over the classes
        tune_pick = torch.linspace(0, len(train_set) - 1, args.tune_images).round().long()
        test = test_set.batch(pick).float() / 255
        tune = train_set.batch(tune_pick).float() / 255
        if args.quick:
            seen = set()
            tasks = [t for t in tasks if not (t[0] in seen or seen.add(t[0]))]
        denoiser = (Glow.from_pretrained(args.faces_denoiser).eval()
                    if name == "orl-faces" and args.faces_denoiser else None)
        report["datasets"][name] = {"model": model_id, "test_images": len(test), "tune_images": len(tune),
                                    "tasks": run_dataset(name, model, test, tune, tasks, args, mirror, log, denoiser)}
        if denoiser is not None:
            report["datasets"][name]["denoiser"] = args.faces_denoiser
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.tasks and args.out and args.out.exists():
        report = _merged(json.loads(args.out.read_text()), report)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
