"""3x3 convolutions with one thin side, as a 1x1 convolution plus shifted copies of the thin side.

The coupling networks' first convolution maps a few channels to many (2 -> 128 on Fashion-MNIST's
first level) and their last maps many to a few (128 -> 4). On CPU, oneDNN runs such shapes at
about half the FLOP rate it reaches on a 1x1 convolution of the wide side. Written differently,
most of the work becomes that 1x1 kind:

- few -> many: stack the 9 shifted copies of the thin input (``[B, 9 C, H, W]``, cheap because
  C is small), then one 1x1 convolution from 9 C channels;
- many -> few: one 1x1 convolution to 9 C_out channels (one per kernel tap), then add the 9
  taps back shifted into place.

Same sums, in a different order: the results equal ``F.conv2d(x, w, b, padding=1)`` up to float
rounding (tests/test_convs.py checks values and gradients in float64). The shift steps are
autograd Functions whose backward is the other shift step (they are each other's adjoint), so
backward never builds the nine zero-padded gradient buffers that slicing would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_TAPS = [(dh, dw) for dh in (-1, 0, 1) for dw in (-1, 0, 1)]  # kernel taps, (kh, kw) row-major
_CENTRE = _TAPS.index((0, 0))


def shifted_copies(x: torch.Tensor, sign: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, 9 C, H, W]``: channel ``k C + c`` holds ``x[c, h + sign dh_k, w + sign dw_k]``
    (zero outside the image)."""
    h, w = x.shape[2], x.shape[3]
    xp = F.pad(x, (1, 1, 1, 1))
    return torch.cat([xp[:, :, 1 + sign * dh: 1 + sign * dh + h, 1 + sign * dw: 1 + sign * dw + w]
                      for dh, dw in _TAPS], 1)


def sum_shifted(p: torch.Tensor, sign: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, 9 C, H, W] -> [B, C, H, W]``: ``out[c, h, w] = sum_k p[k C + c, h + sign dh_k, w + sign dw_k]``
    (terms outside the image dropped), plus ``bias[c]`` if given. The adjoint of
    ``shifted_copies(., -sign)``."""
    c, h, w = p.shape[1] // 9, p.shape[2], p.shape[3]
    p_centre = p[:, _CENTRE * c:(_CENTRE + 1) * c]
    out = (p_centre + bias.view(1, -1, 1, 1) if bias is not None else p_centre).contiguous()
    for k, (dh, dw) in enumerate(_TAPS):
        if k == _CENTRE:
            continue
        dh, dw = sign * dh, sign * dw  # out[h, w] += p_k[h + dh, w + dw] where both are inside
        out[:, :, max(0, -dh): h - max(0, dh), max(0, -dw): w - max(0, dw)] += \
            p[:, k * c:(k + 1) * c, max(0, dh): h - max(0, -dh), max(0, dw): w - max(0, -dw)]
    return out


class _ShiftedCopies(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sign):
        ctx.sign = sign
        return shifted_copies(x, sign)

    @staticmethod
    def backward(ctx, grad):
        return sum_shifted(grad, -ctx.sign), None


class _SumShifted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, sign, bias):
        ctx.sign, ctx.has_bias = sign, bias is not None
        return sum_shifted(p, sign, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return shifted_copies(grad, -ctx.sign), None, grad_bias


def conv3x3_thin_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for few input channels: 9 shifted copies of ``x``,
    then a 1x1 convolution."""
    c_out, c_in = weight.shape[:2]
    cols = _ShiftedCopies.apply(x, 1)
    if x.is_contiguous(memory_format=torch.channels_last):
        cols = cols.contiguous(memory_format=torch.channels_last)
    # channel k C + c of cols pairs with weight[:, c, kh, kw]
    return F.conv2d(cols, weight.permute(0, 2, 3, 1).reshape(c_out, 9 * c_in, 1, 1), bias)


def conv3x3_thin_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for few output channels: a 1x1 convolution to one
    output per kernel tap, then the taps summed in place."""
    c_out, c_in = weight.shape[:2]
    taps = F.conv2d(x, weight.permute(2, 3, 0, 1).reshape(9 * c_out, c_in, 1, 1))
    return _SumShifted.apply(taps, 1, bias)


def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d`` with "same" padding for an odd square kernel. A 3x3 one on CPU takes a thin-side
    route where it measured faster in a training step (2 cores, x86): images of at least 100
    pixels, one side at most 1/32 of the other, and for a thin input, at least 128 outputs (2 -> 64
    was 4% slower per step, 2 -> 128 faster; on 7x7 images both routes were slower)."""
    c_out, c_in, kh, _ = weight.shape
    if (kh == 3 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and x.shape[2] * x.shape[3] >= 100):
        if 32 * c_in <= c_out and c_out >= 128:
            return conv3x3_thin_in(x, weight, bias)
        if 32 * c_out <= c_in:
            return conv3x3_thin_out(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=kh // 2)
