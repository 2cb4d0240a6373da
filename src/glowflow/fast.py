"""CPU fast paths: faster routes to the numbers the layers compute, in one module, each switchable
by name, all beside the reference they must equal: the layers themselves.

:func:`level_forward` is the one entry point. The model calls it for each level; where the fast
paths apply (plain memory mode, every actnorm initialised, a level made of :class:`FlowStep` s) it
computes the level's forward from the layers' parameters, else it calls ``level(x)``. It reads
the layers' public parameters and hooks (a coupling's :meth:`~glowflow.couplings.Coupling.transform`)
and sets nothing on them. The paths, by their names in :class:`FastOptions`:

- ``grouped_weights``: the tensors computed from parameters alone (an actnorm's ``exp(logs)``, an
  LU 1x1 convolution's ``W = P L U``, a convolution's kernel with its actnorm or output scale
  folded in) are computed for all layers of one kind and shape in a level at once, on their
  stacked parameters, instead of one layer at a time. At small batches those few dozen small
  operations per flow step are a sizeable part of a training step, forward and backward.
- ``folded_scales``: a convolution followed by a per-channel scale (actnorm, or ZeroConv2d's output
  scale) runs as one convolution with the scale folded into the (small) kernel and bias, instead
  of a convolution and two passes over the activations.
- ``thin_convs``: 3x3 convolutions with one thin side run as 1x1 convolutions (below).
- ``channels_last``: the coupling networks run in NHWC layout on CPU, where oneDNN's convolutions
  are faster at these channel counts; the flow's main path stays NCHW.
- ``one_node_steps``: a whole affine flow step of few channels as one autograd node (below).

``with glowflow.fast.using(thin_convs=False):`` turns one path off for the block;
``with glowflow.fast.reference():`` (or ``GLOWFLOW_FAST_PATHS=0`` in the environment) turns them
all off, and the levels run as the layers are written. The options are a context variable, so
they hold for the block (and the tasks it starts), not for other threads. The tests compare each
path with the reference in float64; ``benchmarks/fast_paths.py`` times each against the others.
The invertible and checkpoint memory modes run the layers as written.

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
buffers. Where these routes are taken is decided by the named thresholds below, set by paired
timing of whole training steps on 2 x86 cores (docs/results.md).

Few-channel steps. Where a level has at most ``GEMM_STEP_MAX_CHANNELS`` channels (greyscale images
at their first two levels) a flow step's coupling network maps 2 or 4 channels to the hidden width
and back to 4 or 8. oneDNN's convolutions run such shapes far below the rate a plain matrix
product reaches, and hand their outputs over in blocked layouts that the next kernel converts
back. Written as one autograd Function, the step unfolds the thin input into its 3x3
neighbourhoods (few columns), multiplies, and folds the last product's per-tap outputs back into
place; the hidden activations stay ``[pixels, width]`` matrices from the first product to the
last, and the backward is written out (matrix products, the ReLU masks, fold/unfold as each
other's adjoints). Above that channel count the unfold and fold cost more than they save.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections import defaultdict

import torch
import torch.nn.functional as F

from .blocks import FlowStep, Level
from .couplings import COUPLING_SCALE_SHIFT, AffineCoupling, Coupling
from .layers import LOGSCALE_FACTOR, ActNorm, InvConv1x1, ZeroConv2d, channel_mix
from .networks import CouplingNet, NormedConv

__all__ = ["FastOptions", "PATHS", "options", "using", "reference", "enabled", "level_forward", "level_inverse", "step_forward",
           "conv2d_same", "scaled_weights", "shifted_copies", "sum_shifted", "conv3x3_thin_in", "conv3x3_thin_out",
           "affine_step", "affine_step_fits", "GEMM_STEP_MAX_CHANNELS", "THIN_MIN_PIXELS", "THIN_CHANNEL_RATIO",
           "THIN_IN_MIN_OUTPUTS"]


@dataclasses.dataclass(frozen=True)
class FastOptions:
    """Which fast paths are on (all, by default); see the module's docstring for each."""

    grouped_weights: bool = True
    folded_scales: bool = True
    thin_convs: bool = True
    channels_last: bool = True
    one_node_steps: bool = True

    @classmethod
    def none(cls) -> "FastOptions":
        return cls(**{name: False for name in PATHS})

    def any(self) -> bool:
        return any(getattr(self, name) for name in PATHS)


PATHS = tuple(f.name for f in dataclasses.fields(FastOptions))
_OPTIONS = contextvars.ContextVar(
    "glowflow_fast_paths", default=FastOptions() if os.environ.get("GLOWFLOW_FAST_PATHS", "1") != "0" else FastOptions.none())

# Thin-side routes: only on images of at least this many pixels (on smaller ones there is too
# little work per call to repay the copies) ...
THIN_MIN_PIXELS = 100
# ... where one side has at most 1/THIN_CHANNEL_RATIO of the other's channels ...
THIN_CHANNEL_RATIO = 32
# ... and, for a thin input, at least this many outputs.
THIN_IN_MIN_OUTPUTS = 128
# Flow steps of at most this many channels run as one matrix-product node (affine_step).
GEMM_STEP_MAX_CHANNELS = 8


def options() -> FastOptions:
    """The fast paths on in this context."""
    return _OPTIONS.get()


def enabled() -> bool:
    """Whether any fast path is on in this context."""
    return options().any()


@contextlib.contextmanager
def using(fast_options: FastOptions | None = None, **paths: bool):
    """Within the block, the fast paths are ``fast_options``, or the current ones with ``paths``
    (names of :data:`PATHS`) switched: ``with using(one_node_steps=False): ...``."""
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown fast paths {sorted(unknown)}; known: {', '.join(PATHS)}")
    token = _OPTIONS.set(dataclasses.replace(fast_options or options(), **paths))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def reference(active: bool = True):
    """Run the block on the reference paths, the layers as written (``active=False``: all fast paths on)."""
    return using(FastOptions.none() if active else FastOptions())


# --------------------------------------------------------------------------- a level, fast
def _applies(opts, steps) -> bool:
    """Fast paths on, and every step a :class:`FlowStep` whose actnorms are initialised (the
    first forward pass initialises them, on the layers' own path)."""
    return opts.any() and all(isinstance(step, FlowStep) and all(
        m.is_initialized for m in step.modules() if isinstance(m, ActNorm)) for step in steps)


def level_forward(level, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``level(x)``: the same ``(y, logdet)``, on the fast paths where they apply (under the plain
    memory mode; the others recompute each layer on its own)."""
    opts = options()
    if not (isinstance(level, Level) and level.steps.memory == "none" and _applies(opts, level.steps)):
        return level(x, **({"condition": condition} if condition is not None else {}))
    y, logdet = level.squeeze(x)
    weights = _weight_tensors(level.steps, opts)
    for step in level.steps:
        y, ld = _step_forward(step, y, weights, opts, condition)
        logdet = logdet + ld
    if level.split is not None:
        y, ld = level.split(y)
        logdet = logdet + ld
    return y, logdet


def level_inverse(level, y: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """``level.inverse(y)``, its coupling networks on the fast paths where they apply (decoding and
    sampling; the actnorms and 1x1 convolutions invert as the layers do, with their cached inverse)."""
    opts = options()
    kwargs = {"condition": condition} if condition is not None else {}
    if not (isinstance(level, Level) and _applies(opts, level.steps)):
        return level.inverse(y, **kwargs)
    if level.split is not None:
        y = level.split.inverse(y)
    weights = _weight_tensors(level.steps, opts, networks_only=True)
    for step in reversed(list(level.steps)):
        coupling = step.coupling
        y1, y2 = coupling.split(y)
        y = torch.cat([y1, coupling.inverse_transform(y2, _network(coupling, y1, condition, weights, opts))], 1)
        y = step.actnorm.inverse(step.permute.inverse(y))
    return level.squeeze.inverse(y)


def step_forward(step, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``step(x)`` for one flow step, on the fast paths where they apply (what :func:`level_forward`
    does for each of a level's steps)."""
    opts = options()
    if not _applies(opts, [step]):
        return step(x, **({"condition": condition} if condition is not None else {}))
    return _step_forward(step, x, _weight_tensors([step], opts), opts, condition)


def _step_forward(step, x, weights, opts, condition):
    """One flow step: actnorm, permutation, coupling, from the level's weight-side tensors."""
    actnorm, permute, coupling = step.actnorm, step.permute, step.coupling
    pixels = x.shape[2] * x.shape[3]
    if opts.one_node_steps and _one_node_fits(step, x):
        scale, logs_sum = weights[actnorm]
        w, w_logdet = weights[permute]
        net = tuple(t for m in coupling.net.net for t in _folded(weights[m]))
        y, logdet = affine_step(x, scale.view(-1), actnorm.bias.view(-1), w, net, coupling.num_pass,
                                COUPLING_SCALE_SHIFT)
        return y, logdet + (logs_sum + w_logdet) * pixels
    scale, logs_sum = weights[actnorm]
    x = (x + actnorm.bias) * scale
    logdet = (logs_sum * pixels).expand(x.shape[0])
    if isinstance(permute, InvConv1x1):
        w, w_logdet = weights[permute]
        with torch.autocast(x.device.type, enabled=False):
            x = channel_mix(w.to(x.dtype), x)
        logdet = logdet + (w_logdet * pixels).expand(x.shape[0])
    else:
        x, ld = permute(x)
        logdet = logdet + ld
    x1, x2 = coupling.split(x)
    y2, ld = coupling.transform(x2, _network(coupling, x1, condition, weights, opts))
    return torch.cat([x1, y2], 1), logdet + ld


def _network(coupling: Coupling, x1, condition, weights, opts) -> torch.Tensor:
    """``coupling.network(x1, condition)``: for Glow's network, its convolutions on the fast paths."""
    net = coupling.net
    if not isinstance(net, CouplingNet):
        return coupling.network(x1, condition)
    h = coupling.network_input(x1, condition)
    if opts.channels_last and h.device.type == "cpu":
        h = h.contiguous(memory_format=torch.channels_last)
    for module in net.net:
        if isinstance(module, NormedConv):
            h = _conv(h, weights[module], opts)
            h = F.glu(h, 1) if module.gated else F.relu(h, inplace=True)
        elif isinstance(module, ZeroConv2d):
            h = _conv(h, weights[module], opts)
        else:
            h = module(h)
    return h.to(x1.dtype)  # back to full precision under autocast


def _conv(x, tensors, opts) -> torch.Tensor:
    """A convolution followed by ``(. + bias) * scale``, from :func:`_weight_tensors`' tensors."""
    if opts.folded_scales:
        weight, bias = tensors
        return conv2d_same(x, weight, bias, thin=opts.thin_convs)
    weight, scale, bias = tensors
    return (conv2d_same(x, weight, thin=opts.thin_convs) + bias.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)


def _folded(tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution's ``(kernel, bias)`` with its scale folded in, whichever way they were computed."""
    return tensors if len(tensors) == 2 else scaled_weights(*tensors)


def _one_node_fits(step, x) -> bool:
    """An affine step (unconditioned, after a 1x1 convolution, with the plain network) on an input
    that :func:`affine_step` is the faster way for."""
    coupling = step.coupling
    return (type(coupling) is AffineCoupling and not coupling.takes_condition
            and isinstance(step.permute, InvConv1x1) and isinstance(coupling.net, CouplingNet)
            and coupling.net.plain and affine_step_fits(x))


# ------------------------------------------------------------------- weight-side tensors
def scaled_weights(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * scale, bias * scale)`` per output channel: the kernel and bias of one convolution
    equal to a convolution followed by ``(. + bias) * scale``. ``weight [..., C_out, C_in, k, k]``,
    ``scale`` and ``bias`` ``[..., C_out]``; the leading dimensions (none, or a stack of layers)
    are broadcast."""
    return weight * scale[..., None, None, None], bias * scale


def _inputs(module) -> tuple[torch.Tensor, ...]:
    """The parameters a module's weight-side tensors are computed from."""
    if isinstance(module, ActNorm):
        return (module.logs,)
    if isinstance(module, InvConv1x1):
        return module.factors()
    if isinstance(module, NormedConv):
        return module.conv.weight, module.norm.logs, module.norm.bias
    return module.conv.weight, module.logs, module.conv.bias  # ZeroConv2d


def _compute(kind, inputs, opts) -> tuple[torch.Tensor, ...]:
    """The weight-side tensors of one module of ``kind`` (or of a stack of them, along a new first
    dimension): actnorm ``(exp(logs), sum(logs))``; a 1x1 convolution ``(W, log|det W|)``; a
    convolution ``(kernel, bias)`` with its scale folded in, or ``(kernel, scale, bias)``."""
    if kind is ActNorm:
        (logs,) = inputs
        return torch.exp(logs), logs.flatten(-4).sum(-1)
    if kind is InvConv1x1:
        return InvConv1x1.compose(*inputs)
    weight, logs, bias = inputs
    scale = torch.exp(logs * LOGSCALE_FACTOR if kind is ZeroConv2d else logs).flatten(-4)
    bias = bias.flatten(-4) if kind is NormedConv else bias
    return scaled_weights(weight, scale, bias) if opts.folded_scales else (weight, scale, bias)


def _weight_tensors(steps, opts, networks_only: bool = False) -> dict:
    """Module -> its weight-side tensors, for every actnorm, 1x1 convolution and network
    convolution of ``steps``; with ``grouped_weights``, computed per group of one kind and shape
    on stacked parameters (same values, same gradients through the stack, fewer operations).
    In full precision, also under autocast, as the layers' own computations are."""
    modules = []
    for step in steps:
        if not networks_only:
            modules.append(step.actnorm)
        if isinstance(step.permute, InvConv1x1) and not networks_only:
            modules.append(step.permute)
        if isinstance(step.coupling.net, CouplingNet):
            modules.extend(m for m in step.coupling.net.net if isinstance(m, (NormedConv, ZeroConv2d)))
    groups = defaultdict(list)
    for module in modules:
        key = (type(module),) + tuple((t.shape, t.dtype, t.device) for t in _inputs(module))
        groups[key if opts.grouped_weights else (id(module),)].append(module)
    out = {}
    for group in groups.values():
        kind = type(group[0])
        with torch.autocast(_inputs(group[0])[0].device.type, enabled=False):
            if len(group) == 1:
                out[group[0]] = _compute(kind, _inputs(group[0]), opts)
                continue
            stacked = [torch.stack(ts) for ts in zip(*(_inputs(m) for m in group))]
            outputs = _compute(kind, stacked, opts)
        for module, mine in zip(group, zip(*(t.unbind(0) for t in outputs))):
            out[module] = mine
    return out


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


def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                thin: bool = True) -> torch.Tensor:
    """``F.conv2d`` with "same" padding for an odd square kernel; with ``thin``, 3x3 ones on CPU
    take a thin-side route where the thresholds above allow."""
    c_out, c_in, kh, _ = weight.shape
    if (kh == 3 and thin and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and x.shape[2] * x.shape[3] >= THIN_MIN_PIXELS):
        if THIN_CHANNEL_RATIO * c_in <= c_out and c_out >= THIN_IN_MIN_OUTPUTS:
            return conv3x3_thin_in(x, weight, bias)
        if THIN_CHANNEL_RATIO * c_out <= c_in:
            return conv3x3_thin_out(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=kh // 2)


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
    """Whether :func:`affine_step` is the faster way for a flow step on ``x``: CPU, no autocast, a
    float input of at most ``GEMM_STEP_MAX_CHANNELS`` channels."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] <= GEMM_STEP_MAX_CHANNELS
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
