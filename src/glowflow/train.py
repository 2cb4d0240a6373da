"""The training loop: one readable file.

Every random choice of step ``s`` (which images, their dequantisation noise, their augmentation) is
drawn from generators seeded by ``(seed, s)``, for the global batch, and each rank takes its slice.
So a resumed run repeats an uninterrupted one bit for bit, and N processes train on the batches of
one process: equal at each step up to float32 rounding, since the all-reduce sums the gradients in
another order, a difference that compounds over many steps.
"""
from __future__ import annotations

import copy
import functools
import math
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import io
from .config import LR_DECAYS, GlowConfig, TrainConfig
from .data import ImageDataset, flip, flip_mask, get_dataset, is_prepared, translate, translation_offsets
from .images import make_grid, save_grid
from .likelihood import describe_outliers, score, summarize_bits_per_dim
from .model import Glow
from .numerics import to_unit
from .plots import plot_curves
from .progress import Progress
from .rundir import (CURVE, METRICS, RAW_WEIGHTS, SAMPLES, TENSORBOARD, TRAIN_CONFIG, TRAINER_STATE,
                     check_run_dir, clear_run, read_history)

__all__ = ["Trainer", "TrainConfig", "EMA", "train", "dataset_bits_per_dim", "learning_rate", "run_progress",
           "batch_indices", "step_generator", "load_split", "TrainingDiverged", "LR_DECAYS"]

# The random streams of a training step: each its own generator, seeded by (seed, step, stream).
STREAM_BATCH_ORDER = 0  # the permutation of an epoch (seeded by the epoch, not the step)
STREAM_TRANSLATION = 1  # augment_shift
STREAM_DEQUANTIZATION = 2  # the uniform noise added to the integer pixel values
STREAM_FLIP = 3  # augment_flip
STREAM_PERTURB = 4  # perturb_rate: which pixels are replaced, and by what
STREAM_GAUSSIAN = 5  # a model of noisy images (model.noise_std): its Gaussian noise
# The data-dependent init batch is drawn under seed + INIT_SEED_OFFSET, so it is not step 0's batch.
INIT_SEED_OFFSET = 7919


class TrainingDiverged(RuntimeError):
    """Training kept producing non-finite losses after every restore the budget allowed."""


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """An independent, reproducible random stream for (seed, step, purpose)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of ``step``: epochs are seeded permutations, last partial batch dropped."""
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({num_examples} examples)")
    epoch, i = divmod(step, per_epoch)
    return _epoch_order(num_examples, seed, epoch)[i * batch_size:(i + 1) * batch_size].clone()


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    # drawn once per epoch, not once per step: a permutation of the whole dataset is not free
    return torch.randperm(num_examples, generator=step_generator(seed, epoch, STREAM_BATCH_ORDER))


def run_progress(cfg: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """How far a run is through its budget, in [0, 1]: the larger of the step and the time fractions."""
    p = step / cfg.max_steps if cfg.max_steps else 1.0
    if cfg.max_minutes:
        p = max(p, seconds / (60.0 * cfg.max_minutes))
    return min(1.0, p)


def learning_rate(cfg: TrainConfig, step: int, scale: float = 1.0, progress: float | None = None) -> float:
    """Linear warm-up to ``lr``; then constant (as the official code), or decayed to ``lr * lr_final``
    at the end of the budget, linearly or on a half cosine. ``progress`` is :func:`run_progress`
    (default: from ``step`` alone). Under a time budget the decay follows the clock, so it fits
    whatever number of steps the machine manages."""
    lr = cfg.lr * scale * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_decay == "none" or step < cfg.warmup_steps:
        return lr
    p = run_progress(cfg, step) if progress is None else progress
    w = cfg.warmup_steps / cfg.max_steps if cfg.max_steps and not cfg.max_minutes else 0.0
    t = min(1.0, max(0.0, (p - w) / max(1e-12, 1.0 - w)))  # 0 at the end of warm-up, 1 at the end
    frac = 1.0 - t if cfg.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return lr * (cfg.lr_final + (1.0 - cfg.lr_final) * frac)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        # the fused kernel updates every parameter in one call (hundreds of small tensors here)
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return torch.optim.Adamax(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def dataset_bits_per_dim(model: Glow, data: ImageDataset, batch_size: int = 500, seed: int = 0,
                         device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Test-set bits/dim of a dataset's uint8 images: mean and standard error over images. Images
    scored NaN or inf make it a ValueError, not a number: the weights (or the data) are broken."""
    res = score(model, data, batch_size=batch_size, seed=seed, device=device, progress=progress, desc="eval")
    bpd = res["bits_per_dim"]
    bad = int((~torch.isfinite(bpd)).sum())
    if bad:
        raise ValueError(f"bits/dim is not finite for {bad} of {bpd.numel()} images of {data.name} (NaN or inf): "
                         "the model's weights or these images are broken, so there is no result to report")
    return summarize_bits_per_dim(bpd)


class EMA:
    """Polyak averaging of the weights, with the usual bias-reducing warm-up of the decay."""

    def __init__(self, model: Glow, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._bind(model)

    def _bind(self, model: Glow) -> None:
        # Walking a deep module tree for its tensors is slow next to a small step, so the lists are
        # made once (loading a state dict copies into the same tensors, so they stay valid).
        self._source = model
        self._tensors = (list(self.model.parameters()), list(model.parameters()),
                         list(self.model.buffers()), list(model.buffers()))

    @torch.no_grad()
    def update(self, model: Glow, step: int) -> None:
        if model is not self._source:
            self._bind(model)
        d = min(self.decay, (1 + step) / (10 + step))
        params, source_params, buffers, source_buffers = self._tensors
        torch._foreach_lerp_(params, source_params, 1 - d)
        if buffers:
            torch._foreach_copy_(buffers, source_buffers)


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 and fp16 are CUDA autocast: refuse them on another device rather than run in fp32 unsaid."""
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision {precision} is autocast on CUDA, but this run is on {device}; set "
                         "precision=fp32 there, or train on a GPU (--device cuda)")


class Trainer:
    """Holds the model, EMA, optimizer and data of one run; ``run()`` trains until done."""

    def __init__(self, cfg: TrainConfig, out_dir, train_data: ImageDataset, test_data: ImageDataset | None = None,
                 resume: bool = False, dist: dist_utils.DistInfo | None = None, log=print, overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.dist = dist or dist_utils.DistInfo(device=dist_utils.resolve_device(cfg.device))
        self.device = self.dist.device
        check_precision(cfg.precision, self.device)
        self.train_data, self.test_data = train_data, test_data
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.lock = io.DirectoryLock(self.out, "another training")
        if self.dist.is_main:  # the other ranks write nothing
            check_run_dir(self.out, resume, overwrite)
            self.lock.acquire()  # released when run() ends, or with the process
            if overwrite:
                clear_run(self.out)
            io.remove_stale_temporaries(self.out / ckpt.CHECKPOINT_DIR)
        try:
            self._setup(resume)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, resume: bool) -> None:
        cfg, train_data = self.cfg, self.train_data
        if tuple(train_data.image_shape) != tuple(cfg.model.image_shape):
            raise ValueError(f"data images are {tuple(train_data.image_shape)} but the model expects "
                             f"{tuple(cfg.model.image_shape)}: set model.image_shape to match")
        if cfg.model.num_classes and train_data.labels is None:
            raise ValueError("a class-conditional model needs a labelled dataset")
        self.model = Glow(config=cfg.model, memory=cfg.memory).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step = 0
        self.seconds = 0.0  # training time so far, over all resumes (the max_minutes budget)
        self.lr_scale = 1.0
        self.bad_steps = 0
        self.recoveries = 0
        self.history: list[dict] = []
        self._tb = None
        if resume and self._has_checkpoint():
            self._load_state()
            self.log(f"resumed from {self.out / ckpt.CHECKPOINT_DIR} at step {self.step}")
        else:
            if resume:
                self.log(f"no checkpoint in {self.out}: starting a new run")
            self._data_dependent_init()
            self.ema = EMA(self.model, cfg.ema_decay)
            self.optimizer = make_optimizer(cfg, self.model)
        self._params = list(self.model.parameters())  # made once: see EMA._bind
        self.train_model = self._wrap(self.model)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")

    def _wrap(self, model: Glow):
        """The module the training step calls: DDP across ranks, ``torch.compile`` if asked."""
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return torch.compile(model) if self.cfg.compile else model

    # ------------------------------------------------------------------ data
    def global_batch(self, step: int, batch_size: int | None = None, seed: int | None = None):
        """Images (float [0,1]), labels and dequantisation noise of this rank's slice of ``step``'s batch.

        Every random draw is made for the whole global batch and sliced, so the slices of N ranks
        are the batch of one process; only this rank's rows are read from the dataset.
        """
        cfg, data = self.cfg, self.train_data
        n = batch_size or cfg.batch_size
        seed = cfg.seed if seed is None else seed
        part = self.dist.shard(n)
        idx = batch_indices(len(data), n, step, seed)[part]
        x = to_unit(data.batch(idx))
        if cfg.augment_shift:
            offsets = translation_offsets(n, cfg.augment_shift, step_generator(seed, step, STREAM_TRANSLATION))
            x = translate(x, offsets[:, part], cfg.augment_shift)
        if cfg.augment_flip:
            x = flip(x, flip_mask(n, step_generator(seed, step, STREAM_FLIP))[part])
        if cfg.perturb_rate:  # a background model (Ren et al. 2019): pixels become uniform random 8-bit values
            gen = step_generator(seed, step, STREAM_PERTURB)
            replace = (torch.rand((n, *x.shape[1:]), generator=gen) < cfg.perturb_rate)[part]
            values = torch.randint(0, 256, (n, *x.shape[1:]), generator=gen, dtype=torch.uint8)[part]
            x = torch.where(replace, to_unit(values), x)
        noise = torch.rand((n, *x.shape[1:]), generator=step_generator(seed, step, STREAM_DEQUANTIZATION))[part]
        y = data.labels[idx] if (cfg.model.num_classes and data.labels is not None) else None
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        return to(x), to(y), to(noise)

    def gaussian(self, step: int, batch_size: int | None = None, seed: int | None = None):
        """A model of noisy images (``model.noise_std`` > 0): the standard normal draws of this
        rank's slice of ``step``'s batch, drawn for the whole batch as :meth:`global_batch` draws;
        None for a model of clean images."""
        if not self.cfg.model.noise_std:
            return None
        n = batch_size or self.cfg.batch_size
        seed = self.cfg.seed if seed is None else seed
        shape = (n, *self.cfg.model.image_shape)
        return torch.randn(shape, generator=step_generator(seed, step, STREAM_GAUSSIAN))[self.dist.shard(n)].to(self.device)

    def _data_dependent_init(self) -> None:
        n = min(self.cfg.init_batch_size, len(self.train_data))
        n -= n % self.dist.world_size
        seed = self.cfg.seed + INIT_SEED_OFFSET
        x, y, noise = self.global_batch(0, n, seed=seed)
        self.model.initialize(x, y, noise=noise, gaussian=self.gaussian(0, n, seed=seed))

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        lr = learning_rate(cfg, step, self.lr_scale, run_progress(cfg, step, self.seconds))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.model.training:  # a walk over every module: only when something changed the mode
            self.model.train()
        x, y, noise = self.global_batch(step)
        gaussian = self.gaussian(step)
        noisy = {} if gaussian is None else {"gaussian": gaussian}  # a clean model's call is unchanged
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.train_model(x, y, noise=noise, **noisy)
        bpd = out.bits_per_dim.float().mean()
        loss = bpd
        if out.class_logits is not None:
            # the paper's auxiliary class loss, in bits per image
            loss = loss + cfg.class_loss_weight * F.cross_entropy(out.class_logits.float(), y) / math.log(2)
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        grad_norm = float("nan")
        if finite or self.dist.enabled:  # under DDP every rank joins backward's all-reduce, even to discard it
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip))
            finite = finite and (math.isfinite(grad_norm) or self.scaler.is_enabled())
        if self.dist.enabled:  # every rank must agree to skip
            flag = dist_utils.all_reduce_mean(torch.tensor(float(finite), device=self.device))
            finite = bool(flag >= 1.0)
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.ema.update(self.model, step)
            self.bad_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
        self.step += 1
        bpd_val = dist_utils.all_reduce_mean(bpd.detach()).item() if finite else float("nan")
        return {"step": self.step, "loss": float(loss.detach()), "bits_per_dim": bpd_val, "lr": lr,
                "grad_norm": grad_norm, "skipped": not finite}

    def _recover(self) -> None:
        """After repeated non-finite steps: back to the last good checkpoint (at worst the initial
        weights, saved before the first step) with a lower learning rate; give up after
        ``max_recoveries`` restores."""
        cfg = self.cfg
        if self.recoveries >= cfg.max_recoveries:
            good = f"the last good checkpoint (step {self.step}) is in {self.out / ckpt.CHECKPOINT_DIR}; " \
                if self._has_checkpoint() else ""
            message = (f"training diverged: {cfg.max_bad_steps} non-finite losses or gradients in a row, again "
                       f"after each of {self.recoveries} restores with the learning rate scaled by "
                       f"{cfg.lr_backoff:g} (down to {self.lr_scale * cfg.lr:.3g}). {good}resume it with a lower "
                       "--lr, a longer warm-up (--set warmup_steps=N) or a tighter --set grad_clip=X, or start "
                       "over with --overwrite")
            self._record({"event": "diverged", "step": self.step, "message": message})
            raise TrainingDiverged(message)
        self.recoveries += 1
        target = self.lr_scale * cfg.lr_backoff
        if self._has_checkpoint():
            self._load_state()
            where = f"restored the checkpoint of step {self.step}"
        else:  # another rank's view of a checkpoint it cannot see
            where = "no checkpoint to restore: kept the current weights"
        self.lr_scale = target
        self.bad_steps = 0
        msg = (f"warning: {cfg.max_bad_steps} consecutive non-finite losses/gradients; {where}; "
               f"learning rate scaled to {self.lr_scale:g} x {cfg.lr:g}")
        self.log(msg)
        self._record({"event": "recovered", "step": self.step, "lr_scale": self.lr_scale, "message": msg})

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        state = {"step": self.step, "seconds": self.seconds, "lr_scale": self.lr_scale,
                 "optimizer": self.optimizer.state_dict()}
        with ckpt.checkpoint_directory(self.out / ckpt.CHECKPOINT_DIR) as tmp:
            # the EMA weights are the model users load; the raw ones and the optimizer resume training
            ckpt.write_model_files(tmp, self.cfg.model.to_dict(), self.ema.model.state_dict())
            ckpt.save_tensors(tmp / RAW_WEIGHTS, self.model.state_dict())
            torch.save(state, tmp / TRAINER_STATE)
            io.write_json(tmp / TRAIN_CONFIG, self.cfg.to_dict())

    def _has_checkpoint(self) -> bool:
        """Whether this run has a checkpoint: the live one, or the ``.old`` a kill mid-swap leaves."""
        try:
            ckpt.resolve_checkpoint_dir(self.out)
        except ckpt.CheckpointError:
            return False
        return True

    def _load_state(self) -> None:
        directory = ckpt.resolve_checkpoint_dir(self.out)
        saved = GlowConfig.from_dict(ckpt.read_config(directory))
        if saved != self.cfg.model:
            ours, theirs = self.cfg.model.to_dict(), saved.to_dict()
            differ = ", ".join(f"model.{k}: {theirs[k]!r} in the checkpoint, {ours[k]!r} in this run"
                               for k in ours if ours[k] != theirs[k])
            raise ValueError(f"the checkpoint in {directory} is for a different model ({differ}); resume with the "
                             "checkpoint's settings, or start a new run with --overwrite or another --out")
        ckpt.load_state_into(self.model, ckpt.load_tensors(directory / RAW_WEIGHTS, self.device),
                             directory / RAW_WEIGHTS)
        self.ema = EMA(self.model, self.cfg.ema_decay)
        ckpt.load_state_into(self.ema.model, ckpt.load_tensors(directory / ckpt.WEIGHTS_NAME, self.device),
                             directory / ckpt.WEIGHTS_NAME)
        ckpt.verify_checksum(directory / TRAINER_STATE)
        try:
            state = torch.load(directory / TRAINER_STATE, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError:  # torch's message goes on to advise weights_only=False: not here
            raise ckpt.CheckpointError(f"{directory / TRAINER_STATE} holds objects other than tensors and numbers, "
                                       "which glowflow never writes there; refused unread (it may run code)") from None
        except Exception as e:  # truncated or corrupt file: say which
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ckpt.CheckpointError(f"corrupt or truncated trainer state {directory / TRAINER_STATE}: {first}") from e
        self.optimizer = make_optimizer(self.cfg, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the saved state carries betas too: this run's config sets them
            group["betas"] = (self.cfg.beta1, self.cfg.beta2)
        self.step, self.lr_scale = int(state["step"]), float(state["lr_scale"])
        self.seconds = float(state.get("seconds", 0.0))

    # ------------------------------------------------------------------ logging, evaluation, pictures
    def _record(self, row: dict) -> None:
        self.history.append(row)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS, "a") as f:
                f.write(io.json_text(row, sort_keys=False) + "\n")
            if self._tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                        self._tb.add_scalar(k, v, row.get("step", self.step))

    def test_metrics(self) -> dict:
        """The metrics row of the EMA weights on the test images (empty without test data)."""
        if self.test_data is None:
            return {}
        data = self.test_data.head(self.cfg.test_limit)
        res = dataset_bits_per_dim(self.ema.model, data, seed=self.cfg.seed, device=self.device)
        return {"step": self.step, "test_images": res["num_images"],
                **{f"test_{k}": v for k, v in res.items() if k != "num_images"}}

    def write_pictures(self) -> None:
        y = None
        if self.cfg.model.num_classes:
            y = torch.arange(64) % self.cfg.model.num_classes
        x = self.ema.model.sample(64, temperature=0.7, y=y, generator=torch.Generator().manual_seed(self.cfg.seed))
        scale = _display_scale(self.cfg.model.image_shape)
        save_grid(x, self.out / SAMPLES, nrow=8, scale=scale)
        plot_curves(self.history, self.out / CURVE)
        if self._tb is not None:  # the same grid beside the scalars, uint8 [C, H, W]
            self._tb.add_image("samples", make_grid(x, nrow=8, scale=scale), self.step)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train until the step or time budget is spent; returns the run's summary."""
        cfg = self.cfg
        try:
            self._begin()
            if self.step == 0 and not self._has_checkpoint():
                self.save_checkpoint()  # the initial weights: what a run that diverges early restores
            while not self._done():
                row = self.train_step()  # one update, or none when the loss or a gradient is not finite
                self._set_clock(self._seconds0 + time.perf_counter() - self._t0)
                self.bar.update(1)
                if cfg.max_minutes and self.step - self._start_step >= 20:  # the steps the clock allows
                    done = run_progress(cfg, self.step, self.seconds)
                    self.bar.total = min(cfg.max_steps, max(self.step, round(self.step / max(done, 1e-9))))
                if row["skipped"]:
                    self.log(f"warning: step {row['step']}: non-finite loss or gradient, step skipped")
                    self._record({"event": "skipped", **row})
                    if self.bad_steps >= cfg.max_bad_steps:
                        self._recover()  # back to the last checkpoint, at a lower learning rate
                        self.bar.n = self.step
                    if not self._done():  # the last step saves and evaluates, skipped or not
                        continue
                else:
                    self._images_since_log += cfg.batch_size
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        self._log_row(row)
                last = self._done()
                if self.step % cfg.eval_every == 0 or last:
                    self._evaluate()
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if self.dist.is_main and (self.step % cfg.sample_every == 0 or last):
                    self.write_pictures()
            return self._finish()
        finally:
            self.close()

    def _begin(self) -> None:
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._tb = _tensorboard(self.out / TENSORBOARD)
            self.history = read_history(self.out / METRICS, upto=self.step)
        self._start_step, self._t0, self._seconds0 = self.step, time.perf_counter(), self.seconds
        self._log_time, self._images_since_log = time.perf_counter(), 0  # images/s since the last log line
        self.bar = Progress(self.cfg.max_steps, "train", enabled=self.cfg.progress and self.dist.is_main,
                            unit="step", initial=self.step)

    def _set_clock(self, seconds: float) -> None:
        """Advance the training clock; under DDP every rank takes rank 0's, so all agree on the
        learning rate and on when the time budget ends."""
        if self.dist.enabled:
            t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(t, 0)
            seconds = float(t)
        self.seconds = seconds

    def _out_of_time(self) -> bool:
        return self.cfg.max_minutes is not None and self.seconds >= 60.0 * self.cfg.max_minutes

    def _done(self) -> bool:
        return self.step >= self.cfg.max_steps or self._out_of_time()

    def _log_row(self, row: dict) -> None:
        now = time.perf_counter()
        row["images_per_s"] = self._images_since_log / max(now - self._log_time, 1e-9)
        self._log_time, self._images_since_log = now, 0
        self._record(row)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", bpd=f"{row['bits_per_dim']:.3f}",
                             img_s=f"{row['images_per_s']:.0f}")

    def _evaluate(self) -> None:
        ev = self.test_metrics()
        if ev:
            self._record(ev)
            self.log(f"step {self.step}: test bits/dim {ev['test_bits_per_dim']:.4f} "
                     f"± {ev['test_bits_per_dim_se']:.4f}"
                     + describe_outliers(ev["test_outliers"], ev["test_images"], ev["test_bits_per_dim_median"],
                                         ev["test_bits_per_dim_without_outliers"]))

    def close(self) -> None:
        """Release the run directory (and the progress bar and TensorBoard writer)."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.lock.release()

    def _finish(self) -> dict:
        self.close()
        stop_reason = "max_minutes" if self.step < self.cfg.max_steps and self._out_of_time() else "max_steps"
        return self.summary(stop_reason, time.perf_counter() - self._t0)

    def summary(self, stop_reason: str, elapsed: float) -> dict:
        summary = {"steps": self.step, "steps_this_run": self.step - self._start_step, "seconds": round(elapsed, 1),
                   "stop_reason": stop_reason, "out": str(self.out)}
        last_train = [r for r in self.history if "bits_per_dim" in r and "event" not in r]
        if last_train:
            summary["train_bits_per_dim"] = last_train[-1]["bits_per_dim"]
        evals = [r for r in self.history if "test_bits_per_dim" in r]
        if evals:
            summary.update((k, v) for k, v in evals[-1].items() if k.startswith("test_"))
        if self.dist.is_main and (self.out / SAMPLES).exists():
            summary["samples"] = str(self.out / SAMPLES)
        return summary


def _display_scale(image_shape) -> int:
    """Enlargement for pictures of small images, so that a 28x28 sample is big enough to see."""
    return max(1, 128 // max(image_shape[1:]))


def _tensorboard(path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: only when tensorboard is installed
    except Exception:
        return None
    return SummaryWriter(str(path))


def load_split(name: str, root, split: str, image_shape, limit: int | None = None) -> ImageDataset:
    """A dataset split for a model of ``image_shape`` = (C, H, W): image folders are resized and
    converted to it; a prepared set (memory-mapped) is checked against it, with a message saying
    how to prepare it again; fixed-size datasets load as they are (the caller checks the shape)."""
    c, h, _ = image_shape
    sized = name in ("folder", "prepared", "orl-faces", "orl-faces-by-person") or is_prepared(root)
    return get_dataset(name, root, split, limit=limit, image_size=h if sized else None,
                       channels=c if sized else None)


def train(cfg: TrainConfig, out_dir, resume: bool = False, log=print, overwrite: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir`` (one process, or one rank under torchrun); returns a summary.

    A directory that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it); one that another training is writing is refused.
    """
    check_run_dir(out_dir, resume, overwrite)  # before minutes of data loading
    dist = dist_utils.setup(cfg.device, cfg.dist_timeout_minutes)
    trainer = None
    try:
        check_precision(cfg.precision, dist.device)
        shape = cfg.model.image_shape
        train_data = load_split(cfg.dataset, cfg.data, "train", shape, cfg.train_limit)
        test_data = load_split(cfg.dataset, cfg.data, "test", shape, cfg.test_limit)
        trainer = Trainer(cfg, out_dir, train_data, test_data, resume=resume, dist=dist, log=log,
                          overwrite=overwrite)
        summary = trainer.run()
        # ranks leave together: one that tears its Gloo group down while rank 0 still writes the
        # final checkpoint and samples can close connections the other still holds
        dist_utils.barrier()
        return summary
    except RuntimeError as e:  # a collective that timed out: say which rank is missing, not a traceback
        where = f"after {trainer.step} training steps" if trainer else "while setting up (initialisation, DDP)"
        timed_out = dist_utils.timeout_error(dist, e, where)
        if timed_out is None:
            raise
        raise timed_out from e
    finally:
        dist_utils.teardown()
