"""CPU fast paths, behind one switch, each beside the reference computation it must equal.

The layers call the functions here instead of writing their computations out:

- :func:`channel_mix`: the 1x1 convolution of the flow (``y = W x`` per pixel) as one matrix
  product over batch and space; reference: ``F.conv2d`` with a 1x1 kernel.
- :func:`scaled_conv`: ``(conv(x, w) + b) * s`` per output channel, i.e. a convolution followed
  by actnorm (or by ZeroConv2d's learned output scale). Fast: the scale is folded into the (small)
  weights and bias, one convolution instead of a convolution and two passes over the activations;
  reference: the literal three steps.
- :func:`conv2d_same`: a "same"-padded convolution. Fast, on CPU: 3x3 convolutions with one thin
  side run as a 1x1 convolution plus shifted copies of the thin side (below); reference:
  ``F.conv2d``.
- :func:`coupling_layout`: the coupling networks run in channels-last (NHWC) layout on CPU, where
  oneDNN's convolutions are faster at these channel counts; reference: as given.
- :func:`affine_step`: a whole affine flow step (actnorm, 1x1 convolution, affine coupling with the
  standard 3x3 -> 1x1 -> 3x3 network) as one autograd node whose three convolutions are matrix
  products over the NHWC pixels, for flows of few channels (below); reference: the layers one by one.
- :func:`prepared_weights`: the weight-side tensors of many layers (an actnorm's ``exp(logs)``, an
  LU 1x1 convolution's ``W``, a normed convolution's scaled kernel) computed for all layers of one
  kind and shape at once, on their stacked parameters (:class:`WeightSide`); reference: each layer
  computes its own. Not CPU-specific: it replaces a few dozen small operations per flow step,
  forward and backward, by a few per level, and at small batches those operations' fixed cost is
  a sizeable part of a training step.

Few-channel steps. Where a level has at most ``GEMM_STEP_MAX_CHANNELS`` channels (greyscale images
at their first two levels) a flow step's coupling network maps 2 or 4 channels to the hidden width
and back to 4 or 8. oneDNN's convolutions run such shapes far below the rate a plain matrix product reaches,
and hand their outputs over in blocked layouts that the next kernel converts back. Written as one
autograd Function, the step unfolds the thin input into its 3x3 neighbourhoods (few columns),
multiplies, and folds the last product's per-tap outputs back into place; the hidden activations
stay ``[pixels, width]`` matrices from the first product to the last, and the backward is written
out (matrix products, the ReLU masks, fold/unfold as each other's adjoints). Above that channel
count the unfold and fold cost more than they save, and the layers run one by one.

``with glowflow.fast.reference():`` (or ``GLOWFLOW_FAST_PATHS=0`` in the environment) runs the
reference paths; the tests compare the two in float64. The switch is a context variable, so it
holds for the block (and the tasks it starts), not for other threads.

Thin-side 3x3 convolutions. The coupling networks' first convolution maps a few channels to many
(2 -> 128) and their last maps many to a few (128 -> 4); on CPU oneDNN runs such shapes well below
the FLOP rate it reaches on a 1x1 convolution of the wide side. Written differently, most of the
work becomes that 1x1 kind:

- few -> many: stack the 9 shifted copies of the thin input (``[B, 9 C, H, W]``, cheap because C
  is small), then one 1x1 convolution from 9 C channels;
- many -> few: one 1x1 convolution to 9 C_out channels (one per kernel tap), then add the 9 taps
  back shifted into place.

Same sums in a different order. The shift steps are autograd Functions whose backward is the other
shift step (they are each other's adjoint), so backward never builds nine zero-padded gradient
buffers. Where these routes are taken is decided by the named thresholds below; they were tuned by
paired timing of whole training steps on 2 x86 cores (docs/results.md), and elsewhere the plain
convolution is used.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["enabled", "reference", "channel_mix", "scaled_weights", "scaled_conv", "conv2d_same", "coupling_layout",
           "WeightSide", "prepared_weights", "affine_step", "affine_step_fits", "GEMM_STEP_MAX_CHANNELS",
           "shifted_copies", "sum_shifted", "conv3x3_thin_in", "conv3x3_thin_out",
           "THIN_MIN_PIXELS", "THIN_CHANNEL_RATIO", "THIN_IN_MIN_OUTPUTS"]

_ENABLED = contextvars.ContextVar("glowflow_fast_paths",
                                  default=os.environ.get("GLOWFLOW_FAST_PATHS", "1") != "0")

# Thin-side routes: only on images of at least this many pixels (on 7x7 images both routes were
# slower than oneDNN's own 3x3 convolution: too little work per call to repay the copies) ...
THIN_MIN_PIXELS = 100
# ... where one side has at most 1/THIN_CHANNEL_RATIO of the other's channels ...
THIN_CHANNEL_RATIO = 32
# ... and, for a thin input, at least this many outputs (2 -> 64 was slower per step, 2 -> 128 faster).
THIN_IN_MIN_OUTPUTS = 128
# Flow steps of at most this many channels run as one matrix-product node (affine_step); tuned by
# paired whole training steps on 2 x86 cores (docs/results.md): 4 and 8 channels faster, 12 slower.
GEMM_STEP_MAX_CHANNELS = 8


def enabled() -> bool:
    """Whether the fast paths are on (the default) in this context."""
    return _ENABLED.get()


@contextlib.contextmanager
def reference(active: bool = True):
    """Run the block on the reference paths (``active=False``: on the fast paths)."""
    token = _ENABLED.set(not active)
    try:
        yield
    finally:
        _ENABLED.reset(token)


# ------------------------------------------------------------------------------------- 1x1 mix
def channel_mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y[b, i] = sum_j w[i, j] x[b, j]`` at every pixel: ``w [C, C]``, ``x [B, C, H, W]``."""
    if enabled():
        return torch.einsum("ij,bjhw->bihw", w, x)
    return F.conv2d(x, w[:, :, None, None])


# --------------------------------------------------------------------------- conv then scale
def scaled_weights(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * scale, bias * scale)`` per output channel: the kernel and bias of one convolution
    equal to a convolution followed by ``(. + bias) * scale``. ``weight [..., C_out, C_in, k, k]``,
    ``scale`` and ``bias`` ``[..., C_out]``; the leading dimensions (none, or a stack of layers)
    are broadcast."""
    return weight * scale[..., None, None, None], bias * scale


def scaled_conv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(conv2d_same(x, weight) + bias) * scale`` with ``bias``, ``scale`` per output channel."""
    scale, bias = scale.reshape(-1), bias.reshape(-1)
    if enabled():
        return conv2d_same(x, *scaled_weights(weight, scale, bias))
    return (conv2d_same(x, weight) + bias.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)


def coupling_layout(x: torch.Tensor) -> torch.Tensor:
    """The memory layout a coupling network runs in: NHWC on CPU (fast paths), else as given.
    The flow's main path stays NCHW either way."""
    if enabled() and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


# ------------------------------------------------------------------------ thin-side 3x3 convs
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
    """``F.conv2d`` with "same" padding for an odd square kernel; 3x3 ones on CPU take a thin-side
    route where the thresholds above allow."""
    c_out, c_in, kh, _ = weight.shape
    if (kh == 3 and enabled() and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and x.shape[2] * x.shape[3] >= THIN_MIN_PIXELS):
        if THIN_CHANNEL_RATIO * c_in <= c_out and c_out >= THIN_IN_MIN_OUTPUTS:
            return conv3x3_thin_in(x, weight, bias)
        if THIN_CHANNEL_RATIO * c_out <= c_in:
            return conv3x3_thin_out(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=kh // 2)


# ---------------------------------------------------------------- weight-side tensors, batched
class WeightSide:
    """Mixin for layers whose forward starts from tensors computed from their parameters alone.

    A subclass gives :meth:`weight_inputs` (the parameters and buffers those tensors are computed
    from) and :meth:`compute_weights` (the computation, written so that it also works on inputs
    stacked along a new first dimension), and calls :meth:`weight_tensors` in its forward. Inside
    :func:`prepared_weights` that returns what was computed for a whole group of layers at once.
    """

    _prepared: tuple | None = None

    def weight_inputs(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @staticmethod
    def compute_weights(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def weights_ready(self) -> bool:
        """False while the inputs may still change before use (data-dependent init pending)."""
        return True

    def weight_tensors(self) -> tuple[torch.Tensor, ...]:
        if self._prepared is not None:
            return self._prepared
        return self.compute_weights(*self.weight_inputs())


def weight_side_layers(root: nn.Module) -> list:
    """The :class:`WeightSide` layers in ``root``, outermost only (one that prepares its own
    sub-layers' tensors, like a normed convolution its actnorm's, hides them)."""
    if isinstance(root, WeightSide):
        return [root]
    return [layer for child in root.children() for layer in weight_side_layers(child)]


@contextlib.contextmanager
def prepared_weights(root: nn.Module):
    """Within the block, the :class:`WeightSide` layers in ``root`` use weight-side tensors computed
    per group (same class, same input shapes, dtypes and devices) on stacked inputs: one stack per
    input, one computation, one unbind per output, in place of one computation per layer. Same
    values, same gradients (through the stack), fewer and larger operations.

    Does nothing on the reference paths, or if a layer is not ready (see ``weights_ready``).
    Weight-side math runs in full precision, also under autocast, as each layer's own does."""
    layers = weight_side_layers(root) if enabled() else []
    if not all(layer.weights_ready() for layer in layers):
        layers = []
    groups = defaultdict(list)
    for layer in layers:
        key = (type(layer),) + tuple((t.shape, t.dtype, t.device) for t in layer.weight_inputs())
        groups[key].append(layer)
    prepared = []
    try:
        for group in groups.values():
            if len(group) < 2:
                continue
            inputs = [torch.stack(ts) for ts in zip(*(layer.weight_inputs() for layer in group))]
            with torch.autocast(inputs[0].device.type, enabled=False):
                outputs = type(group[0]).compute_weights(*inputs)
            for layer, mine in zip(group, zip(*(out.unbind(0) for out in outputs))):
                layer._prepared = mine
                prepared.append(layer)
        yield
    finally:
        for layer in prepared:
            layer._prepared = None


# ------------------------------------------------------------- few-channel affine flow step
def _tap_columns(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B H W, 9 C]``: each pixel's zero-padded 3x3 neighbourhood, column ``c 9 + k``."""
    b, c, h, w = x.shape
    return F.unfold(x, 3, padding=1).transpose(1, 2).reshape(b * h * w, 9 * c)


def _fold_taps(cols: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The adjoint of :func:`_tap_columns`: ``[B H W, 9 C] -> [B, C, H, W]``, each column added back
    at the pixel it was read from."""
    b, c, h, w = shape
    return F.fold(cols.view(b, h * w, 9 * c).transpose(1, 2), (h, w), 3, padding=1)


def _flipped_taps(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel ``[C_out, C_in, 3, 3]`` as ``[9 C_out, C_in]``, rows ``o 9 + k`` for the kernel
    turned by 180 degrees: ``fold`` of ``h @ this.T`` is the convolution of ``h`` (fold writes tap
    ``k`` at the pixel plus its offset, the convolution reads it from there)."""
    return weight.flip(2, 3).permute(0, 2, 3, 1).reshape(-1, weight.shape[1])


class _AffineStep(torch.autograd.Function):
    """``x -> (y, log|det| of the coupling)`` for actnorm ``(x + bias) scale``, ``z = W (.)`` and an
    affine coupling of ``z``'s halves (``sigmoid(. + scale_shift)`` scales) whose network is 3x3
    conv -> ReLU -> 1x1 conv -> ReLU -> 3x3 conv (actnorms and output scale folded into the kernels)."""

    @staticmethod
    def forward(ctx, x, scale, bias, w, w1, b1, w2, b2, w3, b3, num_pass, scale_shift):
        n, c, h, wd = x.shape
        hidden, c_out = w1.shape[0], w3.shape[0]
        w_scaled = w * scale  # W diag(scale): actnorm folded into the channel mix
        z = torch.baddbmm((w @ (bias * scale)).view(1, c, 1), w_scaled.expand(n, c, c),
                          x.reshape(n, c, h * wd)).view(n, c, h, wd)
        z1, z2 = z[:, :num_pass], z[:, num_pass:]
        cols = _tap_columns(z1)
        h1 = torch.addmm(b1, cols, w1.reshape(hidden, -1).t()).relu_()
        h2 = torch.addmm(b2, h1, w2.reshape(hidden, hidden).t()).relu_()
        w3_taps = _flipped_taps(w3)
        out = _fold_taps(torch.mm(h2, w3_taps.t()), (n, c_out, h, wd))
        out += b3.view(1, -1, 1, 1)
        s = torch.sigmoid(out[:, 1::2] + scale_shift)
        y2 = (z2 + out[:, 0::2]) * s
        ctx.save_for_backward(x, scale, bias, w, w_scaled, cols, h1, h2, w1, w2, w3_taps, s, y2)
        ctx.num_pass = num_pass
        return torch.cat([z1, y2], 1), torch.log(s).sum((1, 2, 3))

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        x, scale, bias, w, w_scaled, cols, h1, h2, w1, w2, w3_taps, s, y2 = ctx.saved_tensors
        n, c, h, wd = x.shape
        hidden, c_in, c_out = w1.shape[0], w1.shape[1], w3_taps.shape[0] // 9
        g1, g2 = grad_y[:, :ctx.num_pass], grad_y[:, ctx.num_pass:]
        # coupling: y2 = (z2 + shift) s, s = sigmoid(pre + scale_shift), log|det| = sum log s
        g_shift = g2 * s  # also dL/dz2
        g_pre = torch.addcmul(grad_logdet.view(-1, 1, 1, 1), g2, y2).mul_(1.0 - s)
        g_out = torch.stack([g_shift, g_pre], 2).flatten(1, 2)  # shift, pre interleaved as in out
        g_cols3 = _tap_columns(g_out)
        g_w3 = torch.mm(g_cols3.t(), h2).view(c_out, 3, 3, hidden).permute(0, 3, 1, 2).flip(2, 3)
        g_h2 = torch.ops.aten.threshold_backward(torch.mm(g_cols3, w3_taps), h2, 0)
        g_w2 = torch.mm(g_h2.t(), h1).view_as(w2)
        g_h1 = torch.ops.aten.threshold_backward(torch.mm(g_h2, w2.reshape(hidden, hidden)), h1, 0)
        g_w1 = torch.mm(g_h1.t(), cols).view_as(w1)
        g_z1 = _fold_taps(torch.mm(g_h1, w1.reshape(hidden, -1)), (n, c_in, h, wd))
        g_z = torch.cat([g1 + g_z1, g_shift], 1).view(n, c, h * wd)
        # z = W diag(scale) x + W (bias scale)
        g_x = torch.matmul(w_scaled.t(), g_z).view(n, c, h, wd)
        g_w_scaled = torch.matmul(g_z, x.reshape(n, c, h * wd).transpose(1, 2)).sum(0)
        g_const = g_z.sum((0, 2))
        wt_g_const = w.t() @ g_const
        g_w = g_w_scaled * scale + torch.outer(g_const, bias * scale)
        g_scale = (w * g_w_scaled).sum(0) + wt_g_const * bias
        return (g_x, g_scale, wt_g_const * scale, g_w, g_w1, g_h1.sum(0), g_w2, g_h2.sum(0), g_w3,
                g_out.sum((0, 2, 3)), None, None)


def affine_step_fits(x: torch.Tensor) -> bool:
    """Whether :func:`affine_step` is the faster way for a flow step on ``x``: fast paths on, CPU,
    no autocast, a float input of at most ``GEMM_STEP_MAX_CHANNELS`` channels."""
    return (enabled() and x.device.type == "cpu" and x.dim() == 4 and x.shape[1] <= GEMM_STEP_MAX_CHANNELS
            and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu"))


def affine_step(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                net: tuple[torch.Tensor, ...], num_pass: int, scale_shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One affine flow step as one autograd node: actnorm ``(x + bias) * scale`` (``scale``, ``bias``
    ``[C]``), the 1x1 convolution ``weight [C, C]``, then the affine coupling of the first
    ``num_pass`` channels onto the rest with the network's folded kernels ``net = (w1, b1, w2, b2,
    w3, b3)`` (3x3, 1x1, 3x3) and scales ``sigmoid(. + scale_shift)``. Returns ``(y, the
    coupling's log|det| [B])``; the actnorm's and the 1x1 convolution's log-determinants depend on
    the weights alone and are the caller's."""
    return _AffineStep.apply(x, scale, bias, weight, *net, num_pass, scale_shift)
