"""Glow: the multi-scale flow, its exact likelihood, sampling, encoding and decoding.

The model is a loop over :class:`~glowflow.layers.Level` s (squeeze, K steps of flow, split) and a
top prior. Encoding runs the levels forward and collects the standardised latents each split hands
out; decoding runs them backward. Nothing here knows a layer's internals.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import fast, hub, io, numerics
from .blocks import build_flow
from .config import GlowConfig
from .dequantization import gaussian_from_uniform
from .layers import STABLE_SCALE_FLOOR, ActNorm, inverse_scale_floor
from .memory import MEMORY_MODES

__all__ = ["Glow", "GlowConfig", "GlowOutput"]


def _given(block, condition) -> dict:
    """The condition as a keyword for a block that takes one."""
    return {"condition": condition} if block.takes_condition else {}


class GlowOutput(NamedTuple):
    bits_per_dim: torch.Tensor  # [B], of the dequantised discrete images (a bound: see numerics)
    log_prob: torch.Tensor  # [B], nats, density of the dequantised images on [0,1]^D
    class_logits: torch.Tensor | None  # [B, num_classes] from the top latent, or None
    dequant_log_prob: torch.Tensor | None = None  # [B], log q(u | x) of a variational dequantizer


class Glow(nn.Module):
    """Glow (Kingma & Dhariwal, 2018) for images ``[B, C, H, W]`` with values in ``[0, 1]``.

    ``Glow(image_shape=(1, 28, 28), levels=2, steps=8, hidden_channels=128)`` or
    ``Glow(config=GlowConfig(...))``; see :class:`~glowflow.config.GlowConfig` for every option.
    ``memory`` ("none", "checkpoint" or "invertible") is how gradients are computed, not part of
    the architecture; it can be changed at any time (``model.memory = "invertible"``).

    Example::

        >>> model = Glow(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=8)
        >>> x = torch.rand(4, 1, 8, 8)
        >>> model.initialize(x)
        >>> model.bits_per_dim(x).shape
        torch.Size([4])
        >>> bool((model.decode(model.encode(x, quantized=False)) - x).abs().max() < 1e-4)
        True
    """

    def __init__(self, config: GlowConfig | None = None, memory: str = "none", **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise ValueError("pass either config or keyword arguments, not both")
        self.config = config if config is not None else GlowConfig(**kwargs)
        modules = build_flow(self.config, torch.Generator().manual_seed(self.config.seed))
        self.levels = modules["levels"]
        self.top_prior = modules["top_prior"]
        self.class_head = modules["class_head"] if "class_head" in modules else None
        self.dequantizer = modules["dequantizer"] if "dequantizer" in modules else None
        self.latent_shapes: list[tuple[int, int, int]] = [
            (level.split.num_out, *level.out_shape[1:]) for level in self.levels if level.split is not None]
        self.latent_shapes.append(self.levels[-1].out_shape)
        self.memory = memory

    # ------------------------------------------------------------------ settings
    @property
    def memory(self) -> str:
        """How gradients through the flow steps are computed: see :mod:`glowflow.memory`."""
        return self._memory

    @memory.setter
    def memory(self, mode: str) -> None:
        if mode not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {mode!r}")
        self._memory = mode
        for level in self.levels:
            level.steps.memory = mode

    @property
    def num_dims(self) -> int:
        return self.config.num_dims

    @property
    def initialized(self) -> bool:
        """True once data-dependent init (:meth:`initialize`, or the first forward pass) has run."""
        return all(m.is_initialized for m in self.modules() if isinstance(m, ActNorm))

    def require_initialized(self) -> None:
        """Raise ``ValueError`` unless data-dependent init has run. Editing and serving need it: an
        uninitialised actnorm would initialise itself from the first image it sees, silently
        changing the model."""
        if not self.initialized:
            raise ValueError("the model has not been initialised (no data-dependent init has run): load a "
                             "trained checkpoint, or call model.initialize(x) on a batch first")

    # ------------------------------------------------------------------ input checks
    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        p = next(self.parameters())
        return p.dtype, p.device

    def _check_images(self, x: torch.Tensor, name: str = "x", any_values: bool = False) -> torch.Tensor:
        """``x`` checked (shape, float, finite, values in [0, 1] unless ``any_values``) and moved to
        the model's dtype and device."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
        expected = tuple(self.config.image_shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {list(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} holds no images (shape {list(x.shape)}); pass a batch of at least one")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}; "
                             "divide uint8 images by 255 (glowflow.numerics.to_unit)")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if not any_values and (lo < 0.0 or hi > 1.0):
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
    def _encode(self, x: torch.Tensor, condition: torch.Tensor | None):
        """x in [0,1]^D -> (standardised latents per scale, log|det d eps/dx| [B], top latent).
        ``condition`` goes to the blocks that take one (the top prior of a class-conditional
        model, conditioned couplings)."""
        z, logdet = numerics.to_flow_input(x, self.config.logit_alpha)
        eps_list = []
        for level in self.levels:
            z, ld = fast.level_forward(level, z, **_given(level, condition))
            z, eps = level.separate(z)
            if eps is not None:
                eps_list.append(eps)
            logdet = logdet + ld
        eps, ld = self.top_prior(z, **_given(self.top_prior, condition))
        eps_list.append(eps)
        return eps_list, logdet + ld, z

    def _decode(self, eps_list: list[torch.Tensor], condition: torch.Tensor | None) -> torch.Tensor:
        """Latents per scale -> the flow's input (:func:`~glowflow.numerics.to_flow_input`)."""
        z = self.top_prior.inverse(eps_list[-1], **_given(self.top_prior, condition))
        split_eps = iter(reversed(eps_list[:-1]))
        for level in reversed(self.levels):
            if level.split is not None:
                z = torch.cat([z, next(split_eps)], 1)
            z = fast.level_inverse(level, z, **_given(level, condition))
        return z

    def _flatten(self, eps_list: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([e.flatten(1) for e in eps_list], 1)

    def _unflatten(self, eps: torch.Tensor) -> list[torch.Tensor]:
        sizes = [math.prod(s) for s in self.latent_shapes]
        if eps.dim() != 2 or eps.shape[1] != sum(sizes):
            raise ValueError(f"latents must have shape [B, {sum(sizes)}], got {list(eps.shape)}")
        return [p.reshape(-1, *s) for p, s in zip(torch.split(eps, sizes, 1), self.latent_shapes)]

    # ------------------------------------------------------------------ public API
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                gaussian: torch.Tensor | None = None) -> GlowOutput:
        """The training objective's pieces for 8-bit images x in [0, 1]: quantised to n_bits, then
        dequantised with ``noise`` in [0, 1) (shape of x) or noise drawn from ``generator``: uniformly
        (``x_bins + noise``), or with ``dequantization="variational"`` through the learned q(u | x),
        whose Gaussian noise is made from the same uniform draws.

        A model of noisy images (``config.noise_std`` > 0) then adds ``noise_std`` times
        ``gaussian`` (standard normal draws, shape of x) or draws from ``generator``: its density,
        and so its bits/dim, is that of the noisy images."""
        x = self._check_images(x)
        n_bits = self.config.n_bits
        x_bins = numerics.quantize(x, n_bits)
        log_q = None
        if self.dequantizer is None:
            x = numerics.dequantize(x_bins, n_bits, generator, noise)
        else:
            if noise is None:
                gen_device = generator.device if generator is not None else x.device
                noise = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
            u, log_q = self.dequantizer(x_bins / numerics.n_bins(n_bits) - 0.5,
                                        gaussian_from_uniform(noise.to(device=x.device, dtype=x.dtype)))
            x = numerics.dequantize(x_bins, n_bits, noise=u)
        if self.config.noise_std:
            if gaussian is None:
                gen_device = generator.device if generator is not None else x.device
                gaussian = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
            x = x + self.config.noise_std * gaussian.to(device=x.device, dtype=x.dtype)
        y_onehot = self._onehot(y, x.shape[0])
        eps_list, logdet, z_top = self._encode(x, y_onehot)
        log_prob = numerics.gaussian_log_prob(self._flatten(eps_list)) + logdet
        bpd = numerics.bits_per_dim(log_prob, self.num_dims, n_bits, log_q)
        logits = self.class_head(z_top.mean((2, 3))) if self.class_head is not None else None
        return GlowOutput(bpd, log_prob, logits, log_q)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density in nats of continuous images x in [0,1]^D: [B, C, H, W] -> [B]. A model of
        noisy images (``config.noise_std`` > 0) is a density of noisy images, which leave [0, 1]: it
        takes any finite values."""
        x = self._check_images(x, any_values=bool(self.config.noise_std))
        eps_list, logdet, _ = self._encode(x, self._onehot(y, x.shape[0]))
        return numerics.gaussian_log_prob(self._flatten(eps_list)) + logdet

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's metric for discrete images x (8-bit values / 255): [B, C, H, W] -> [B]."""
        return self.forward(x, y, generator, noise).bits_per_dim

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, quantized: bool = True) -> torch.Tensor:
        """Images [B, C, H, W] in [0,1] -> standardised latents [B, D] (unit Gaussian under the model).

        ``quantized`` (the default): ``x`` holds images of ``n_bits`` (8-bit values / 255, what
        every image file holds), each value read as the centre of its quantisation bin
        (:func:`~glowflow.numerics.bin_centre`), where training put its mass; ``decode`` returns
        those centres, which round back to ``x``'s pixel values. Without it the latents of real
        images lie off the data the flow was trained on: under a logit input a black pixel maps to
        the logit's extreme, and edits of such latents decode to noise. ``quantized=False``: ``x``
        is a continuous point, and ``decode(encode(x))`` is ``x`` itself.
        """
        x = self._check_images(x)
        if quantized:
            x = numerics.bin_centre(x, self.config.n_bits)
        eps_list, _, _ = self._encode(x, self._onehot(y, x.shape[0]))
        return self._flatten(eps_list)

    def decode(self, eps: torch.Tensor, y: torch.Tensor | None = None, scale_floor: float = 0.0,
               flow_input: bool = False) -> torch.Tensor:
        """Standardised latents [B, D] -> images [B, C, H, W] (not clamped: the exact inverse).

        ``scale_floor`` > 0 bounds the affine and mixture couplings' inverse
        (:func:`~glowflow.layers.inverse_scale_floor`), for latents far from the data; the latents
        of data decode as without it. ``flow_input=True`` returns what the flow's first step sees
        instead of the image (``x - 0.5``, or the logit with ``logit_alpha``), where a decode that
        left the data shows as values far outside the data's range even when the logit's inverse
        would squash them into [0, 1].
        """
        if not isinstance(eps, torch.Tensor):
            raise ValueError(f"latents must be a torch.Tensor [B, D], got {type(eps).__name__}")
        if eps.is_complex() or not (eps.is_floating_point() or eps.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"latents must be real numbers, got dtype {eps.dtype}")
        dtype, device = self._dtype_device()
        eps = eps.to(device=device, dtype=dtype)
        if not torch.isfinite(eps).all():
            raise ValueError("latents contain NaN or inf")
        if eps.dim() >= 1 and eps.shape[0] == 0:
            raise ValueError(f"latents hold no rows (shape {list(eps.shape)}); pass at least one")
        eps_list = self._unflatten(eps)
        with inverse_scale_floor(scale_floor):
            z = self._decode(eps_list, self._onehot(y, eps.shape[0]))
        return z if flow_input else numerics.from_flow_input(z, self.config.logit_alpha)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7, y: torch.Tensor | None = None,
               generator: torch.Generator | None = None, scale_floor: float = STABLE_SCALE_FLOOR) -> torch.Tensor:
        """``n`` images [n, C, H, W] in [0, 1]: decode of N(0, temperature^2 I) latents.

        The affine couplings' inverse divides by scales that, at temperatures near 1 on a model that
        has memorised a small set, fall below 1e-6 for a few latents and overflow the decode to inf.
        ``scale_floor`` (:data:`~glowflow.layers.STABLE_SCALE_FLOOR`) bounds the division, which
        changes only such latents' images (those of data decode as without it); 0 decodes exactly.
        """
        return self.decode(self.draw_latents(n, temperature, generator), y, scale_floor=scale_floor).clamp_(0.0, 1.0)

    def draw_latents(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` latents ``[n, D]`` from N(0, temperature^2 I), the ones :meth:`sample` decodes."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        dtype, device = self._dtype_device()
        gen_device = generator.device if generator is not None else device
        eps = torch.randn(n, sum(math.prod(s) for s in self.latent_shapes), generator=generator,
                          device=gen_device, dtype=dtype).to(device)
        return eps * temperature

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                   gaussian: torch.Tensor | None = None) -> None:
        """Data-dependent init of every actnorm from one (preferably large) batch."""
        self.forward(x, y, generator, noise, gaussian)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory, card: Mapping | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``checksums.json`` into ``directory``
        atomically. With ``card`` (a dict of registry fields, :data:`glowflow.hub.CARD_FIELDS`: the
        dataset, test bits/dim, licences, ``name``, ``repo_id``, ...; ``{}`` for none) a Hugging Face
        Hub model card ``README.md`` is written with them, so the folder is ready for ``hf upload``;
        the image shape, bit depth, parameter count and the weights' size and SHA-256 come from the
        model itself. A card with an unknown field is refused and ``directory`` left as it was."""
        with ckpt.checkpoint_directory(directory) as tmp:
            ckpt.write_model_files(tmp, self.config.to_dict(), self.state_dict())
            if card is not None:
                weights = tmp / ckpt.WEIGHTS_NAME
                fields = {**card, "image_shape": list(self.config.image_shape), "n_bits": self.config.n_bits,
                          "parameters": sum(p.numel() for p in self.parameters()),
                          "size_bytes": weights.stat().st_size, "sha256": io.file_sha256(weights)}
                name = fields.get("name") or Path(directory).resolve().name
                (tmp / hub.CARD_NAME).write_text(hub.model_card(fields, name), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory, map_location: str | torch.device = "cpu",
                        weights_name: str = ckpt.WEIGHTS_NAME, memory: str = "none") -> "Glow":
        """A model from a checkpoint directory (or a run directory holding ``checkpoint/``, the
        name of a model glowflow ships: :mod:`glowflow.pretrained`, or a Hugging Face Hub id
        ``owner/name[@revision]``: :mod:`glowflow.hub`), in eval mode on ``map_location``. Config,
        weights and checksums are all checked."""
        directory = ckpt.resolve_model_dir(directory)
        try:
            config = GlowConfig.from_dict(ckpt.read_config(directory))
        except ckpt.CheckpointError:
            raise
        except (ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"bad config in {directory / ckpt.CONFIG_NAME}: {e}") from None
        model = cls(config=config, memory=memory)
        ckpt.load_state_into(model, ckpt.load_tensors(directory / weights_name), directory / weights_name)
        return model.to(map_location).eval()
