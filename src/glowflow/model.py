"""Glow: the multi-scale flow, its exact likelihood, sampling, encoding and decoding."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import numerics
from .layers import FlowStep, SplitPrior, Squeeze, TopPrior
from .memory import MEMORY_MODES, run_steps

COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("invconv", "invconv_lu", "shuffle", "reverse")
SPLIT_PRIORS = ("conv", "conv+position")


def config_from_dict(cls, d: dict, what: str):
    """Build the frozen dataclass ``cls`` from plain data, refusing unknown keys and converting
    numbers written as strings (YAML reads ``1e-4`` as a string)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}; known: {sorted(fields)}")
    out = dict(d)
    for k, v in d.items():
        kind = str(fields[k].type)
        if isinstance(v, str) and kind.startswith(("float", "int")):
            try:
                out[k] = float(v) if kind.startswith("float") else int(v)
            except ValueError as e:
                raise ValueError(f"{what} {k} must be a number, got {v!r}") from e
    return cls(**out)


@dataclass(frozen=True)
class GlowConfig:
    """Everything that defines a Glow model's architecture; saved as ``config.json``."""

    image_shape: tuple[int, int, int] = (3, 32, 32)
    levels: int = 3
    steps: int = 32
    hidden_channels: int = 512
    coupling: str = "affine"
    permutation: str = "invconv"
    learn_top: bool = True
    split_prior: str = "conv"  # "conv" (the paper) or "conv+position" (adds a learned per-position term)
    num_classes: int | None = None
    n_bits: int = 8
    memory: str = "none"
    seed: int = 0
    class_loss_weight: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        c, h, w = self.image_shape if len(self.image_shape) == 3 else (None, None, None)
        if c is None or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {self.image_shape}")
        if self.levels < 1 or self.steps < 1 or self.hidden_channels < 1:
            raise ValueError(f"levels, steps and hidden_channels must be >= 1, got "
                             f"{self.levels}, {self.steps}, {self.hidden_channels}")
        scale = 2 ** self.levels
        if h % scale or w % scale:
            raise ValueError(f"H and W must be divisible by 2**levels = {scale}; got H={h}, W={w} "
                             f"with levels={self.levels}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if self.permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {self.permutation!r}")
        if self.split_prior not in SPLIT_PRIORS:
            raise ValueError(f"split_prior must be one of {SPLIT_PRIORS}, got {self.split_prior!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}")
        numerics.n_bins(self.n_bits)

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GlowConfig":
        return config_from_dict(cls, d, "Glow config")


class GlowOutput(NamedTuple):
    bits_per_dim: torch.Tensor  # [B], of the dequantised discrete images
    log_prob: torch.Tensor  # [B], nats, density of the dequantised images on [0,1]^D
    class_logits: torch.Tensor | None  # [B, num_classes] from the top latent, or None


class Level(nn.Module):
    """Squeeze, K flow steps, then (except on the last level) a split with a learned prior."""

    def __init__(self, in_channels: int, cfg: GlowConfig, last: bool, generator: torch.Generator,
                 spatial: tuple[int, int]):
        super().__init__()
        channels = 4 * in_channels
        self.squeeze = Squeeze()
        self.steps = nn.ModuleList(
            FlowStep(channels, cfg.hidden_channels, cfg.coupling, cfg.permutation, generator)
            for _ in range(cfg.steps)
        )
        self.split = None if last else SplitPrior(channels, spatial if cfg.split_prior == "conv+position" else None)
        self.out_channels = channels if last else self.split.num_keep


class Glow(nn.Module):
    """Glow (Kingma & Dhariwal, 2018) for images ``[B, C, H, W]`` with values in ``[0, 1]``.

    ``Glow(image_shape=(1, 28, 28), levels=2, steps=8, hidden_channels=128)`` or
    ``Glow(config=GlowConfig(...))``. See :class:`GlowConfig` for every option.
    """

    def __init__(self, config: GlowConfig | None = None, **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise ValueError("pass either config or keyword arguments, not both")
        self.config = config if config is not None else GlowConfig(**kwargs)
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        c, h, w = cfg.image_shape
        self.levels = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        for i in range(cfg.levels):
            last = i == cfg.levels - 1
            h, w = h // 2, w // 2
            level = Level(c, cfg, last, generator, (h, w))
            if not last:
                self.latent_shapes.append((level.split.num_out, h, w))
            self.levels.append(level)
            c = level.out_channels
        self.latent_shapes.append((c, h, w))
        self.top_prior = TopPrior((c, h, w), cfg.learn_top, cfg.num_classes)
        self.class_head = None
        if cfg.num_classes:
            self.class_head = nn.Linear(c, cfg.num_classes)
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)

    # ------------------------------------------------------------------ input checks
    @property
    def num_dims(self) -> int:
        return self.config.num_dims

    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        p = next(self.parameters())
        return p.dtype, p.device

    def _check_images(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
        expected = tuple(self.config.image_shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}; "
                             "divide uint8 images by 255")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name} must have values in [0, 1], got min {lo:.4g}, max {hi:.4g}")
        dtype, device = self._dtype_device()
        return x.to(device=device, dtype=dtype)

    def _onehot(self, y: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        k = self.config.num_classes
        if not k:
            if y is not None:
                raise ValueError("labels y were given but this model has no class-conditional prior "
                                 "(num_classes=None)")
            return None
        if y is None:
            raise ValueError(f"this model has a class-conditional prior over {k} classes: pass labels y")
        dtype, device = self._dtype_device()
        y = torch.as_tensor(y, device=device)
        if y.dim() == 1 and not y.is_floating_point():
            if y.shape[0] != batch or (y.numel() and (int(y.min()) < 0 or int(y.max()) >= k)):
                raise ValueError(f"y must be {batch} integer labels in [0, {k}), got {y.tolist()}")
            return F.one_hot(y.long(), k).to(dtype)
        if y.shape != (batch, k):
            raise ValueError(f"y must be [{batch}] integer labels or [{batch}, {k}] one-hot, got {list(y.shape)}")
        return y.to(dtype)

    # ------------------------------------------------------------------ the bijection x <-> eps
    def _encode(self, x: torch.Tensor, y_onehot: torch.Tensor | None):
        """x in [0,1]^D -> (standardised latents per scale, log|det d eps/dx| [B], top latent)."""
        z = x - 0.5
        logdet = z.new_zeros(z.shape[0])
        eps_list = []
        for level in self.levels:
            z, ld = level.squeeze(z)
            z, ld = run_steps(level.steps, z, self.config.memory)
            logdet = logdet + ld
            if level.split is not None:
                z, eps, ld = level.split(z)
                eps_list.append(eps)
                logdet = logdet + ld
        eps, ld = self.top_prior(z, y_onehot)
        eps_list.append(eps)
        return eps_list, logdet + ld, z

    def _decode(self, eps_list: list[torch.Tensor], y_onehot: torch.Tensor | None) -> torch.Tensor:
        z = self.top_prior.inverse(eps_list[-1], y_onehot)
        split_eps = iter(reversed(eps_list[:-1]))
        for level in reversed(self.levels):
            if level.split is not None:
                z = level.split.inverse(z, next(split_eps))
            for step in reversed(level.steps):
                z = step.inverse(z)
            z = level.squeeze.inverse(z)
        return z + 0.5

    def _flatten(self, eps_list: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([e.flatten(1) for e in eps_list], 1)

    def _unflatten(self, eps: torch.Tensor) -> list[torch.Tensor]:
        sizes = [math.prod(s) for s in self.latent_shapes]
        if eps.dim() != 2 or eps.shape[1] != sum(sizes):
            raise ValueError(f"latents must have shape [B, {sum(sizes)}], got {list(eps.shape)}")
        return [p.reshape(-1, *s) for p, s in zip(torch.split(eps, sizes, 1), self.latent_shapes)]

    # ------------------------------------------------------------------ public API
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> GlowOutput:
        """The training objective's pieces for 8-bit images x in [0, 1]: quantised to n_bits, then
        uniformly dequantised with ``noise`` in [0, 1) (shape of x) or noise drawn from ``generator``."""
        x = self._check_images(x)
        n_bits = self.config.n_bits
        x = numerics.dequantize(numerics.quantize(x, n_bits), n_bits, generator, noise)
        y_onehot = self._onehot(y, x.shape[0])
        eps_list, logdet, z_top = self._encode(x, y_onehot)
        log_prob = numerics.gaussian_log_prob(self._flatten(eps_list)) + logdet
        bpd = numerics.bits_per_dim(log_prob, self.num_dims, n_bits)
        logits = self.class_head(z_top.mean((2, 3))) if self.class_head is not None else None
        return GlowOutput(bpd, log_prob, logits)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density in nats of continuous images x in [0,1]^D: [B, C, H, W] -> [B]."""
        x = self._check_images(x)
        eps_list, logdet, _ = self._encode(x, self._onehot(y, x.shape[0]))
        return numerics.gaussian_log_prob(self._flatten(eps_list)) + logdet

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The paper's metric for discrete images x (8-bit values / 255): [B, C, H, W] -> [B]."""
        return self.forward(x, y, generator).bits_per_dim

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] in [0,1] -> standardised latents [B, D] (unit Gaussian under the model)."""
        x = self._check_images(x)
        eps_list, _, _ = self._encode(x, self._onehot(y, x.shape[0]))
        return self._flatten(eps_list)

    def decode(self, eps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised latents [B, D] -> images [B, C, H, W] (not clamped: the exact inverse)."""
        if not isinstance(eps, torch.Tensor):
            raise ValueError(f"latents must be a torch.Tensor [B, D], got {type(eps).__name__}")
        dtype, device = self._dtype_device()
        eps = eps.to(device=device, dtype=dtype)
        if not torch.isfinite(eps).all():
            raise ValueError("latents contain NaN or inf")
        eps_list = self._unflatten(eps)
        return self._decode(eps_list, self._onehot(y, eps.shape[0]))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7, y: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images [n, C, H, W] in [0, 1]: decode of N(0, temperature^2 I) latents."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        dtype, device = self._dtype_device()
        gen_device = generator.device if generator is not None else device
        eps = torch.randn(n, sum(math.prod(s) for s in self.latent_shapes), generator=generator,
                          device=gen_device, dtype=dtype).to(device)
        return self.decode(eps * temperature, y).clamp_(0.0, 1.0)

    @property
    def initialized(self) -> bool:
        """True once data-dependent init (the first forward pass) has run."""
        # self is skipped: hasattr(self, "initialized") would call this property again, forever.
        flags = [m.initialized for m in self.modules()
                 if m is not self and isinstance(getattr(m, "initialized", None), torch.Tensor)]
        return all(bool(f) for f in flags)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> None:
        """Data-dependent init of every actnorm from one (preferably large) batch."""
        self.forward(x, y, generator)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` atomically."""
        from .checkpoint import save_model
        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory, map_location: str | torch.device = "cpu") -> "Glow":
        from .checkpoint import load_model
        return load_model(directory, map_location)
