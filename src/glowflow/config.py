"""Configuration: the architecture (:class:`GlowConfig`), a training run (:class:`TrainConfig`),
presets (JSON or YAML data) and command-line overrides, and the one dict -> dataclass helper.

Both configs are frozen dataclasses checked when built, so a bad value fails where it enters (a
preset, a ``--set``, a ``config.json``) with a message naming the key, not deep inside a layer.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import io, numerics

__all__ = ["GlowConfig", "TrainConfig", "config_from_dict", "list_presets", "load_preset", "apply_overrides",
           "build_train_config", "COUPLINGS", "PERMUTATIONS", "SPLIT_PRIORS", "MEMORY_MODES", "LR_DECAYS",
           "OPTIMIZERS", "PRECISIONS", "DEQUANTIZATIONS", "MAX_PARAMETERS", "MAX_FLOW_STEPS",
           "MIXTURE_COMPONENTS", "MAX_IMAGE_DIMS", "SEED_RANGE", "coupling_outputs", "check_seed"]

COUPLINGS = ("affine", "additive", "mixture")  # mixture: Flow++'s mixture-of-logistics coupling
MIXTURE_COMPONENTS = 4  # the default logistics per element of a mixture coupling (Flow++ used 32)
PERMUTATIONS = ("invconv", "invconv_lu", "shuffle", "reverse")
SPLIT_PRIORS = ("conv", "conv+position")  # the paper's; and one with a learned per-position term
MEMORY_MODES = ("none", "checkpoint", "invertible")  # see memory.py
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
# Seeds go into torch.Generator.manual_seed, also multiplied by step counts (train.step_generator):
# 32 bits keep every derived seed inside 64.
SEED_RANGE = (0, 2**32 - 1)

PRESET_DIR = Path(__file__).parent / "presets"
PRESET_SUFFIXES = (".json", ".yaml", ".yml")


# ----------------------------------------------------------------------------- dict -> dataclass
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """``value`` as the annotated type ``tp``, or a ValueError naming ``key``. Numbers written as
    strings (YAML reads ``1e-4`` as a string) and integral floats (JSON's ``1e7``) are converted;
    ``true`` is not a number."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as e:
                # a list is reported against the list form (int | tuple[int, ...]: the bad entry)
                if isinstance(value, (list, tuple)) and typing.get_origin(option) is tuple:
                    errors.insert(0, str(e))
                else:
                    errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key} must not be null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
            args = (args[0],) * len(value)
        if len(args) != len(value):
            raise ValueError(f"{key} must have {len(args)} entries, got {list(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        v = value
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{key} must be a{'n integer' if tp is int else ' number'}, got {value!r}")
        if tp is int:
            if not (math.isfinite(v) and float(v).is_integer()):
                raise ValueError(f"{key} must be an integer, got {value!r}")
            return int(v)
        return float(v)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a group of settings, got {value!r}")
        return tp.from_dict(value)
    return value


def config_from_dict(cls, d: dict, what: str):
    """Build the frozen dataclass ``cls`` from plain data (a preset, a JSON file), refusing unknown
    keys and values of the wrong type with a message that names them."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a mapping of settings, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}; known: {sorted(names)}")
    out = {k: _coerce(v, hints[k], k) for k, v in d.items()}
    return cls(**out)


def check_seed(seed, name: str = "seed") -> int:
    """A seed as an int in :data:`SEED_RANGE`, or a ValueError naming it."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high:,} (2**32 - 1), got {seed!r}")
    return seed


def _numeric_options(tp) -> tuple[type, ...]:
    """The number types a field annotation admits (``int``, ``float``), with NoneType if optional."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return tuple(t for t in options if t in (int, float, type(None)))


def check_numbers(obj, bounds: dict[str, tuple]) -> None:
    """Every number field of the dataclass ``obj`` has its declared type (an ``int`` field takes no
    1.5 and no ``True``) and is finite; those in ``bounds`` (name -> ``(low, high, interval)``,
    ``interval`` one of ``"[]"``, ``"[)"``, ``"(]"``, ``"()"``, None for no bound) lie within.
    Called where a config is made, so a value that would train backwards or silently do nothing
    (``grad_clip=-1``, ``ema_decay=1``) never reaches the loop."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        options = _numeric_options(hints[f.name])
        value = getattr(obj, f.name)
        if not options or options == (type(None),) or (value is None and type(None) in options):
            continue
        if isinstance(value, (list, tuple)) and typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType):
            continue  # an int | tuple field (steps per level): checked by its own rule
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (float not in options and not isinstance(value, int)):
            kind = "an integer" if float not in options else "a number"
            raise ValueError(f"{f.name} must be {kind}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if f.name in bounds:
            low, high, interval = bounds[f.name]
            above = low is None or (value >= low if interval[0] == "[" else value > low)
            below = high is None or (value <= high if interval[1] == "]" else value < high)
            if not (above and below):
                where = f"{interval[0]}{'-inf' if low is None else low}, {'inf' if high is None else high}{interval[1]}"
                raise ValueError(f"{f.name} must be in {where}, got {value!r}")


# ----------------------------------------------------------------------------------- GlowConfig
def _is_count(value) -> bool:
    """An integer >= 1 (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


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
    class_loss_weight: float = 0.01
    dequantization: str = "uniform"  # "uniform" or "variational" (a learned q(u|x), Flow++)
    dequant_hidden_channels: int = 32  # width of the variational dequantizer's networks
    dequant_steps: int = 2  # its conditional couplings
    mixture_components: int = MIXTURE_COMPONENTS  # used only by coupling="mixture"
    attention_levels: int = 0  # the coarsest levels whose coupling networks get self-attention (0: none)
    attention_heads: int = 4  # its heads; they must divide hidden_channels
    gated_levels: int = 0  # the coarsest levels whose coupling networks gate in place of ReLU (0: none)
    logit_alpha: float = 0.0  # 0: the flow sees x - 0.5 (the paper); a in (0, 0.5): logit(a + (1 - 2a) x) (RealNVP)

    def __post_init__(self):
        shape = self.image_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 3 or not all(_is_count(s) for s in shape):
            raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {shape}")
        object.__setattr__(self, "image_shape", tuple(int(s) for s in shape))
        if math.prod(self.image_shape) > MAX_IMAGE_DIMS:
            raise ValueError(f"image_shape {list(self.image_shape)} has {math.prod(self.image_shape):,} values per "
                             f"image; the limit is {MAX_IMAGE_DIMS:,} (a 4096x4096 RGB image)")
        check_numbers(self, _GLOW_BOUNDS)
        check_seed(self.seed)
        _, h, w = self.image_shape
        for name in ("levels", "mixture_components"):
            if not _is_count(getattr(self, name)):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("steps", "hidden_channels"):
            object.__setattr__(self, name, self._per_level(name))
        for name in ("attention_levels", "gated_levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.levels:
                raise ValueError(f"{name} must be an integer from 0 to levels ({self.levels}), got {value!r}")
        heads = self.attention_heads
        widths = {self.level_hidden_channels(i) for i in range(self.levels) if self.level_attention_heads(i)}
        if widths and (not _is_count(heads) or any(width % heads for width in widths)):
            raise ValueError(f"attention_heads must be >= 1 and divide hidden_channels (at the attention levels: "
                             f"{sorted(widths)}), got {self.attention_heads}")
        scale = 2 ** self.levels
        if h % scale or w % scale:
            raise ValueError(f"H and W must be divisible by 2**levels = {scale}; got H={h}, W={w} "
                             f"with levels={self.levels}")
        _choice("coupling", self.coupling, COUPLINGS)
        _choice("permutation", self.permutation, PERMUTATIONS)
        _choice("split_prior", self.split_prior, SPLIT_PRIORS)
        _choice("dequantization", self.dequantization, DEQUANTIZATIONS)
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
            if len(value) != self.levels or not all(_is_count(v) for v in value):
                raise ValueError(f"{name} must be an integer >= 1 or a list of {self.levels} of them (one per "
                                 f"level, finest first), got {list(value)}")
            return tuple(value)
        if not _is_count(value):
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

    def num_parameters(self) -> int:
        """The number of parameters :class:`~glowflow.model.Glow` builds for this config, counted
        without building it (the tests check it against the built model)."""
        c, h, w = self.image_shape
        total = 0
        for level in range(self.levels):
            width = self.level_hidden_channels(level)
            c, h, w = 4 * c, h // 2, w // 2
            passed, changed = c - c // 2, c // 2
            out = coupling_outputs(self.coupling, changed, self.mixture_components)
            permutation = {"invconv": c * c, "invconv_lu": 2 * c * c + c}.get(self.permutation, 0)
            gate = 2 if self.level_gated(level) else 1  # a gated hidden layer has twice the outputs
            net = gate * (9 * passed * width + 2 * width + width * width + 2 * width) + 9 * width * out + 2 * out
            if self.level_attention_heads(level):
                net += 4 * width * width + width  # query, key and value maps, output map and its bias
            total += self.level_steps(level) * (2 * c + permutation + net)
            if level < self.levels - 1:
                keep, leave = c - c // 2, c // 2
                total += 9 * keep * 2 * leave + 2 * 2 * leave
                if self.split_prior == "conv+position":
                    total += 2 * leave * h * w
                c = keep
        if self.learn_top:
            total += 2 * c * h * w
        if self.num_classes:
            total += (self.num_classes + 1) * 2 * c + (c + 1) * self.num_classes
        if self.dequantization == "variational":
            c4, h = 4 * self.image_shape[0], self.dequant_hidden_channels
            total += 9 * c4 * h + h + 9 * h * h + h  # the context network
            for i in range(self.dequant_steps):
                passed = c4 // 2 if i % 2 == 1 else c4 - c4 // 2
                out = 2 * (c4 - passed)
                total += 9 * (passed + h) * h + 2 * h + h * h + 2 * h + 9 * h * out + 2 * out
        return total

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("image_shape", "steps", "hidden_channels"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GlowConfig":
        if isinstance(d, dict) and "memory" in d:  # written before the memory mode left the architecture
            d = {k: v for k, v in d.items() if k != "memory"}
        return config_from_dict(cls, d, "Glow config")


_GLOW_BOUNDS = {"n_bits": (1, 8, "[]"), "num_classes": (1, None, "[)"), "class_loss_weight": (0, None, "[)"),
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
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_decay", self.lr_decay, LR_DECAYS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("memory", self.memory, MEMORY_MODES)
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
        if isinstance(model, dict) and "memory" in model:
            # written before the memory mode left the architecture: it is a setting of the run
            d = {**d, "model": {k: v for k, v in model.items() if k != "memory"}}
            d.setdefault("memory", model["memory"])
        return config_from_dict(cls, d, "training config")


# Each numeric setting's range: (low, high, interval); a setting outside it is refused by name.
_TRAIN_BOUNDS = {
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
def coupling_outputs(kind: str, num_change: int, components: int = MIXTURE_COMPONENTS) -> int:
    """Output channels of the network of a coupling (``kind`` in COUPLINGS) that changes
    ``num_change`` channels: a shift; a scale unless additive; a mixture's weights, locations and
    log-scales per component."""
    per_channel = {"additive": 1, "affine": 2, "mixture": 3 * components + 2}[kind]
    return per_channel * num_change


def list_presets() -> dict[str, str]:
    """Name -> one-line description of every preset shipped with the package."""
    out = {}
    for path in sorted(PRESET_DIR.iterdir()):
        if path.suffix in PRESET_SUFFIXES:
            out[path.stem] = " ".join(str(_read(path).get("description", "")).split())
    return out


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
        data = io.parse_json(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"preset {path} is not valid {path.suffix[1:].upper()}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"preset {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_preset(name_or_path: str) -> dict:
    """A shipped preset by name (``fashion-mnist-cpu``) or any JSON/YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        candidates = [PRESET_DIR / f"{name_or_path}{s}" for s in PRESET_SUFFIXES]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise ValueError(f"unknown preset {name_or_path!r}: not a file, and not one of "
                             f"{', '.join(list_presets())}")
    data = _read(path)
    data.pop("description", None)
    return data


def apply_overrides(settings: dict, overrides: list[str]) -> dict:
    """``["lr=1e-4", "model.steps=16"]`` -> a copy of ``settings`` with those keys set (YAML values)."""
    out = json.loads(json.dumps(settings))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. model.steps=16)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({e})") from None
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a group of settings")
        if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
            raise ValueError(f"override {item!r}: {key} is a group of settings; set one of its keys, "
                             f"e.g. {key}.{next(iter(node[leaf]), 'steps')}=...")
        node[leaf] = value
    return out


def build_train_config(preset: str | None, overrides: list[str] = ()) -> TrainConfig:
    """A preset (name or file), with ``key=value`` overrides applied, as a checked TrainConfig."""
    settings = load_preset(preset) if preset else {}
    settings = apply_overrides(settings, list(overrides))
    try:
        return TrainConfig.from_dict(settings)
    except TypeError as e:
        raise ValueError(f"bad training settings: {e}") from e
