"""The networks inside the couplings: plain PyTorch modules, ``[B, C_in, H, W] -> [B, C_out, H, W]``.

:class:`CouplingNet` is Glow's: 3x3 conv -> actnorm -> ReLU -> 1x1 conv -> actnorm -> ReLU ->
zero-initialised 3x3 conv, optionally with gates in place of the ReLUs and a self-attention block
before the last convolution. CPU fast paths that compute the same thing faster live in
:mod:`glowflow.fast`; nothing here knows about them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ActNorm, ZeroConv2d

__all__ = ["NormedConv", "SelfAttention", "CouplingNet"]

class NormedConv(nn.Module):
    """Conv (no bias) followed by actnorm and ReLU: the hidden layers of the coupling network.

    ``gated=True``: the convolution has twice the outputs and a gate takes the place of the ReLU,
    ``a * sigmoid(b)`` for the two halves ``(a, b)`` (a gated linear unit, Dauphin et al. 2017, as
    in Flow++'s coupling networks): each output channel learns how much of itself to pass.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, generator=None, gated: bool = False):
        super().__init__()
        conv_out = 2 * out_channels if gated else out_channels
        self.conv = nn.Conv2d(in_channels, conv_out, kernel_size, padding=kernel_size // 2, bias=False)
        with torch.no_grad():
            self.conv.weight.normal_(0.0, 0.05, generator=generator)
        self.norm = ActNorm(conv_out)
        self.gated = gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.norm(self.conv(x))
        return F.glu(h, 1) if self.gated else F.relu(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over an image's positions, added to its input:
    ``h + W_out attention(W_q h, W_k h, W_v h)``, ``[B, C, H, W] -> [B, C, H, W]``.

    Every position sees every other one, where a 3x3 network sees a 3x3 neighbourhood per
    convolution. ``W_out`` starts at zero, so the block starts as the identity and a network
    with it computes what one without it would.
    """

    def __init__(self, channels: int, heads: int, generator=None):
        super().__init__()
        if heads < 1 or channels % heads:
            raise ValueError(f"attention heads must divide the hidden channels ({channels}), got {heads}")
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.out = nn.Linear(channels, channels)
        with torch.no_grad():
            self.qkv.weight.normal_(0.0, channels ** -0.5, generator=generator)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        tokens = h.permute(0, 2, 3, 1).reshape(b, height * width, c)
        q, k, v = self.qkv(tokens).view(b, height * width, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, height * width, c)
        return h + self.out(a).view(b, height, width, c).permute(0, 3, 1, 2)


class CouplingNet(nn.Module):
    """3x3 conv -> actnorm -> ReLU -> 1x1 conv -> actnorm -> ReLU [-> self-attention] ->
    zero-initialised 3x3 conv. ``attention_heads=0``: no attention block; ``gated=True``: gates
    in place of both ReLUs (see :class:`NormedConv`)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, generator=None,
                 attention_heads: int = 0, gated: bool = False):
        super().__init__()
        layers = [NormedConv(in_channels, hidden_channels, 3, generator, gated),
                  NormedConv(hidden_channels, hidden_channels, 1, generator, gated)]
        if attention_heads:
            layers.append(SelfAttention(hidden_channels, attention_heads, generator))
        self.net = nn.Sequential(*layers, ZeroConv2d(hidden_channels, out_channels, 3))

    @property
    def plain(self) -> bool:
        """3x3 conv -> ReLU -> 1x1 conv -> ReLU -> 3x3 conv: no attention block, no gates."""
        return len(self.net) == 3 and not self.net[0].gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
