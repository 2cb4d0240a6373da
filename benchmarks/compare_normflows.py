"""glowflow vs normflows: the same multi-scale Glow built by both, timed in one process; prints JSON.

Both models get the same L (levels), K (steps per level), hidden width, affine (sigmoid) coupling,
LU-parametrised 1x1 convolutions, batch size and image shape, and see identical dequantised inputs
x = (x_bins + u) / 256 on [0, 1)^D. Measured:

1. training steps/s (forward + backward + Adam step), median over iterations after warm-up; both
   models get the same optimizer, PyTorch's fused Adam, so the ratio compares the flows alone;
2. time to sample one batch (ms), median over repeats, in eval mode without gradients;
3. parameter counts, with a per-part breakdown;
4. with ``--budget-seconds S``: each model trains on Fashion-MNIST for the same wall-clock budget,
   then both are scored in bits/dim on the first N test images with the same dequantisation noise.
   Both get one training recipe, by default the one glowflow's default preset uses (learning-rate
   warm-up, linear decay to zero over the budget, the gradient's global norm clipped at 50, EMA
   weights scored); ``--lr-decay none --ema 0`` gives both a constant learning rate and scores
   their raw weights, ``--grad-clip 0`` turns clipping off.

    .venv/bin/python benchmarks/compare_normflows.py                      # 1x28x28, L=2 (< 3 min, 2 cores)
    .venv/bin/python benchmarks/compare_normflows.py --image-shape 3,32,32 --levels 3
    .venv/bin/python benchmarks/compare_normflows.py --budget-seconds 240 \
        --data /usr/share/datasets/fashion-mnist

Times are taken with as many torch threads as CPUs are available (``--threads`` overrides); on a
machine shared with other jobs the JSON says so, and ``--threads 1`` gives steadier numbers.

Needs ``pip install normflows`` (the ``bench`` extra); the building functions are importable so the
tests can run them on a tiny configuration.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

try:
    import glowflow
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import glowflow
from glowflow import numerics
from glowflow.io import atomic_write_text
from glowflow.model import Glow
from glowflow.train import EMA, LR_DECAYS, TrainConfig, learning_rate, run_progress

N_BITS = 8  # the bits/dim formula below assumes 8-bit data: 256 bins per dimension


@dataclass(frozen=True)
class BenchConfig:
    """The architecture both libraries build, and how it is exercised."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 2
    steps: int = 8
    hidden_channels: int = 128
    batch_size: int = 32
    warmup: int = 3
    iters: int = 20
    sample_batch: int = 32
    sample_repeats: int = 5
    temperature: float = 0.7
    lr: float = 1e-3
    seed: int = 0
    # the budget run's recipe, the same for both models
    lr_decay: str = "linear"  # "none" | "linear" | "cosine": after warm-up, over the wall-clock budget
    warmup_steps: int = 100
    ema: float = 0.995  # EMA of the weights, scored at the end; 0 scores the raw weights only
    grad_clip: float = TrainConfig.grad_clip  # global gradient norm clipped at this; 0: no clipping

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        c, h, w = self.image_shape
        self.schedule(budget_s=60.0)  # the schedule's own checks, before any timing or training
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not self.grad_clip >= 0.0:
            raise ValueError(f"grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        if h % 2 ** self.levels or w % 2 ** self.levels:
            raise ValueError(f"H and W must be divisible by 2**levels = {2 ** self.levels}, "
                             f"got image_shape {self.image_shape} with levels={self.levels}")

    def schedule(self, budget_s: float) -> TrainConfig:
        """The budget run's learning-rate schedule as glowflow's presets use it: warm-up, then
        constant or decayed over ``budget_s`` seconds (time is the budget, so no step limit)."""
        return TrainConfig(lr=self.lr, warmup_steps=self.warmup_steps, lr_decay=self.lr_decay,
                           max_steps=2 ** 62, max_minutes=budget_s / 60.0)

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)


# ------------------------------------------------------------------------------------ building

def build_glowflow(cfg: BenchConfig) -> Glow:
    """glowflow's Glow: affine coupling, LU 1x1 conv, learned conditional split priors and top prior."""
    return Glow(image_shape=cfg.image_shape, levels=cfg.levels, steps=cfg.steps,
                hidden_channels=cfg.hidden_channels, coupling="affine", permutation="invconv_lu",
                learn_top=True, seed=cfg.seed)


def build_normflows(cfg: BenchConfig) -> nn.Module:
    """The same Glow from normflows' parts, as in its multi-scale Glow example.

    normflows lists the levels in the generative direction (index 0 = the coarsest); each level is
    K ``GlowBlock`` (coupling, LU 1x1 conv, actnorm; applied in reverse order when computing
    log p(x), so the data direction is actnorm -> 1x1 conv -> coupling as in glowflow) and a
    ``Squeeze``. ``net_actnorm=True`` gives the coupling net glowflow's form (bias-free conv ->
    actnorm -> ReLU). Each level's latent gets a learned per-element ``DiagGaussian``: unlike
    glowflow's split prior it is not conditioned on the channels kept.
    """
    import normflows as nf

    torch.manual_seed(cfg.seed)  # normflows draws its 1x1-conv rotations from the global RNG
    c, h, w = cfg.image_shape
    levels = cfg.levels
    q0, merges, flows = [], [], []
    for i in range(levels):  # i = 0 is the coarsest level
        channels = c * 2 ** (levels + 1 - i)
        with warnings.catch_warnings():  # normflows' LU init calls the deprecated torch.lu
            warnings.filterwarnings("ignore", message=".*torch.lu is deprecated.*")
            level = [nf.flows.GlowBlock(channels, cfg.hidden_channels, scale=True, scale_map="sigmoid",
                                        split_mode="channel", use_lu=True, net_actnorm=True)
                     for _ in range(cfg.steps)]
        level.append(nf.flows.Squeeze())
        flows.append(level)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent_shape = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            latent_shape = (c * 2 ** (levels + 1), h // 2 ** levels, w // 2 ** levels)
        q0.append(nf.distributions.DiagGaussian(latent_shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters by part of the flow: actnorm, 1x1 conv, coupling (incl. its net) and priors."""
    parts = {"actnorm": 0, "invconv": 0, "coupling": 0, "priors": 0}
    if isinstance(model, Glow):
        for level in model.levels:
            for step in level.steps:
                parts["actnorm"] += count_params(step.actnorm)
                parts["invconv"] += count_params(step.permute)
                parts["coupling"] += count_params(step.coupling)
            if level.split is not None:
                parts["priors"] += count_params(level.split)
        parts["priors"] += count_params(model.top_prior)
    else:
        import normflows as nf
        for level in model.flows:
            for block in level:
                if not isinstance(block, nf.flows.GlowBlock):
                    continue
                for flow in block.flows:
                    key = ("coupling" if isinstance(flow, nf.flows.AffineCouplingBlock) else
                           "invconv" if isinstance(flow, nf.flows.Invertible1x1Conv) else "actnorm")
                    parts[key] += count_params(flow)
        parts["priors"] += count_params(model.q0)
    parts["total"] = count_params(model)
    return parts


# ------------------------------------------------------------------------- the shared numerics

def dequantize_batch(x_uint8: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[B, C, H, W]`` -> (images / 255 in [0, 1], dequantised (x_bins + u) / 256 in [0, 1)).

    The second tensor is what both models' densities are evaluated on; glowflow's own forward
    rebuilds it exactly from the first and the same ``u``.
    """
    x_bins = x_uint8.to(torch.float32)
    noise = torch.rand(x_bins.shape, generator=generator)
    return x_bins / 255.0, numerics.dequantize(x_bins, N_BITS, noise=noise)


def log_prob_glowflow(model: Glow, x_deq: torch.Tensor) -> torch.Tensor:
    """log p(x) in nats of dequantised images on [0,1]^D (glowflow's density is on [0,1]^D)."""
    return model.log_prob(x_deq)


def log_prob_normflows(model: nn.Module, x_deq: torch.Tensor) -> torch.Tensor:
    """log p(x) in nats on [0,1]^D: normflows' Glow example models the jittered [0,1) data as it is
    (``transform=None``, no logit or affine rescale), so no Jacobian correction is needed."""
    return model.log_prob(x_deq, None)


def bits_per_dim(log_prob: torch.Tensor, num_dims: int) -> torch.Tensor:
    """bpd = -(log p(x) - D log 256) / (D ln 2): glowflow's single definition, used for both."""
    return numerics.bits_per_dim(log_prob, num_dims, N_BITS)


# ------------------------------------------------------------------------------------ training

def make_trainer(name: str, model: nn.Module, cfg: BenchConfig, grad_clip: float = 0.0,
                 grad_norms: list[float] | None = None):
    """A closure doing one forward + backward + Adam step on (x01, x_deq, noise); returns the bpd.
    ``lr`` (optional) sets the learning rate for this step.

    The same optimizer for both (fused Adam, one kernel for all parameters), so that neither
    library's step time includes per-parameter optimizer overhead the other avoids. With
    ``grad_clip > 0`` the gradient's global norm is clipped to it before the step (the budget
    run's recipe; the timed steps have none), and the norm before clipping is appended to
    ``grad_norms`` if given."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    d = cfg.num_dims

    def step(x01: torch.Tensor, x_deq: torch.Tensor, noise: torch.Tensor, lr: float | None = None) -> float:
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        if name == "glowflow":
            # The public training API: quantise, dequantise with the given u, score.
            loss = model(x01, noise=noise).bits_per_dim.mean()
        else:
            loss = bits_per_dim(log_prob_normflows(model, x_deq), d).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
            if grad_norms is not None:
                grad_norms.append(norm)
        opt.step()
        return float(loss.detach())

    return step


def batch_with_noise(x_uint8: torch.Tensor, generator: torch.Generator):
    x_bins = x_uint8.to(torch.float32)
    noise = torch.rand(x_bins.shape, generator=generator)
    return x_bins / 255.0, numerics.dequantize(x_bins, N_BITS, noise=noise), noise


@torch.no_grad()
def data_init(models: dict[str, nn.Module], x_deq: torch.Tensor) -> None:
    """Data-dependent actnorm init from one batch, the same batch for both."""
    for name, model in models.items():
        fn = log_prob_glowflow if name == "glowflow" else log_prob_normflows
        fn(model, x_deq)


def time_training(models: dict[str, nn.Module], cfg: BenchConfig) -> dict:
    """Steps/s of each model on the same random 8-bit batches. The two models' steps alternate, so
    a change in machine speed (other processes on a shared machine) hits both alike; the ratio is
    also given as the median of per-iteration paired ratios, the estimate least hurt by such drift."""
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = [batch_with_noise(torch.randint(0, 256, (cfg.batch_size, *cfg.image_shape), generator=gen,
                                              dtype=torch.uint8), gen)
               for _ in range(4)]
    data_init(models, batches[0][1])
    steppers = {name: make_trainer(name, m, cfg) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, float] = {}
    for it in range(cfg.warmup + cfg.iters):
        x01, x_deq, noise = batches[it % len(batches)]
        names = list(steppers) if it % 2 == 0 else list(reversed(steppers))  # ABBA: no order bias
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = steppers[name](x01, x_deq, noise)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if it >= cfg.warmup:
                times[name].append(dt)
                cpu_times[name].append(dc)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"step_ms_median": round(1e3 * med, 2), "step_ms_min": round(1e3 * min(ts), 2),
                     "step_ms_max": round(1e3 * max(ts), 2), "steps_per_s": round(1.0 / med, 3),
                     "images_per_s": round(cfg.batch_size / med, 1),
                     "cpu_ms_median": round(1e3 * statistics.median(cpu_times[name]), 2),
                     "last_loss_bpd": round(losses[name], 4)}
    out["ratio_steps_per_s_glowflow_over_normflows"] = round(
        out["glowflow"]["steps_per_s"] / out["normflows"]["steps_per_s"], 3)
    out["ratio_paired_median"] = round(statistics.median(
        n / g for g, n in zip(times["glowflow"], times["normflows"])), 3)
    out["ratio_from_min_times"] = round(min(times["normflows"]) / min(times["glowflow"]), 3)
    out["warmup"], out["iters"], out["batch_size"] = cfg.warmup, cfg.iters, cfg.batch_size
    return out


@torch.no_grad()
def sample_once(name: str, model: nn.Module, n: int, temperature: float) -> torch.Tensor:
    if name == "glowflow":
        return model.sample(n, temperature)
    x, _ = model.sample(n, temperature=temperature)
    return x


def time_sampling(models: dict[str, nn.Module], cfg: BenchConfig) -> dict:
    """Milliseconds to draw one batch in eval mode; repeats alternate between the models."""
    torch.manual_seed(cfg.seed)
    for model in models.values():
        model.eval()
    for name, model in models.items():
        for _ in range(2):  # warm-up (and glowflow's eval-mode cache of W and W^-1)
            sample_once(name, model, cfg.sample_batch, cfg.temperature)
    times: dict[str, list[float]] = {name: [] for name in models}
    finite = {}
    for r in range(cfg.sample_repeats):
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            t0 = time.perf_counter()
            x = sample_once(name, models[name], cfg.sample_batch, cfg.temperature)
            times[name].append(time.perf_counter() - t0)
            finite[name] = bool(torch.isfinite(x).all())
    for model in models.values():
        model.train()
    out = {name: {"ms_median": round(1e3 * statistics.median(ts), 2), "ms_min": round(1e3 * min(ts), 2),
                  "finite": finite[name]} for name, ts in times.items()}
    out["ratio_ms_glowflow_over_normflows"] = round(out["glowflow"]["ms_median"] / out["normflows"]["ms_median"], 3)
    out["batch"], out["temperature"], out["repeats"] = cfg.sample_batch, cfg.temperature, cfg.sample_repeats
    return out


# --------------------------------------------------------------------------- Fashion-MNIST budget

def _read_idx_gz(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root: str | Path, split: str) -> tuple[torch.Tensor, str]:
    """uint8 images ``[N, 1, 28, 28]`` of one split, and which loader read them."""
    try:
        from glowflow.data import get_dataset
        ds = get_dataset("fashion-mnist", root, split)
        return ds.images, "glowflow.data.get_dataset"
    except ImportError:
        pass
    stem = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
    root = Path(root)
    path = next((p for p in (root / f"{stem}.gz", root / stem) if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"expected {stem}.gz (or {stem}) in {root}, not found")
    images = _read_idx_gz(path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{path}: expected [N, 28, 28] uint8 images, got shape {images.shape}")
    return torch.from_numpy(images.copy())[:, None], "benchmark IDX reader"


@torch.no_grad()
def evaluate_bpd(name: str, model: nn.Module, images: torch.Tensor, cfg: BenchConfig,
                 batch: int = 200) -> float:
    """Mean test bits/dim with a fixed dequantisation noise (the same u for both models)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    fn = log_prob_glowflow if name == "glowflow" else log_prob_normflows
    total, count = 0.0, 0
    for i in range(0, images.shape[0], batch):
        _, x_deq = dequantize_batch(images[i:i + batch], gen)
        bpd = bits_per_dim(fn(model, x_deq), cfg.num_dims)
        total += float(bpd.sum())
        count += bpd.shape[0]
    model.train()
    return total / count


class BudgetRun:
    """One model's side of the budget run: its optimizer, EMA and batches, one step per :meth:`step`.

    Data-dependent init happens on construction. Each run seeds its own generators from
    ``cfg.seed``, so both models see the same batches with the same dequantisation noise.
    """

    def __init__(self, name: str, model: nn.Module, train_images: torch.Tensor, cfg: BenchConfig,
                 budget_s: float):
        self.name, self.model, self.images, self.cfg = name, model, train_images, cfg
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.perm, self.pos = torch.randperm(train_images.shape[0], generator=self.order_gen), 0
        self.grad_norms: list[float] = []  # before clipping, one per step (empty without clipping)
        self.step_fn = make_trainer(name, model, cfg, grad_clip=cfg.grad_clip, grad_norms=self.grad_norms)
        _, x_deq, _ = batch_with_noise(train_images[self.perm[:cfg.batch_size]], self.noise_gen)
        data_init({name: model}, x_deq)
        self.schedule = cfg.schedule(budget_s)  # the same for both models
        self.ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
        self.steps = 0

    def learning_rate(self, seconds: float) -> float:
        return learning_rate(self.schedule, self.steps, progress=run_progress(self.schedule, self.steps, seconds))

    def step(self, seconds: float) -> float:
        """One training step, ``seconds`` into this model's budget; returns the step's bpd."""
        n, b = self.images.shape[0], self.cfg.batch_size
        if self.pos + b > n:
            self.perm, self.pos = torch.randperm(n, generator=self.order_gen), 0
        batch = batch_with_noise(self.images[self.perm[self.pos:self.pos + b]], self.noise_gen)
        self.pos += b
        loss = self.step_fn(*batch, lr=self.learning_rate(seconds))
        if self.ema is not None:
            self.ema.update(self.model, self.steps)
        self.steps += 1
        return loss


def train_for_budget(models: dict[str, nn.Module], train_images: torch.Tensor, cfg: BenchConfig,
                     budget_s: float, slice_s: float = 5.0) -> tuple[dict, dict[str, BudgetRun]]:
    """Give each model ``budget_s`` wall-clock seconds of training (its init included).

    The budgets are spent in alternating slices of ``slice_s`` seconds rather than one after the
    other, so that load from other processes on a shared machine is spread over both alike.
    Returns the summary and the runs (whose ``ema.model`` holds the averaged weights).
    """
    used = {name: 0.0 for name in models}
    cpu_used = {name: 0.0 for name in models}
    runs: dict[str, BudgetRun] = {}
    for name, model in models.items():
        t0, c0 = time.perf_counter(), time.process_time()
        runs[name] = BudgetRun(name, model, train_images, cfg, budget_s)
        used[name] += time.perf_counter() - t0
        cpu_used[name] += time.process_time() - c0
    losses: dict[str, list[float]] = {name: [] for name in models}
    while any(used[name] < budget_s for name in models):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            while used[name] + (time.perf_counter() - t0) < budget_s and time.perf_counter() - t0 < slice_s:
                losses[name].append(run.step(used[name] + time.perf_counter() - t0))
            used[name] += time.perf_counter() - t0
            cpu_used[name] += time.process_time() - c0
    out = {}
    for name, ls in losses.items():
        tail = ls[-50:]
        out[name] = {"steps": len(ls), "images_seen": len(ls) * cfg.batch_size, "wall_s": round(used[name], 1),
                     "cpu_s": round(cpu_used[name], 1),
                     "train_bpd_last50_mean": round(sum(tail) / max(len(tail), 1), 4),
                     "nonfinite_losses": sum(not math.isfinite(v) for v in ls),
                     # the training curve, to tell a spike or a plateau from a slow model
                     "train_bpd_per_50_steps": [round(statistics.fmean(ls[i:i + 50]), 4)
                                                for i in range(0, len(ls), 50)]}
        norms = runs[name].grad_norms
        if norms:  # how often clipping bit, and the largest gradient norm in each 50 steps
            out[name]["clipped_steps"] = sum(v > cfg.grad_clip for v in norms)
            out[name]["grad_norm_median"] = round(statistics.median(norms), 3)
            out[name]["grad_norm_max_per_50_steps"] = [round(max(norms[i:i + 50]), 2)
                                                      for i in range(0, len(norms), 50)]
    return out, runs


def run_budget(models: dict[str, nn.Module], cfg: BenchConfig, data: str, budget_s: float,
               eval_images: int) -> dict:
    if cfg.image_shape != (1, 28, 28):
        raise ValueError(f"--budget-seconds trains on Fashion-MNIST: needs --image-shape 1,28,28, "
                         f"got {cfg.image_shape}")
    train_images, loader = load_fashion_mnist(data, "train")
    test_images, _ = load_fashion_mnist(data, "test")
    test_images = test_images[:eval_images]
    recipe = (f"Adam(lr={cfg.lr}, fused=True), {cfg.warmup_steps} warm-up steps, "
              + ("then constant" if cfg.lr_decay == "none" else f"then {cfg.lr_decay} decay to 0 over the budget")
              + (f"; gradient norm clipped at {cfg.grad_clip}" if cfg.grad_clip else "; no gradient clipping")
              + (f"; EMA {cfg.ema} weights scored" if cfg.ema else "; raw weights scored"))
    out = {"data": str(data), "loader": loader, "budget_seconds": budget_s,
           "eval_images": int(test_images.shape[0]), "train_images": int(train_images.shape[0]),
           "recipe": recipe, "schedule": "budgets spent in alternating 5 s slices"}
    summary, runs = train_for_budget(models, train_images, cfg, budget_s)
    out.update(summary)
    for name, run in runs.items():
        raw = round(evaluate_bpd(name, run.model, test_images, cfg), 4)
        out[name]["test_bpd_raw_weights"] = raw
        out[name]["test_bpd"] = raw if run.ema is None else round(
            evaluate_bpd(name, run.ema.model, test_images, cfg), 4)
    out["test_bpd_difference_glowflow_minus_normflows"] = round(
        out["glowflow"]["test_bpd"] - out["normflows"]["test_bpd"], 4)
    return out


# ------------------------------------------------------------------------------------------ report

def architecture_notes(cfg: BenchConfig, params: dict) -> list[str]:
    c, h, w = cfg.image_shape
    extra_logs = 0
    split_conv = 0
    split_diag = 0
    ch = c
    hh, ww = h, w
    for i in range(cfg.levels):
        ch, hh, ww = 4 * ch, hh // 2, ww // 2
        extra_logs += cfg.steps * 2 * (ch // 2)
        if i < cfg.levels - 1:
            keep, out = ch - ch // 2, ch // 2
            split_conv += keep * 2 * out * 9 + 2 * out + 2 * out
            split_diag += 2 * out * hh * ww
            ch = keep
    return [
        "Same per step in both: actnorm -> LU 1x1 conv (P fixed, L, U, log|s| learned: 2C^2 + C params) "
        "-> affine coupling, first ceil(C/2) channels condition the rest, shift/scale interleaved "
        "(even/odd output channels), scale = sigmoid(raw + 2); coupling net 3x3 conv -> actnorm -> "
        "ReLU -> 1x1 conv -> actnorm -> ReLU -> zero-initialised 3x3 conv (normflows with "
        "net_actnorm=True). Squeeze uses the same space-to-depth channel order.",
        f"glowflow's zero-initialised output conv carries a learned per-channel log-scale "
        f"(x exp(3 logs), as in openai/glow); normflows' ConvNet2d does not: +{extra_logs} params "
        "in glowflow's couplings.",
        f"Split priors differ: glowflow predicts the mean/log-scale of the factored-out half from the "
        f"kept half with a zero-initialised 3x3 conv (as in the Glow paper; {split_conv} params); "
        f"normflows' MultiscaleFlow gives each level's latent an unconditional learned DiagGaussian "
        f"(per element; {split_diag} params). Top prior: per-element learned mean/log-scale in both.",
        "Hidden-conv init differs: glowflow N(0, 0.05^2), normflows PyTorch's default (Kaiming "
        "uniform). Both zero-initialise the last coupling conv, and both init actnorm from the first "
        "batch.",
        "Densities: both are on [0,1]^D (glowflow shifts by -0.5 inside, log-Jacobian 0; normflows "
        "models the jittered [0,1) data as is, transform=None), so bpd = -(log p(x) - D log 256) / "
        "(D ln 2) applies to both unchanged; both get identical x = (x_bins + u) / 256.",
        "glowflow's training step uses its public forward (input checks, quantise, dequantise with "
        "the same u, bits/dim); normflows' uses model.log_prob on the already-dequantised batch.",
        "Sampling: glowflow in eval mode caches W and W^-1 of every 1x1 conv; normflows inverts L and "
        "U (float64) on every sample call and also accumulates the log-density of the samples.",
        f"Parameter ratio glowflow/normflows = {params['ratio_glowflow_over_normflows']}.",
    ]


def contention_notes(result: dict) -> list[str]:
    """Say so when other processes shared the CPUs: absolute times are then inflated, most with more
    than one thread (OpenMP threads wait at barriers for peers the OS has descheduled), while the
    interleaved, paired ratios stay usable."""
    cpus = result["machine"]["cpus_available"]
    load = max(result["machine"]["loadavg_1_5_15"][0], result["machine_at_end"]["loadavg_1_5_15"][0])
    if load <= 0.5 * cpus:
        return []
    return [f"The machine was shared: 1-minute load average up to {load} on {cpus} CPUs during this run. "
            "Absolute step and sample times are inflated and noisy; the two models were interleaved, so "
            "prefer train.ratio_paired_median over ratios of medians. --threads 1 is far less sensitive "
            "to such load."]


def machine_info() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_available": affinity, "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
            "torch_interop_threads": torch.get_num_interop_threads(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor() or None}


def versions() -> dict:
    import normflows as nf
    return {"python": platform.python_version(), "torch": torch.__version__,
            "normflows": getattr(nf, "__version__", None) or _dist_version("normflows"),
            "glowflow": glowflow.__version__, "numpy": np.__version__}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# The --grid configurations: image shape, levels, K, width and batch size, spanning 1x28x28 and
# 3x32x32, K = 8 and 32, width 64 and 128, batch 16 to 64.
GRID = (
    ((1, 28, 28), 2, 8, 128, 32),   # the default configuration
    ((1, 28, 28), 2, 8, 64, 16),
    ((1, 28, 28), 2, 32, 64, 16),
    ((1, 28, 28), 2, 32, 128, 64),
    ((3, 32, 32), 3, 8, 128, 64),
    ((3, 32, 32), 3, 32, 64, 16),
)


def run_grid(base: BenchConfig, grid=GRID) -> dict:
    """The speed comparison at each configuration of ``grid``, and the smallest training ratio."""
    rows = []
    for shape, levels, steps, width, batch in grid:
        cfg = replace(base, image_shape=shape, levels=levels, steps=steps, hidden_channels=width, batch_size=batch,
                      sample_batch=batch)
        models = {"glowflow": build_glowflow(cfg), "normflows": build_normflows(cfg)}
        params = {name: count_params(m) for name, m in models.items()}
        row = {"image_shape": list(shape), "levels": levels, "steps": steps, "hidden_channels": width,
               "batch_size": batch, "params": params, "train": time_training(models, cfg),
               "sample": time_sampling(models, cfg)}
        rows.append(row)
        print(f"{shape} L={levels} K={steps} width {width} batch {batch}: training ratio "
              f"{row['train']['ratio_steps_per_s_glowflow_over_normflows']} (paired "
              f"{row['train']['ratio_paired_median']}), sampling "
              f"{row['sample']['ratio_ms_glowflow_over_normflows']}", file=sys.stderr, flush=True)
    return {"configs": rows,
            "min_training_ratio": min(r["train"]["ratio_steps_per_s_glowflow_over_normflows"] for r in rows),
            "min_training_ratio_paired": min(r["train"]["ratio_paired_median"] for r in rows)}


def parse_args(argv=None) -> argparse.Namespace:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-shape", default=",".join(map(str, d.image_shape)), help="C,H,W")
    p.add_argument("--levels", type=int, default=d.levels)
    p.add_argument("--steps", type=int, default=d.steps, help="flow steps per level (K)")
    p.add_argument("--hidden-channels", type=int, default=d.hidden_channels)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--sample-batch", type=int, default=d.sample_batch)
    p.add_argument("--sample-repeats", type=int, default=d.sample_repeats)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr-decay", choices=LR_DECAYS, default=d.lr_decay,
                   help="budget run: learning rate after warm-up (decays over the wall-clock budget)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="budget run: learning-rate warm-up")
    p.add_argument("--ema", type=float, default=d.ema, help="budget run: EMA decay of the scored weights (0: raw)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="budget run: clip the gradient's global norm to this, as glowflow's trainer does (0: off)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs available)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="also train each model this long on Fashion-MNIST and report test bits/dim")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX directory")
    p.add_argument("--eval-images", type=int, default=10000, help="first N test images scored (all: 10000)")
    p.add_argument("--skip-speed", action="store_true", help="budget mode only: skip the timing part")
    p.add_argument("--grid", action="store_true",
                   help="time training and sampling at each of the GRID configurations instead of one")
    p.add_argument("--output", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.image_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise SystemExit(f"--image-shape must be C,H,W (three integers), got {args.image_shape!r}")
    cfg = BenchConfig(image_shape=shape, levels=args.levels, steps=args.steps,
                      hidden_channels=args.hidden_channels, batch_size=args.batch_size, warmup=args.warmup,
                      iters=args.iters, sample_batch=args.sample_batch, sample_repeats=args.sample_repeats,
                      temperature=args.temperature, lr=args.lr, seed=args.seed,
                      lr_decay=args.lr_decay, warmup_steps=args.warmup_steps, ema=args.ema,
                      grad_clip=args.grad_clip)
    threads = args.threads or machine_info()["cpus_available"]
    torch.set_num_threads(threads)
    t_start = time.perf_counter()

    models = {"glowflow": build_glowflow(cfg), "normflows": build_normflows(cfg)}
    params = {name: param_breakdown(m) for name, m in models.items()}
    params["ratio_glowflow_over_normflows"] = round(params["glowflow"]["total"] / params["normflows"]["total"], 4)
    result = {"benchmark": "compare_normflows", "config": {**asdict(cfg), "image_shape": list(cfg.image_shape),
                                                           "coupling": "affine", "permutation": "invconv_lu",
                                                           "dtype": "float32", "device": "cpu"},
              "versions": versions(), "machine": machine_info(), "params": params}
    if args.grid:
        result["grid"] = run_grid(cfg)
    elif not args.skip_speed:
        result["train"] = time_training(models, cfg)
        result["sample"] = time_sampling(models, cfg)
    if args.budget_seconds is not None:
        fresh = {"glowflow": build_glowflow(cfg), "normflows": build_normflows(cfg)}  # untrained
        result["budget"] = run_budget(fresh, cfg, args.data, args.budget_seconds, args.eval_images)
    result["machine_at_end"] = {"loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}
    result["notes"] = architecture_notes(cfg, params) + contention_notes(result)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return result


if __name__ == "__main__":
    main()
