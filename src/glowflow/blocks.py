"""Glow's blocks, each built from the architecture config and its level's index.

A :class:`FlowStep` is actnorm -> permutation -> coupling; a :class:`Level` is squeeze -> K flow
steps -> split (none on the last level). :func:`build_flow` makes all of a model's modules from a
:class:`~glowflow.config.GlowConfig`: :class:`~glowflow.model.Glow` registers them, and the config
counts their parameters by building them on the meta device, so that there is one description of
the architecture.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .couplings import coupling_class
from .dequantization import VariationalDequantizer
from .layers import ActNorm, Chain, InvConv1x1, Permute, SplitPrior, Squeeze, TopPrior

__all__ = ["FlowStep", "Level", "build_flow", "level_channels", "PERMUTATIONS"]

PERMUTATIONS = ("invconv", "invconv_lu", "shuffle", "reverse")


def level_channels(config, level: int) -> int:
    """The channels inside level ``level`` (0 the finest), after its squeeze."""
    c = config.image_shape[0]
    for _ in range(level):
        c = 4 * c
        c = c - c // 2  # what the split keeps
    return 4 * c


def _permutation(name: str, channels: int, generator) -> nn.Module:
    if name in ("invconv", "invconv_lu"):
        return InvConv1x1(channels, lu=name == "invconv_lu", generator=generator)
    if name in ("shuffle", "reverse"):
        return Permute(channels, name, generator)
    raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {name!r}")


class FlowStep(Chain):
    """One step of flow at level ``level``: actnorm -> permutation (1x1 conv, shuffle or reverse)
    -> coupling (``config.coupling``, with ``config.coupling_options``)."""

    def __init__(self, config, level: int, generator: torch.Generator | None = None):
        super().__init__()
        channels = level_channels(config, level)
        self.actnorm = ActNorm(channels)
        self.permute = _permutation(config.permutation, channels, generator)
        self.coupling = coupling_class(config.coupling)(
            channels, config.level_hidden_channels(level), generator=generator,
            condition_channels=config.coupling_condition_channels, attention_heads=config.level_attention_heads(level),
            gated=config.level_gated(level), **config.coupling_options)


class Level(Chain):
    """One scale of the multi-scale architecture: squeeze, K flow steps, then (except on the last
    level) a split whose second half leaves the flow. ``[B, C, H, W] -> [B, 4C, H/2, W/2]``.

    The steps run under the level's memory mode (``level.steps.memory``).
    """

    def __init__(self, config, level: int, generator: torch.Generator | None = None):
        super().__init__()
        channels = level_channels(config, level)
        last = level == config.levels - 1
        h, w = (s // 2 ** (level + 1) for s in config.image_shape[1:])
        self.squeeze = Squeeze()
        self.steps = Chain(*(FlowStep(config, level, generator) for _ in range(config.level_steps(level))))
        self.split = None if last else SplitPrior(channels, (h, w) if config.split_prior == "conv+position" else None)
        self.out_channels = channels if last else self.split.num_keep  # what goes on to the next level
        self.out_shape = (self.out_channels, h, w)

    def separate(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This level's output -> (what goes on to the next level, the latent that leaves here or None)."""
        return (y, None) if self.split is None else self.split.separate(y)


def build_flow(config, generator: torch.Generator | None = None) -> nn.ModuleDict:
    """All of a Glow model's modules for ``config``: ``levels``, ``top_prior`` and, where the config
    asks for them, ``class_head`` and ``dequantizer``. Random initial weights come from
    ``generator``, drawn in a fixed order."""
    levels = nn.ModuleList(Level(config, i, generator) for i in range(config.levels))
    top = levels[-1].out_shape
    modules = nn.ModuleDict({"levels": levels,
                             "top_prior": TopPrior(top, config.learn_top, config.num_classes)})
    if config.num_classes:
        head = nn.Linear(top[0], config.num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        modules["class_head"] = head
    if config.dequantization == "variational":
        modules["dequantizer"] = VariationalDequantizer(config.image_shape[0], config.dequant_hidden_channels,
                                                        config.dequant_steps)
    return modules
