"""Latent edits judged by programs that did not make them; prints JSON.

Class transfer on Fashion-MNIST. A small CNN (the judge) is trained here on the training set; it
never builds a direction. For each pair of classes (A -> B), each direction estimator
(:mod:`glowflow.estimators`), each N (labelled training images per side, drawn ``--draws``
times) and each alpha, the direction is estimated from N latents of A and N of B and applied to
``--sources`` held-out test images of A, decoded as ``glowflow.editing.manipulate`` decodes. Per
cell: **valid** (the failure gate, :func:`glowflow.editing.failed_decodes`, passes), **success**
(valid and judged B at alpha > 0; valid and still judged A at alpha < 0), **diversity** (mean
pairwise distance between the valid edits over that between their sources: near 0 would be every
source turned into one image) and **distance** (mean absolute pixel change from the reconstruction).

Pixel attributes on Fashion-MNIST: attributes a program measures from the pixels, within one class
(ink: mean intensity of T-shirts; width: columns holding ink, of dresses). Training images of the
class in its top quarter by the measure are the positives, the bottom quarter the negatives; the
edit's **effect** on held-out images of the class is the change of the measure over the gap between
the two quarters' means (1: the edit moved an image by that gap), and **kept**: the judge still
says the same class.

Faces (``--faces RUN``): the hand-labelled attributes of the AT&T faces, directions from the
training photos (photos 1-9 of each person, every estimator, the paired one by person), applied
to the 40 held-out photos. **valid** as above; **identity kept**: the nearest training photo (in
pixels) of the edit is still of the same person; **attribute**: a logistic regression trained on
the training photos' pixels for that attribute (its held-out accuracy reported) says the edit has
it at alpha 1 and has not at alpha -1.

Ablation: at N = 30, alpha 1, the mean estimator, with each part of the decoding taken away.

    .venv/bin/python benchmarks/edits.py runs/fashion-mnist --data /usr/share/datasets/fashion-mnist \\
        --faces runs/orl-faces-64 --faces-data data/orl-faces --out benchmarks/results/edits.json
    .venv/bin/python benchmarks/edits.py RUN --quick        # a smoke test: one pair, N 10, one draw
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import glowflow  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from glowflow import Glow, editing
from glowflow.data.attributes import parse_attribute_file
from glowflow.data import get_dataset
from glowflow.estimators import ESTIMATORS, estimator
from glowflow.io import atomic_write_text, json_text
from glowflow.numerics import to_unit

PAIRS = (("Ankle boot", "Sneaker"), ("Trouser", "Dress"), ("Sandal", "Sneaker"))
PIXEL_ATTRIBUTES = (("ink", "T-shirt/top"), ("width", "Dress"))
FACE_ATTRIBUTES = ("glasses", "smiling", "beard_or_moustache")


# ------------------------------------------------------------------------------------ judges
class Judge(nn.Module):
    """Two 3x3 convolutions with pooling and two linear layers: ~90% on Fashion-MNIST test."""

    def __init__(self, classes: int, channels: int = 1, side: int = 28):
        super().__init__()
        self.c1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (side // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train_judge(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> Judge:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Judge(int(y.max()) + 1, x.shape[1], x.shape[-1])
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 128):
                idx = order[i:i + 128]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


def predict(net, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(x[i:i + 1000].float()).argmax(1) for i in range(0, len(x), 1000)])


def logistic_judge(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2):
    """A logistic regression on pixels (``y`` in {0, 1}): returns ``p(x) -> [N]`` probabilities."""
    feats = x.flatten(1).double()
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-3)
    f = (feats - mean) / std
    w = torch.zeros(f.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")
    target = y.double()

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(f @ w + b, target) + l2 * w.pow(2).sum() / len(f)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda images: torch.sigmoid(((images.flatten(1).double() - mean) / std) @ w + b)


# ------------------------------------------------------------------------------------ helpers
def encode(model, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.encode(x[i:i + 500]) for i in range(0, len(x), 500)])


def level_sizes(model) -> list[int]:
    return [math.prod(s) for s in model.latent_shapes]


def mean_pairwise(v: torch.Tensor) -> float:
    v = v.flatten(1).double()
    n = len(v)
    return float(torch.cdist(v, v).sum() / (n * (n - 1))) if n > 1 else float("nan")


def edit(model, z0, x0, direction, alpha) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded edits of the sources and a bool mask of the valid ones."""
    images, failed = editing.decode_latents(model, editing.edited_latents(model, z0, direction, alpha), source=x0)
    valid = torch.ones(len(images), dtype=torch.bool)
    valid[failed] = False
    return images, valid


def mean_of(rows: list[dict], skip=()) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k not in (*skip, "draw")]
    out = {}
    for k in keys:
        values = [r[k] for r in rows if r[k] == r[k]]
        out[k] = round(sum(values) / len(values), 4) if values else None
    return out


def timed(log):
    @contextlib.contextmanager
    def section(name):
        t0 = time.perf_counter()
        yield
        log(f"{name}: {time.perf_counter() - t0:.0f} s")
    return section


# ------------------------------------------------------------------------------------ class transfer
def class_transfer(model, judge, train, test, args, estimators, log) -> list[dict]:
    names = list(train.class_names)
    g = torch.Generator().manual_seed(args.seed)
    needed = sorted({names.index(c) for pair in PAIRS[:args.pairs] for c in pair})
    pools = {}
    for k in needed:  # the training latents a direction may draw from: up to max(N) per class
        idx = (train.labels == k).nonzero().flatten()[:max(args.n)]
        pools[k] = encode(model, to_unit(train.batch(idx)))
    rows = []
    for a_name, b_name in PAIRS[:args.pairs]:
        a, b = names.index(a_name), names.index(b_name)
        src = (test.labels == a).nonzero().flatten()[:args.sources]
        x0 = to_unit(test.batch(src))
        z0, rec = encode(model, x0), editing.reconstruct(model, x0)
        source_spread = mean_pairwise(x0)
        for n in args.n:
            for draw in range(args.draws if n < len(pools[a]) else 1):
                pa = pools[a][torch.randperm(len(pools[a]), generator=g)[:n]]
                pb = pools[b][torch.randperm(len(pools[b]), generator=g)[:n]]
                for name in estimators:
                    d = estimator(name).direction(pb, pa, level_sizes(model))
                    for alpha in args.alphas:
                        images, valid = edit(model, z0, x0, d, alpha)
                        judged = predict(judge, images)
                        target = b if alpha > 0 else a
                        ok = images[valid]
                        rows.append({"pair": f"{a_name} -> {b_name}", "estimator": name, "n": n, "draw": draw,
                                     "alpha": alpha, "valid": float(valid.float().mean()),
                                     "success": float((valid & (judged == target)).float().mean()),
                                     "diversity": mean_pairwise(ok) / source_spread if len(ok) > 1 else float("nan"),
                                     "distance": float((images - rec).abs().mean())})
        log(f"class transfer {a_name} -> {b_name} done")
    return rows


def summarize(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    cells = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [{**dict(zip(keys, key)), **mean_of(group, keys), "cells": len(group)} for key, group in cells.items()]


# ------------------------------------------------------------------------------------ pixel attributes
def measure(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "ink":
        return x.flatten(1).mean(1)
    if name == "width":  # columns holding any pixel brighter than 0.2
        return (x.amax(dim=(1, 2)) > 0.2).float().sum(1)
    raise ValueError(name)


def pixel_attributes(model, judge, train, test, args, estimators, log) -> list[dict]:
    names = list(train.class_names)
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for attribute, class_name in PIXEL_ATTRIBUTES:
        k = names.index(class_name)
        xt = to_unit(train.batch((train.labels == k).nonzero().flatten()))
        m = measure(attribute, xt)
        lo, hi = m.quantile(0.25), m.quantile(0.75)
        pos_pool, neg_pool = xt[m >= hi], xt[m <= lo]
        gap = float(measure(attribute, pos_pool).mean() - measure(attribute, neg_pool).mean())
        zp_all, zn_all = encode(model, pos_pool), encode(model, neg_pool)
        x0 = to_unit(test.batch((test.labels == k).nonzero().flatten()[:args.sources]))
        z0, rec = encode(model, x0), editing.reconstruct(model, x0)
        for n in [n for n in args.n if n <= min(len(zp_all), len(zn_all))]:
            for draw in range(args.draws):
                zp = zp_all[torch.randperm(len(zp_all), generator=g)[:n]]
                zn = zn_all[torch.randperm(len(zn_all), generator=g)[:n]]
                for name in estimators:
                    d = estimator(name).direction(zp, zn, level_sizes(model))
                    for alpha in args.alphas:
                        images, valid = edit(model, z0, x0, d, alpha)
                        change = (measure(attribute, images) - measure(attribute, rec))[valid]
                        judged = predict(judge, images)
                        rows.append({"attribute": f"{attribute} of {class_name}", "estimator": name, "n": n,
                                     "draw": draw, "alpha": alpha, "valid": float(valid.float().mean()),
                                     "effect": float(change.mean() / gap) if len(change) else float("nan"),
                                     "kept": float((valid & (judged == k)).float().mean())})
        log(f"pixel attribute {attribute} of {class_name} done")
    return rows


# ------------------------------------------------------------------------------------ faces
def face_estimators():
    """Every estimator; the coarse one with its one and its two coarsest levels (the face model has four)."""
    for name in ESTIMATORS:
        if name == "coarse":
            yield "coarse", estimator("coarse", levels=1)
            yield "coarse:2", estimator("coarse", levels=2)
        else:
            yield name, estimator(name)


def faces(run, root, args, log) -> dict:
    from glowflow.data.orl import ATTRIBUTES_CSV

    model = Glow.from_pretrained(run)
    c, h, _ = model.config.image_shape
    train = get_dataset("orl-faces", root, "train", image_size=h, channels=c)
    test = get_dataset("orl-faces", root, "test", image_size=h, channels=c)
    table = parse_attribute_file(ATTRIBUTES_CSV)
    row_of = {f: i for i, f in enumerate(table.filenames)}
    xt, xs = to_unit(train.batch(slice(0, len(train)))), to_unit(test.batch(slice(0, len(test))))
    zt, zs = encode(model, xt), encode(model, xs)
    values_train = table.values[[row_of[f] for f in train.filenames]]
    values_test = table.values[[row_of[f] for f in test.filenames]]
    person_train, person_test = train.labels, test.labels
    out = {"bits_per_dim_note": "5-bit", "attributes": {}}
    for attribute in FACE_ATTRIBUTES:
        col = table.names.index(attribute)
        vt, vs = values_train[:, col], values_test[:, col]
        known = vt != 0
        p_attr = logistic_judge(xt[known], (vt[known] > 0).long())
        held = vs != 0
        judge_accuracy = float(((p_attr(xs[held]) > 0.5) == (vs[held] > 0)).float().mean())
        pos, neg = vt > 0, vt < 0
        cells = []
        for name, est in face_estimators():
            try:
                d = est.direction(zt[pos], zt[neg], level_sizes(model), person_train[pos], person_train[neg])
            except ValueError as e:  # paired, where nobody is photographed both ways
                cells.append({"estimator": name, "not_applicable": str(e)})
                continue
            for alpha in (-1.0, -0.5, 0.5, 1.0):
                images, valid = edit(model, zs, xs, d, alpha)
                nearest = torch.cdist(images.flatten(1).double(), xt.flatten(1).double()).argmin(1)
                same = person_train[nearest] == person_test
                has = p_attr(images) > 0.5
                wanted = has if alpha > 0 else ~has
                cells.append({"estimator": name, "alpha": alpha, "valid": float(valid.float().mean()),
                              "identity_kept": float((valid & same).float().mean()),
                              "attribute": float((valid & wanted).float().mean())})
        out["attributes"][attribute] = {"judge_held_out_accuracy": round(judge_accuracy, 3),
                                        "positives": int(pos.sum()), "negatives": int(neg.sum()), "cells": cells}
        log(f"faces {attribute} done")
    return out


# ------------------------------------------------------------------------------------ ablation
def ablation(model, judge, train, test, args, log) -> list[dict]:
    """Mean estimator, N = 30, alpha 1: the default decoding, then with each part taken away."""
    names = list(train.class_names)
    variants = {"default": {}, "image values encoded as they are (no bin centre)": {"quantized": False},
                "no fine-detail share (EDIT_DETAIL 1)": {"detail": 1.0},
                "no level norms, no detail share, no floor (the paper's formula)": {"stable": False}}
    rows = []
    g = torch.Generator().manual_seed(args.seed + 2)
    for label, v in variants.items():
        saved = editing.EDIT_DETAIL
        editing.EDIT_DETAIL = v.get("detail", saved)
        try:
            for a_name, b_name in PAIRS[:args.pairs]:
                a, b = names.index(a_name), names.index(b_name)
                quantized = v.get("quantized", True)
                enc = lambda x: torch.cat([model.encode(x[i:i + 500], quantized=quantized)  # noqa: E731
                                           for i in range(0, len(x), 500)])
                x0 = to_unit(test.batch((test.labels == a).nonzero().flatten()[:args.sources]))
                z0 = enc(x0)
                for draw in range(args.draws):
                    ia = (train.labels == a).nonzero().flatten()
                    ib = (train.labels == b).nonzero().flatten()
                    za = enc(to_unit(train.batch(ia[torch.randperm(len(ia), generator=g)[:30]])))
                    zb = enc(to_unit(train.batch(ib[torch.randperm(len(ib), generator=g)[:30]])))
                    d = zb.mean(0) - za.mean(0)
                    stable = v.get("stable", True)
                    images, failed = editing.decode_latents(model, editing.edited_latents(model, z0, d, 1.0, stable),
                                                           stable=stable, source=x0)
                    valid = torch.ones(len(images), dtype=torch.bool)
                    valid[failed] = False
                    rows.append({"variant": label, "pair": f"{a_name} -> {b_name}",
                                 "valid": float(valid.float().mean()),
                                 "success": float((valid & (predict(judge, images) == b)).float().mean())})
        finally:
            editing.EDIT_DETAIL = saved
    log("ablation done")
    return summarize(rows, ("variant",))


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a Fashion-MNIST run (make run's)")
    p.add_argument("--data", help="Fashion-MNIST folder (default: the run's)")
    p.add_argument("--n", default="10,30,100,1000", help="labelled images per side (comma-separated)")
    p.add_argument("--alphas", default="-1,-0.5,0.5,1", help="comma-separated")
    p.add_argument("--draws", type=int, default=3, help="draws of the N labelled images per cell")
    p.add_argument("--sources", type=int, default=50, help="held-out images edited per pair")
    p.add_argument("--pairs", type=int, default=len(PAIRS), help=f"how many of the {len(PAIRS)} pairs")
    p.add_argument("--estimators", default=",".join(n for n in ESTIMATORS if not ESTIMATORS[n].needs_groups),
                   help="for Fashion-MNIST (the paired estimator needs groups: faces only)")
    p.add_argument("--judge-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faces", type=Path, help="an orl-faces run: its edits too")
    p.add_argument("--faces-data", default="data/orl-faces")
    p.add_argument("--quick", action="store_true", help="one pair, N 10, one draw, 10 sources, no faces")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    args.n = [int(v) for v in args.n.split(",")]
    args.alphas = [float(v) for v in args.alphas.split(",")]
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    if args.quick:
        args.n, args.draws, args.sources, args.pairs, args.faces, args.judge_epochs = [10], 1, 10, 1, None, 1
    result = run(args, estimators, "python benchmarks/edits.py " + " ".join(sys.argv[1:] if argv is None else argv))
    text = json_text(result, indent=1)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


@torch.no_grad()  # (the judges train under torch.enable_grad)
def run(args, estimators: list[str], command: str) -> dict:
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    section = timed(log)
    started = time.perf_counter()
    model = Glow.from_pretrained(args.checkpoint)
    from glowflow.cli.common import train_settings
    root = args.data or train_settings(args.checkpoint).get("data")
    train = get_dataset("fashion-mnist", root, "train")
    test = get_dataset("fashion-mnist", root, "test")
    with section("judge"):
        limit = 5000 if args.quick else len(train)
        judge = train_judge(to_unit(train.batch(slice(0, limit))), train.labels[:limit], args.judge_epochs, args.seed)
        accuracy = float((predict(judge, to_unit(test.batch(slice(0, len(test))))) == test.labels).float().mean())
    with section("class transfer"):
        transfer = class_transfer(model, judge, train, test, args, estimators, log)
    with section("pixel attributes"):
        pixels = pixel_attributes(model, judge, train, test, args, estimators, log)
    with section("ablation"):
        ablated = ablation(model, judge, train, test, args, log)
    result = {
        "benchmark": "edits", "checkpoint": str(args.checkpoint),
        "command": command,
        "judge_test_accuracy": round(accuracy, 4), "sources": args.sources, "draws": args.draws,
        "class_transfer": summarize(transfer, ("estimator", "n", "alpha")),
        "class_transfer_by_pair": summarize(transfer, ("pair", "estimator", "n", "alpha")),
        "pixel_attributes": summarize(pixels, ("attribute", "estimator", "n", "alpha")),
        "ablation_n30_alpha1": ablated,
    }
    if args.faces:
        with section("faces"):
            result["faces"] = faces(args.faces, args.faces_data, args, log)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


if __name__ == "__main__":
    sys.exit(main())
