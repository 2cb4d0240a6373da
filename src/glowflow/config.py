"""Configuration: the architecture (:class:`GlowConfig`) and a training run (:class:`TrainConfig`),
frozen dataclasses checked when built, and :func:`build_train_config` (a preset with overrides).

Values are coerced and range-checked by :mod:`glowflow.fields`; presets and ``key=value``
overrides are plain data from :mod:`glowflow.presets`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from . import numerics
from .blocks import PERMUTATIONS, build_flow
from .couplings import COUPLINGS, coupling_class
from .fields import check_choice, check_numbers, check_seed, config_from_dict, is_count
from .memory import MEMORY_MODES
from .presets import apply_overrides, load_preset

__all__ = ["GlowConfig", "TrainConfig", "build_train_config", "COUPLINGS", "PERMUTATIONS", "SPLIT_PRIORS",
           "MEMORY_MODES", "LR_DECAYS", "OPTIMIZERS", "PRECISIONS", "DEQUANTIZATIONS", "MAX_PARAMETERS",
           "MAX_FLOW_STEPS", "MAX_IMAGE_DIMS", "DIST_TIMEOUT_MINUTES"]

SPLIT_PRIORS = ("conv", "conv+position")  # the paper's; and one with a learned per-position term
DEQUANTIZATIONS = ("uniform", "variational")  # see dequantization.py
LR_DECAYS = ("none", "linear", "cosine")  # the learning rate after warm-up (see train.learning_rate)
OPTIMIZERS = ("adam", "adamax")
PRECISIONS = ("fp32", "bf16", "fp16")
DIST_TIMEOUT_MINUTES = 10.0  # the default dist_timeout_minutes (Gloo's own is 30)

# Bounds on what a config may ask to build. The paper's largest model (ImageNet 64, L=4, K=48,
# width 512) has about 130M parameters and 192 flow steps; these leave an order of magnitude of
# room and refuse a typo (hidden_channels 1e7) before it allocates terabytes or builds for minutes.
MAX_PARAMETERS = 2_000_000_000
MAX_FLOW_STEPS = 4096
# Values per image: a 4096x4096 RGB image, as many as the largest image glowflow reads. Buffers and
# activations grow with it, which the parameter count does not see (a 1x65536x65536 model has few).
MAX_IMAGE_DIMS = 3 * 4096 * 4096


# ----------------------------------------------------------------------------------- GlowConfig
@dataclass(frozen=True)
class GlowConfig:
    """Everything that defines a Glow model's architecture; saved as ``config.json``.

    How a model is run (memory mode, device, precision) is not here: the same weights may be
    trained, evaluated or resumed under any of those.
    """

    image_shape: tuple[int, int, int] = (3, 32, 32)
    levels: int = 3
    steps: int | tuple[int, ...] = 32  # flow steps per level (the paper's K), or one count per level, finest first
    hidden_channels: int | tuple[int, ...] = 512  # coupling network width, or one per level, finest first
    coupling: str = "affine"
    permutation: str = "invconv"
    learn_top: bool = True
    split_prior: str = "conv"
    num_classes: int | None = None
    n_bits: int = 8
    seed: int = 0  # initial weights
    dequantization: str = "uniform"  # "uniform" or "variational" (a learned q(u|x), Flow++)
    dequant_hidden_channels: int = 32  # width of the variational dequantizer's networks
    dequant_steps: int = 2  # its conditional couplings
    coupling_options: dict = field(default_factory=dict)  # the coupling's own options (mixture: components)
    conditioned_couplings: bool = False  # with num_classes: the coupling networks also see the one-hot label
    attention_levels: int = 0  # the coarsest levels whose coupling networks get self-attention (0: none)
    attention_heads: int = 4  # its heads; they must divide hidden_channels
    gated_levels: int = 0  # the coarsest levels whose coupling networks gate in place of ReLU (0: none)
    logit_alpha: float = 0.0  # 0: the flow sees x - 0.5 (the paper); a in (0, 0.5): logit(a + (1 - 2a) x) (RealNVP)
    # > 0: the model is of noisy images x + noise_std * n (n standard Gaussian, images in [0, 1]), the
    # density whose score gives the posterior mean of a denoising (glowflow.restore.denoise); 0: of x
    noise_std: float = 0.0

    def __post_init__(self):
        shape = self.image_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 3 or not all(is_count(s) for s in shape):
            raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {shape}")
        object.__setattr__(self, "image_shape", tuple(int(s) for s in shape))
        if math.prod(self.image_shape) > MAX_IMAGE_DIMS:
            raise ValueError(f"image_shape {list(self.image_shape)} has {math.prod(self.image_shape):,} values per "
                             f"image; the limit is {MAX_IMAGE_DIMS:,} (a 4096x4096 RGB image)")
        check_numbers(self, _GLOW_BOUNDS)
        check_seed(self.seed)
        _, h, w = self.image_shape
        if not is_count(self.levels):
            raise ValueError(f"levels must be an integer >= 1, got {self.levels!r}")
        for name in ("steps", "hidden_channels"):
            object.__setattr__(self, name, self._per_level(name))
        for name in ("attention_levels", "gated_levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.levels:
                raise ValueError(f"{name} must be an integer from 0 to levels ({self.levels}), got {value!r}")
        heads = self.attention_heads
        widths = {self.level_hidden_channels(i) for i in range(self.levels) if self.level_attention_heads(i)}
        if widths and (not is_count(heads) or any(width % heads for width in widths)):
            raise ValueError(f"attention_heads must be >= 1 and divide hidden_channels (at the attention levels: "
                             f"{sorted(widths)}), got {self.attention_heads}")
        scale = 2 ** self.levels
        if h % scale or w % scale:
            raise ValueError(f"H and W must be divisible by 2**levels = {scale}; got H={h}, W={w} "
                             f"with levels={self.levels}")
        if not isinstance(self.coupling_options, dict):
            raise ValueError(f"coupling_options must be a mapping of settings, got {self.coupling_options!r}")
        object.__setattr__(self, "coupling_options", coupling_class(self.coupling).check_options(self.coupling_options))
        check_choice("permutation", self.permutation, PERMUTATIONS)
        check_choice("split_prior", self.split_prior, SPLIT_PRIORS)
        check_choice("dequantization", self.dequantization, DEQUANTIZATIONS)
        if self.conditioned_couplings and not self.num_classes:
            raise ValueError("conditioned_couplings needs num_classes (the label is what they are conditioned on)")
        a = self.logit_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a < 0.5:
            raise ValueError(f"logit_alpha must be a number in [0, 0.5) (0: no logit transform), got {a!r}")
        numerics.n_bins(self.n_bits)
        total_steps = sum(self.level_steps(i) for i in range(self.levels))
        if total_steps > MAX_FLOW_STEPS:
            raise ValueError(f"steps over all levels = {total_steps} flow steps; the limit is "
                             f"{MAX_FLOW_STEPS} (the paper's largest model has 192)")
        n = self.num_parameters()
        if n > MAX_PARAMETERS:
            raise ValueError(f"this architecture would need {n:,} parameters ({4 * n / 2**30:,.0f} GiB in "
                             f"float32); the limit is {MAX_PARAMETERS:,}. Check hidden_channels, steps "
                             "and image_shape")

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    def _per_level(self, name: str) -> int | tuple[int, ...]:
        """``steps`` or ``hidden_channels`` checked: an integer >= 1 for every level, or a list of
        them with one entry per level (finest first), kept as a tuple."""
        value = getattr(self, name)
        if isinstance(value, (list, tuple)):
            if len(value) != self.levels or not all(is_count(v) for v in value):
                raise ValueError(f"{name} must be an integer >= 1 or a list of {self.levels} of them (one per "
                                 f"level, finest first), got {list(value)}")
            return tuple(value)
        if not is_count(value):
            raise ValueError(f"{name} must be an integer >= 1 (or one per level), got {value!r}")
        return value

    def level_steps(self, level: int) -> int:
        """The flow steps (K) of level ``level``, 0 the finest."""
        return self.steps[level] if isinstance(self.steps, tuple) else self.steps

    def level_hidden_channels(self, level: int) -> int:
        """The coupling networks' width at level ``level``, 0 the finest."""
        return self.hidden_channels[level] if isinstance(self.hidden_channels, tuple) else self.hidden_channels

    def _among_coarsest(self, level: int, count: int) -> bool:
        """Whether level ``level`` (0 = finest) is one of the last ``count``, the coarsest."""
        return level >= self.levels - count

    def level_attention_heads(self, level: int) -> int:
        """The self-attention heads of level ``level``'s coupling networks: the ``attention_levels``
        coarsest levels get ``attention_heads``; the others none (0)."""
        return self.attention_heads if self._among_coarsest(level, self.attention_levels) else 0

    def level_gated(self, level: int) -> bool:
        """Whether level ``level``'s coupling networks are gated: the ``gated_levels`` coarsest."""
        return self._among_coarsest(level, self.gated_levels)

    @property
    def coupling_condition_channels(self) -> int:
        """Channels of the condition the coupling networks see (0: unconditioned couplings)."""
        return self.num_classes if self.conditioned_couplings else 0

    def num_parameters(self) -> int:
        """The number of parameters :class:`~glowflow.model.Glow` builds for this config, counted on
        a copy built on the meta device (no memory is allocated, nothing is drawn)."""
        n = self.__dict__.get("_num_parameters")
        if n is None:
            with torch.device("meta"):
                n = sum(p.numel() for p in build_flow(self).parameters())
            object.__setattr__(self, "_num_parameters", n)
        return n

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("image_shape", "steps", "hidden_channels"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GlowConfig":
        if isinstance(d, dict):
            d = _upgrade_glow_dict(d)
        return config_from_dict(cls, d, "Glow config")


def _upgrade_glow_dict(d: dict) -> dict:
    """A config written by an earlier version, in today's keys: the memory mode and the class
    loss's weight are settings of a run (TrainConfig), and a mixture's components are a coupling
    option."""
    d = {k: v for k, v in d.items() if k not in ("memory", "class_loss_weight")}
    if "mixture_components" in d:
        components = d.pop("mixture_components")
        if d.get("coupling") == "mixture" and "components" not in d.get("coupling_options", {}):
            d["coupling_options"] = {**d.get("coupling_options", {}), "components": components}
    return d


_GLOW_BOUNDS = {"n_bits": (1, 8, "[]"), "num_classes": (1, None, "[)"), "noise_std": (0, 1, "[]"),
                "dequant_hidden_channels": (1, None, "[)"), "dequant_steps": (1, None, "[)")}


# ---------------------------------------------------------------------------------- TrainConfig
@dataclass(frozen=True)
class TrainConfig:
    """A training run: the model, the data and the optimisation. Presets fill it; the CLI overrides it."""

    model: GlowConfig = field(default_factory=GlowConfig)
    dataset: str = "fashion-mnist"
    data: str | None = None  # dataset root, or a prepared set; None: the dataset's default location
    train_limit: int | None = None
    test_limit: int | None = None  # test images used for evaluations during training
    augment_shift: int = 0  # random translations up to this many pixels (CIFAR-10: 2)
    augment_flip: bool = False  # mirror a random half of each batch left-right (faces)
    perturb_rate: float = 0.0  # each pixel replaced by a uniform random value with this probability (Ren et al. 2019)
    batch_size: int = 64  # global, over all ranks
    init_batch_size: int = 512  # data-dependent init batch (global)
    optimizer: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9  # the optimizer's moment decays (Adam and Adamax alike)
    beta2: float = 0.999
    warmup_steps: int = 200
    lr_decay: str = "none"  # after warm-up: "none" (constant, as the official code), "linear" or "cosine"
    lr_final: float = 0.0  # with lr_decay: the learning rate at the end of the run, as a fraction of lr
    max_steps: int = 1000
    max_minutes: float | None = None  # stop (and checkpoint) after this much training time, over all resumes
    grad_clip: float = 50.0
    ema_decay: float = 0.999
    seed: int = 0  # data order, dequantisation noise, augmentation
    class_loss_weight: float = 0.01  # class-conditional models: weight of the label's cross-entropy (bits)
    log_every: int = 10
    eval_every: int = 500
    sample_every: int = 500
    checkpoint_every: int = 500
    max_bad_steps: int = 5  # consecutive NaN/inf steps before restoring the last good checkpoint
    lr_backoff: float = 0.5  # learning-rate factor applied on each such restore
    max_recoveries: int = 10  # restores before the run gives up
    memory: str = "none"  # "none", "checkpoint" or "invertible" (memory.py)
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast, CUDA only)
    compile: bool = False
    channels_last: bool = False
    device: str = "auto"
    # under torchrun: how long a rank waits for the others in a collective (a gradient all-reduce)
    # before the run stops and names the rank that did not answer
    dist_timeout_minutes: float = DIST_TIMEOUT_MINUTES
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", GlowConfig.from_dict(self.model))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_decay", self.lr_decay, LR_DECAYS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("memory", self.memory, MEMORY_MODES)
        check_numbers(self, _TRAIN_BOUNDS)
        check_seed(self.seed)
        side = min(self.model.image_shape[1:])
        if self.augment_shift >= side:
            raise ValueError(f"augment_shift must be smaller than the image side ({side}), got {self.augment_shift}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        model = d.get("model") if isinstance(d, dict) else None
        if isinstance(model, dict):
            # written before these left the architecture: they are settings of the run
            for key in ("memory", "class_loss_weight"):
                if key in model:
                    d = {**d, "model": {k: v for k, v in model.items() if k != key}}
                    d.setdefault(key, model[key])
                    model = d["model"]
        return config_from_dict(cls, d, "training config")


# Each numeric setting's range: (low, high, interval); a setting outside it is refused by name.
_TRAIN_BOUNDS = {
    "class_loss_weight": (0, None, "[)"),
    "train_limit": (1, None, "[)"), "test_limit": (1, None, "[)"), "augment_shift": (0, None, "[)"),
    "perturb_rate": (0, 1, "[)"),  # a probability per pixel
    "batch_size": (1, None, "[)"), "init_batch_size": (1, None, "[)"),
    "lr": (0, None, "()"), "beta1": (0, 1, "[)"), "beta2": (0, 1, "[)"), "warmup_steps": (0, None, "[)"),
    "lr_final": (0, 1, "[]"),  # a fraction of lr
    "max_steps": (0, None, "[)"), "max_minutes": (0, None, "()"),
    "grad_clip": (0, None, "()"),  # <= 0 would scale every gradient to nothing or reverse it
    "ema_decay": (0, 1, "[)"),  # 1 would keep the initial weights forever; 0 is no averaging
    "log_every": (1, None, "[)"), "eval_every": (1, None, "[)"), "sample_every": (1, None, "[)"),
    "checkpoint_every": (1, None, "[)"), "max_bad_steps": (1, None, "[)"),
    "lr_backoff": (0, 1, "(]"),  # a factor on each restore: 1 keeps the rate, more would raise it
    "max_recoveries": (0, None, "[)"),
    "dist_timeout_minutes": (0, None, "()"),  # how long ranks wait for each other before the run stops
}



# -------------------------------------------------------------------------------------- presets
def build_train_config(preset: str | None, overrides: list[str] = ()) -> TrainConfig:
    """A preset (name or file), with ``key=value`` overrides applied, as a checked TrainConfig."""
    settings = load_preset(preset) if preset else {}
    settings = apply_overrides(settings, list(overrides))
    try:
        return TrainConfig.from_dict(settings)
    except TypeError as e:
        raise ValueError(f"bad training settings: {e}") from e
