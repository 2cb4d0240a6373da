"""The training loop: one readable file.

Every random choice of step ``s`` (which images, their dequantisation noise, their translation) is
drawn from generators seeded by ``(seed, s)``, for the global batch, and each rank takes its slice.
So a resumed run repeats an uninterrupted one exactly, and N processes match one process.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .model import Glow, GlowConfig, config_from_dict

TRAINER_STATE = "trainer.pt"
RAW_WEIGHTS = "raw.safetensors"
LR_DECAYS = ("none", "linear", "cosine")  # the learning rate after warm-up (see learning_rate)
TRAIN_CONFIG = "train_config.json"


@dataclass(frozen=True)
class TrainConfig:
    """A training run: the model, the data and the optimisation. Presets fill it; the CLI overrides it."""

    model: GlowConfig = field(default_factory=GlowConfig)
    dataset: str = "fashion-mnist"
    data: str | None = None  # dataset root; None: the dataset's default location
    train_limit: int | None = None
    test_limit: int | None = None  # test images used for evaluations during training
    augment_shift: int = 0  # random translations up to this many pixels (CIFAR-10: 2)
    batch_size: int = 64  # global, over all ranks
    init_batch_size: int = 512  # data-dependent init batch (global)
    optimizer: str = "adam"  # "adam" or "adamax"
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_decay: str = "none"  # after warm-up: "none" (constant, as the official code), "linear" or "cosine"
    lr_final: float = 0.0  # with lr_decay: the learning rate at the end of the run, as a fraction of lr
    max_steps: int = 1000
    max_minutes: float | None = None  # stop (and checkpoint) after this much training time, over all resumes
    grad_clip: float = 50.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    sample_every: int = 500
    checkpoint_every: int = 500
    max_bad_steps: int = 5  # consecutive NaN/inf steps before restoring the last good checkpoint
    lr_backoff: float = 0.5  # learning-rate factor applied on each such restore
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast, CUDA only)
    compile: bool = False
    channels_last: bool = False
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", GlowConfig.from_dict(self.model))
        if self.optimizer not in ("adam", "adamax"):
            raise ValueError(f"optimizer must be 'adam' or 'adamax', got {self.optimizer!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if not 0.0 <= self.lr_final <= 1.0:
            raise ValueError(f"lr_final must be in [0, 1] (a fraction of lr), got {self.lr_final}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if self.batch_size < 1 or self.init_batch_size < 1 or self.max_steps < 0:
            raise ValueError("batch_size and init_batch_size must be >= 1 and max_steps >= 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, "training config")


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """An independent, reproducible random stream for (seed, step, purpose)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of ``step``: epochs are seeded permutations, last partial batch dropped."""
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({num_examples} examples)")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(num_examples, generator=step_generator(seed, epoch, 0))
    return perm[i * batch_size:(i + 1) * batch_size]


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
        # the fused kernel updates every parameter in one call: 4x less optimizer time on CPU than
        # the per-parameter loop (hundreds of small tensors here); same update rule
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    return torch.optim.Adamax(model.parameters(), lr=cfg.lr, foreach=True)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def evaluate(model: Glow, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 500,
             seed: int = 0, device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Test-set bits/dim of uint8 images [N, C, H, W]: mean and standard error over images."""
    from tqdm.auto import tqdm

    model.eval()
    out = []
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(0, len(images), batch_size), desc="eval", disable=not progress, leave=False)
    with torch.no_grad():
        for start in bar:
            x = _to_float(images[start:start + batch_size])
            noise = torch.rand(x.shape, generator=gen)
            y = labels[start:start + batch_size].to(device) if model.config.num_classes else None
            out.append(model(x.to(device), y, noise=noise.to(device)).bits_per_dim.double().cpu())
    bpd = torch.cat(out)
    n = bpd.numel()
    se = float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"bits_per_dim": float(bpd.mean()), "bits_per_dim_se": se, "num_images": n}


class EMA:
    """Polyak averaging of the weights, with the usual bias-reducing warm-up of the decay."""

    def __init__(self, model: Glow, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: Glow, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


class Trainer:
    """Holds the model, EMA, optimizer and data of one run; ``run()`` trains until done."""

    def __init__(self, cfg: TrainConfig, out_dir, train_data, test_data=None, resume: bool = False,
                 dist: dist_utils.DistInfo | None = None, log=print):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.dist = dist or dist_utils.DistInfo(device=dist_utils.resolve_device(cfg.device))
        self.device = self.dist.device
        self.train_data, self.test_data = train_data, test_data
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        if tuple(train_data.image_shape) != tuple(cfg.model.image_shape):
            raise ValueError(f"data images are {tuple(train_data.image_shape)} but the model expects "
                             f"{tuple(cfg.model.image_shape)}: set model.image_shape to match")
        if cfg.model.num_classes and train_data.labels is None:
            raise ValueError("a class-conditional model needs a labelled dataset")
        self.model = Glow(config=cfg.model).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step = 0
        self.seconds = 0.0  # training time so far, over all resumes (the max_minutes budget)
        self.lr_scale = 1.0
        self.bad_steps = 0
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
        self.train_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        amp = cfg.precision != "fp32" and self.device.type == "cuda"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and cfg.precision == "fp16")

    # ------------------------------------------------------------------ data
    def global_batch(self, step: int, batch_size: int | None = None, stream_offset: int = 0):
        """Images (float [0,1]), labels and dequantisation noise of this rank's slice of ``step``'s batch."""
        cfg, data = self.cfg, self.train_data
        n = batch_size or cfg.batch_size
        idx = batch_indices(len(data.images), n, step, cfg.seed + stream_offset)
        x = _to_float(data.images[idx])
        if cfg.augment_shift:
            from .data import random_translate
            x = random_translate(x, cfg.augment_shift, step_generator(cfg.seed + stream_offset, step, 1))
        noise = torch.rand(x.shape, generator=step_generator(cfg.seed + stream_offset, step, 2))
        y = data.labels[idx] if (cfg.model.num_classes and data.labels is not None) else None
        part = self.dist.shard(n)
        to = lambda t: None if t is None else t[part].to(self.device)  # noqa: E731
        return to(x), to(y), to(noise)

    def _data_dependent_init(self) -> None:
        n = min(self.cfg.init_batch_size, len(self.train_data.images))
        n -= n % self.dist.world_size
        x, y, noise = self.global_batch(0, n, stream_offset=7919)
        with torch.no_grad():
            self.model(x, y, noise=noise)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        lr = learning_rate(cfg, step, self.lr_scale, run_progress(cfg, step, self.seconds))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        x, y, noise = self.global_batch(step)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.train_model(x, y, noise=noise)
        bpd = out.bits_per_dim.float().mean()
        loss = bpd
        if out.class_logits is not None:
            # the paper's auxiliary class loss, in bits per image
            loss = loss + cfg.model.class_loss_weight * F.cross_entropy(out.class_logits.float(), y) / math.log(2)
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        grad_norm = float("nan")
        if finite or self.dist.enabled:  # under DDP every rank joins backward's all-reduce, even to discard it
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
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
        """After repeated non-finite steps: back to the last good checkpoint with a lower learning rate."""
        target = self.lr_scale * self.cfg.lr_backoff
        if self._has_checkpoint():
            self._load_state()
            where = f"restored the checkpoint of step {self.step}"
        else:
            where = "no checkpoint yet: kept the current weights"
        self.lr_scale = target
        self.bad_steps = 0
        msg = (f"warning: {self.cfg.max_bad_steps} consecutive non-finite losses/gradients; {where}; "
               f"learning rate scaled to {self.lr_scale:g} x {self.cfg.lr:g}")
        self.log(msg)
        self._record({"event": "recovered", "step": self.step, "lr_scale": self.lr_scale, "message": msg})

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        state = {"step": self.step, "seconds": self.seconds, "lr_scale": self.lr_scale,
                 "optimizer": self.optimizer.state_dict()}
        with ckpt.atomic_directory(self.out / ckpt.CHECKPOINT_DIR) as tmp:
            ckpt.write_model_files(tmp, self.ema.model)  # the EMA weights are the model users load
            ckpt.save_tensors(tmp / RAW_WEIGHTS, self.model.state_dict())
            torch.save(state, tmp / TRAINER_STATE)
            ckpt.write_json(tmp / TRAIN_CONFIG, self.cfg.to_dict())

    def _has_checkpoint(self) -> bool:
        """Whether this run has a checkpoint: the live one, or the ``.old`` a kill mid-swap leaves."""
        try:
            ckpt.resolve_checkpoint_dir(self.out)
        except ckpt.CheckpointError:
            return False
        return True

    def _load_state(self) -> None:
        directory = ckpt.resolve_checkpoint_dir(self.out)
        saved = GlowConfig.from_dict(ckpt.read_json(directory / ckpt.CONFIG_NAME))
        # the memory mode changes how gradients are computed, not the model: any mode may resume
        saved = dataclasses.replace(saved, memory=self.cfg.model.memory)
        if saved != self.cfg.model:
            raise ValueError(f"the checkpoint in {directory} is for a different model: {saved} vs {self.cfg.model}")
        ckpt.load_state_into(self.model, ckpt.load_tensors(directory / RAW_WEIGHTS, self.device),
                             directory / RAW_WEIGHTS)
        self.ema = EMA(self.model, self.cfg.ema_decay)
        ckpt.load_state_into(self.ema.model, ckpt.load_tensors(directory / ckpt.WEIGHTS_NAME, self.device),
                             directory / ckpt.WEIGHTS_NAME)
        ckpt.verify_checksum(directory / TRAINER_STATE)
        try:
            state = torch.load(directory / TRAINER_STATE, map_location=self.device, weights_only=True)
        except Exception as e:  # truncated or corrupt file: say which
            raise ckpt.CheckpointError(f"corrupt or truncated trainer state {directory / TRAINER_STATE}: {e}") from e
        self.optimizer = make_optimizer(self.cfg, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.lr_scale = int(state["step"]), float(state["lr_scale"])
        self.seconds = float(state.get("seconds", 0.0))

    # ------------------------------------------------------------------ logging and pictures
    def _record(self, row: dict) -> None:
        self.history.append(row)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self._tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                        self._tb.add_scalar(k, v, row.get("step", self.step))

    def evaluate(self) -> dict:
        if self.test_data is None:
            return {}
        n = self.cfg.test_limit or len(self.test_data.images)
        res = evaluate(self.ema.model, self.test_data.images[:n],
                       self.test_data.labels[:n] if self.test_data.labels is not None else None,
                       seed=self.cfg.seed, device=self.device)
        return {"step": self.step, "test_bits_per_dim": res["bits_per_dim"],
                "test_bits_per_dim_se": res["bits_per_dim_se"], "test_images": res["num_images"]}

    def write_pictures(self) -> None:
        from .plots import plot_curves
        from .images import save_grid

        y = None
        if self.cfg.model.num_classes:
            y = torch.arange(64) % self.cfg.model.num_classes
        x = self.ema.model.sample(64, temperature=0.7, y=y, generator=torch.Generator().manual_seed(self.cfg.seed))
        save_grid(x, self.out / "samples.png", nrow=8)
        plot_curves(self.history, self.out / "curve.png")

    # ------------------------------------------------------------------ the loop
    def _tick(self, seconds: float) -> None:
        """Advance the training clock; under DDP every rank takes rank 0's, so all agree on the
        learning rate and on when the time budget ends."""
        if self.dist.enabled:
            t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(t, 0)
            seconds = float(t)
        self.seconds = seconds

    def _out_of_time(self) -> bool:
        return self.cfg.max_minutes is not None and self.seconds >= 60.0 * self.cfg.max_minutes

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._tb = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._tb = _tensorboard(self.out / "tb")
            self.history = _read_history(self.out / "metrics.jsonl", upto=self.step)
        start_step, t0, seconds0 = self.step, time.perf_counter(), self.seconds
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main),
                   desc="train", dynamic_ncols=True)
        window_t, window_n = time.perf_counter(), 0
        while self.step < cfg.max_steps and not self._out_of_time():
            row = self.train_step()
            self._tick(seconds0 + time.perf_counter() - t0)
            window_n += cfg.batch_size
            bar.update(1)
            if cfg.max_minutes and self.step - start_step >= 20:
                # under a time budget the bar's total is the number of steps the clock allows
                done = run_progress(cfg, self.step, self.seconds)
                bar.total = min(cfg.max_steps, max(self.step, round(self.step / max(done, 1e-9))))
            if row["skipped"]:
                self.log(f"warning: step {row['step']}: non-finite loss or gradient, step skipped")
                self._record({"event": "skipped", **row})
                if self.bad_steps >= cfg.max_bad_steps:
                    self._recover()
                    bar.n = self.step
                continue
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                now = time.perf_counter()
                row["images_per_s"] = window_n / max(now - window_t, 1e-9)
                window_t, window_n = now, 0
                self._record(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", bpd=f"{row['bits_per_dim']:.3f}",
                                img_s=f"{row['images_per_s']:.0f}")
            out_of_time = self._out_of_time()
            last = self.step >= cfg.max_steps or out_of_time
            if self.step % cfg.eval_every == 0 or last:
                ev = self.evaluate()
                if ev:
                    self._record(ev)
                    self.log(f"step {self.step}: test bits/dim {ev['test_bits_per_dim']:.4f} "
                             f"± {ev['test_bits_per_dim_se']:.4f}")
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save_checkpoint()
            if self.dist.is_main and (self.step % cfg.sample_every == 0 or last):
                self.write_pictures()
            if out_of_time:
                break
        stop_reason = "max_minutes" if self.step < cfg.max_steps and self._out_of_time() else "max_steps"
        bar.close()
        if self._tb is not None:
            self._tb.close()
        elapsed = time.perf_counter() - t0
        summary = {"steps": self.step, "steps_this_run": self.step - start_step, "seconds": round(elapsed, 1),
                   "stop_reason": stop_reason, "out": str(self.out)}
        last_train = [r for r in self.history if "bits_per_dim" in r and "event" not in r]
        if last_train:
            summary["train_bits_per_dim"] = last_train[-1]["bits_per_dim"]
        evals = [r for r in self.history if "test_bits_per_dim" in r]
        if evals:
            summary["test_bits_per_dim"] = evals[-1]["test_bits_per_dim"]
            summary["test_bits_per_dim_se"] = evals[-1]["test_bits_per_dim_se"]
            summary["test_images"] = evals[-1]["test_images"]
        if self.dist.is_main and (self.out / "samples.png").exists():
            summary["samples"] = str(self.out / "samples.png")
        return summary


def _tensorboard(path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


def _read_history(path: Path, upto: int) -> list[dict]:
    """Metrics of earlier runs of this directory (kept on resume, truncated to the resumed step)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= upto:
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def load_split(name: str, root, split: str, image_shape, limit: int | None = None):
    """A dataset split for a model of ``image_shape`` = (C, H, W): image folders are resized and
    converted to it; fixed-size datasets load as they are (the caller checks the shape)."""
    from .data import get_dataset

    c, h, _ = image_shape
    folder = name == "folder"
    return get_dataset(name, root, split, limit=limit, image_size=h if folder else None,
                       channels=c if folder else None)


def train(cfg: TrainConfig, out_dir, resume: bool = False, log=print) -> dict:
    """Train ``cfg`` into ``out_dir`` (one process, or one rank under torchrun); returns a summary."""
    dist = dist_utils.setup(cfg.device)
    try:
        shape = cfg.model.image_shape
        train_data = load_split(cfg.dataset, cfg.data, "train", shape, cfg.train_limit)
        test_data = load_split(cfg.dataset, cfg.data, "test", shape, cfg.test_limit)
        trainer = Trainer(cfg, out_dir, train_data, test_data, resume=resume, dist=dist, log=log)
        summary = trainer.run()
        # ranks leave together: one that tears its Gloo group down while rank 0 still writes the
        # final checkpoint and samples can close connections the other still holds
        dist_utils.barrier()
        return summary
    finally:
        dist_utils.teardown()
