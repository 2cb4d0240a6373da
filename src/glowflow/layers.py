"""The invertible layers of Glow, under one interface.

Every layer is an :class:`InvertibleLayer`: an ``nn.Module`` with ``forward(x) -> (y, logdet)`` and
``inverse(y) -> x``, ``logdet = log|det dy/dx|`` per sample, shaped ``[B]``. Images are
``[B, C, H, W]``. Conditioning (labels) is taken only by the layer that uses it, by name
(:class:`TopPrior`'s ``y_onehot``). A :class:`Chain` composes layers and sums their
log-determinants; :class:`FlowStep` and :class:`Level` are chains.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import fast
from .config import COUPLINGS, MIXTURE_COMPONENTS, PERMUTATIONS, coupling_outputs
from .memory import run_layers
from .mixture import mixture_logit, mixture_logit_inverse

__all__ = ["InvertibleLayer", "Chain", "ActNorm", "InvConv1x1", "Permute", "Coupling", "CouplingNet",
           "ZeroConv2d", "SelfAttention", "Squeeze", "FlowStep", "SplitPrior", "Level", "TopPrior", "random_rotation",
           "inverse_scale_floor", "STABLE_SCALE_FLOOR", "LOGSCALE_FACTOR"]

# Scale on the zero-initialised layers' learned log-scale, as in the official code: lets the
# output scale move quickly while starting at exactly 1.
LOGSCALE_FACTOR = 3.0
# The affine (and mixture) couplings' scale is sigmoid(h + COUPLING_SCALE_SHIFT): in (0, 1), so
# that step never amplifies, and about 0.88 at initialisation (h = 0), as in the official code.
COUPLING_SCALE_SHIFT = 2.0
# Their inverse divides by that scale. At latents far from any data the scale can reach 1e-6
# and below, and the division overflows: inverse_scale_floor bounds it for a block.
_SCALE_FLOOR = contextvars.ContextVar("glowflow_inverse_scale_floor", default=0.0)
# The floor sampling and latent edits use: far below any scale data produce (about 6e-3 is the
# smallest on 2,000 Fashion-MNIST test images, 0.081 on the 400 faces), so the latents of data
# decode exactly as without it.
STABLE_SCALE_FLOOR = 1e-3


@contextlib.contextmanager
def inverse_scale_floor(floor: float):
    """Within the block, affine and mixture couplings invert with ``scale = max(scale, floor)``.
    The forward map is untouched, and so is any inverse whose scales are all above ``floor`` (those
    of data are, for a small enough floor), so ``decode(encode(x))`` stays exact; latents off the
    data decode to finite images instead of overflowing."""
    if not floor >= 0.0:
        raise ValueError(f"the scale floor must be >= 0, got {floor}")
    token = _SCALE_FLOOR.set(float(floor))
    try:
        yield
    finally:
        _SCALE_FLOOR.reset(token)


class InvertibleLayer(nn.Module):
    """The one interface of the flow's layers.

    Subclasses implement ``forward(x) -> (y, logdet [B])`` and ``inverse(y) -> x``.
    :meth:`backward_from_output` serves the invertible memory mode (memory.py), which stores no
    activations and rebuilds each layer's input from its output; layers override it only where
    the inverse and the recomputed forward can share work.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward_from_output(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                             need_input_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """From this layer's output ``y`` and the loss's gradients w.r.t. ``y`` and ``logdet``:
        ``(x, dL/dx or None, {parameter: dL/dparameter})`` with ``x = inverse(y)`` rebuilt.

        The default inverts without a graph, recomputes ``forward(x)`` with one and differentiates it.
        """
        with torch.no_grad():
            x = self.inverse(y)
        x = x.detach().requires_grad_(need_input_grad)
        params = [p for p in self.parameters() if p.requires_grad]
        inputs = ([x] if need_input_grad else []) + params
        if not inputs:
            return x.detach(), None, {}
        with torch.enable_grad():
            y_re, logdet = self(x)
        outputs, grads_out = _differentiable((y_re, logdet), (grad_y, grad_logdet))
        grads = list(torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True)) if outputs else \
            [None] * len(inputs)
        grad_x = grads.pop(0) if need_input_grad else None
        return x.detach(), grad_x, dict(zip(params, grads))


def _differentiable(outputs, grads):
    """The (output, gradient) pairs whose output is part of a graph (a constant log|det| is not)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    return tuple(o for o, _ in pairs), tuple(g for _, g in pairs)


class Chain(InvertibleLayer):
    """Layers applied in order; ``logdet`` is the sum of theirs. Children are registered by name
    (subclasses) or by position (``Chain(a, b, c)``) and run in registration order.

    ``memory`` chooses how gradients through the chain are computed (memory.py): ``"none"`` keeps
    every activation, ``"checkpoint"`` recomputes each layer from its stored input,
    ``"invertible"`` stores nothing and rebuilds inputs with the inverses.
    """

    def __init__(self, *layers: InvertibleLayer):
        super().__init__()
        self.memory = "none"
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __iter__(self):
        return (m for m in self._modules.values() if m is not None)

    def __getitem__(self, i: int) -> InvertibleLayer:
        return list(self)[i]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return run_layers(list(self), x, self.memory)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(list(self)):
            y = layer.inverse(y)
        return y

    def backward_from_output(self, y, grad_y, grad_logdet, need_input_grad=True):
        """Layer by layer from the last: each rebuilds its input and passes the gradient on."""
        layers = list(self)
        grads: dict = {}
        for k in range(len(layers) - 1, -1, -1):
            need = need_input_grad or k > 0
            y, grad_y, g = layers[k].backward_from_output(y, grad_y, grad_logdet, need)
            grads.update(g)
        return y, grad_y, grads


def _global_channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of ``x`` over batch and space, across all ranks if distributed.

    With DDP every rank sees its own shard; all-reducing the sums makes data-dependent init use the
    global first batch, so every rank starts from identical parameters.
    """
    dims = (0, 2, 3)
    count = torch.tensor(float(x.shape[0] * x.shape[2] * x.shape[3]), device=x.device, dtype=x.dtype)
    total = x.sum(dims)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        dist.all_reduce(total)
    mean = total / count
    sq = (x - mean.view(1, -1, 1, 1)).pow(2).sum(dims)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq)
    return mean, sq / count


def _per_sample(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar log-determinant shared by the whole batch -> ``[B]``."""
    return value.expand(x.shape[0])


class ActNorm(fast.WeightSide, InvertibleLayer):
    """Per-channel affine map ``y = (x + bias) * exp(logs)``, initialised from the first batch.

    The first forward pass sets ``bias`` and ``logs`` so that its output has zero mean and unit
    variance per channel. ``initialized`` is a buffer, so a loaded model never re-initialises.
    Whether init has happened is also kept as a Python flag (:attr:`is_initialized`), so that a
    forward pass neither reads the buffer back from a GPU nor breaks a ``torch.compile`` graph.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps
        self._known_initialized = False

    @property
    def is_initialized(self) -> bool:
        if not self._known_initialized:  # the buffer may have been set by a copy (EMA, load_state_dict)
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._known_initialized = bool(self.initialized)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean, var = _global_channel_moments(x.detach())
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_(-0.5 * torch.log(var + self.eps).view_as(self.logs))
        self.initialized.fill_(True)
        self._known_initialized = True

    def weight_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.logs,)

    @staticmethod
    def compute_weights(logs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(logs), sum(logs))``: the scale and the log|det| per pixel."""
        return torch.exp(logs), logs.sum((-4, -3, -2, -1))

    def weights_ready(self) -> bool:
        return self.is_initialized

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.initialize(x)
        scale, logs_sum = self.weight_tensors()
        y = (x + self.bias) * scale
        return y, _per_sample(logs_sum * (x.shape[2] * x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


def random_rotation(num_channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal matrix with determinant +1 (QR of a Gaussian matrix)."""
    q, r = torch.linalg.qr(torch.randn(num_channels, num_channels, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


class InvConv1x1(fast.WeightSide, InvertibleLayer):
    """Invertible 1x1 convolution ``y = W x`` at every pixel, ``log|det| = H W log|det W|``.

    ``lu=False`` learns ``W`` directly (log|det| by a float64 ``slogdet``); ``lu=True`` learns
    ``W = P L (U + diag(sign(s) exp(log|s|)))`` with fixed ``P`` and ``sign(s)``, so log|det| is
    ``H W sum(log|s|)``, O(C). In eval mode ``W`` and ``W^-1`` are computed once and cached until
    a parameter changes.
    """

    def __init__(self, num_channels: int, lu: bool = False, generator: torch.Generator | None = None,
                 weight: torch.Tensor | None = None):
        super().__init__()
        self.num_channels = num_channels
        self.lu = lu
        if weight is None:
            w = random_rotation(num_channels, generator)
        else:
            w = weight.detach()
            if w.shape != (num_channels, num_channels) or not w.is_floating_point():
                raise ValueError(f"weight must be a float [{num_channels}, {num_channels}] matrix, "
                                 f"got {w.dtype} {list(w.shape)}")
            if torch.linalg.matrix_rank(w.double()) < num_channels:
                raise ValueError("weight must be invertible; the given matrix is singular")
        dtype = w.dtype
        if not lu:
            self.weight = nn.Parameter(w.clone())
        else:
            p, l, u = torch.linalg.lu(w.double())
            s = torch.diagonal(u)
            self.register_buffer("p", p.to(dtype))
            self.register_buffer("sign_s", torch.sign(s).to(dtype))
            self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels, dtype=dtype), -1))
            self.register_buffer("eye", torch.eye(num_channels, dtype=dtype))
            self.lower = nn.Parameter(torch.tril(l, -1).to(dtype))
            self.upper = nn.Parameter(torch.triu(u, 1).to(dtype))
            self.log_s = nn.Parameter(torch.log(torch.abs(s)).to(dtype))
        self._cache: tuple | None = None

    def weight_inputs(self) -> tuple[torch.Tensor, ...]:
        if self.lu:
            return self.p, self.lower, self.upper, self.log_s, self.sign_s, self.lower_mask, self.eye
        return (self.weight,)

    @staticmethod
    def compute_weights(*inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, log|det W|)`` from :meth:`weight_inputs` (LU: ``W = P L U``, log|det| the sum of
        ``log|s|``; plain: a float64 ``slogdet``)."""
        if len(inputs) == 1:
            (weight,) = inputs
            return weight, torch.linalg.slogdet(weight.double())[1].to(weight.dtype)
        p, lower, upper, log_s, sign_s, lower_mask, eye = inputs
        lower = lower * lower_mask + eye
        upper = upper * lower_mask.transpose(-1, -2) + torch.diag_embed(sign_s * torch.exp(log_s))
        return p @ lower @ upper, log_s.sum(-1)

    def _version_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())

    def _weights(self, need_inverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.training or torch.is_grad_enabled() or self._prepared is not None:
            w, logdet = self.weight_tensors()
            inv = torch.linalg.inv(w.double()).to(w.dtype) if need_inverse else None
            return w, logdet, inv
        key = self._version_key()
        if self._cache is None or self._cache[0] != key:
            w, logdet = self.weight_tensors()
            inv = torch.linalg.inv(w.double()).to(w.dtype)
            self._cache = (key, w, logdet, inv)
        return self._cache[1], self._cache[2], self._cache[3]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    # The flow's main path stays in full precision under autocast: only coupling networks run in
    # bf16/fp16, so inverses and log-determinants keep float32 accuracy.
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            w, logdet, _ = self._weights(need_inverse=False)
            y = fast.channel_mix(w.to(x.dtype), x)
        return y, _per_sample(logdet * (x.shape[2] * x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            _, _, inv = self._weights(need_inverse=True)
            return fast.channel_mix(inv.to(y.dtype), y)


class Permute(InvertibleLayer):
    """Fixed channel permutation, the paper's baselines: ``"reverse"`` or seeded ``"shuffle"``.

    The permutation is a buffer, so it is saved with the model. log|det| = 0.
    """

    def __init__(self, num_channels: int, mode: str = "reverse", generator: torch.Generator | None = None):
        super().__init__()
        if mode == "reverse":
            perm = torch.arange(num_channels - 1, -1, -1)
        elif mode == "shuffle":
            perm = torch.randperm(num_channels, generator=generator)
        else:
            raise ValueError(f"permutation mode must be 'reverse' or 'shuffle', got {mode!r}")
        self.mode = mode
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.inv_perm]


class ZeroConv2d(fast.WeightSide, nn.Module):
    """Convolution initialised to output zero, with a learned per-channel output scale
    ``exp(LOGSCALE_FACTOR * logs)``: each step of flow starts as (nearly) the identity."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def weight_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.conv.weight, self.logs, self.conv.bias

    @staticmethod
    def compute_weights(weight, logs, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias with the output scale folded in."""
        return fast.scaled_weights(weight, torch.exp(logs * LOGSCALE_FACTOR).flatten(-4), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared is not None:
            return fast.conv2d_same(x, *self._prepared)
        return fast.scaled_conv(x, self.conv.weight, torch.exp(self.logs * LOGSCALE_FACTOR), self.conv.bias)


class _NormedConv(fast.WeightSide, nn.Module):
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

    def weight_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.conv.weight, self.norm.logs, self.norm.bias

    @staticmethod
    def compute_weights(weight, logs, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias with the actnorm folded in."""
        return fast.scaled_weights(weight, torch.exp(logs).flatten(-4), bias.flatten(-4))

    def weights_ready(self) -> bool:
        return self.norm.is_initialized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if not norm.is_initialized:  # data-dependent init needs the convolution's output itself
            h = norm(fast.conv2d_same(x, self.conv.weight))[0]
        elif self._prepared is not None:
            h = fast.conv2d_same(x, *self._prepared)
        else:
            h = fast.scaled_conv(x, self.conv.weight, torch.exp(norm.logs), norm.bias)
        return F.glu(h, 1) if self.gated else F.relu(h, inplace=True)


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
        tokens = h.permute(0, 2, 3, 1).reshape(b, height * width, c)  # a view in channels-last layout
        q, k, v = self.qkv(tokens).view(b, height * width, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, height * width, c)
        return h + self.out(a).view(b, height, width, c).permute(0, 3, 1, 2)


class CouplingNet(nn.Module):
    """3x3 conv -> actnorm -> ReLU -> 1x1 conv -> actnorm -> ReLU [-> self-attention] ->
    zero-initialised 3x3 conv. ``attention_heads=0``: no attention block; ``gated=True``: gates
    in place of both ReLUs (see :class:`_NormedConv`)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, generator=None,
                 attention_heads: int = 0, gated: bool = False):
        super().__init__()
        layers = [_NormedConv(in_channels, hidden_channels, 3, generator, gated),
                  _NormedConv(hidden_channels, hidden_channels, 1, generator, gated)]
        if attention_heads:
            layers.append(SelfAttention(hidden_channels, attention_heads, generator))
        self.net = nn.Sequential(*layers, ZeroConv2d(hidden_channels, out_channels, 3))

    @property
    def plain(self) -> bool:
        """3x3 conv -> ReLU -> 1x1 conv -> ReLU -> 3x3 conv: no attention block, no gates."""
        return len(self.net) == 3 and not self.net[0].gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(fast.coupling_layout(x))


class Coupling(InvertibleLayer):
    """Affine, additive or mixture-of-logistics coupling: the first channel half passes through and
    conditions the second.

    affine:   y2 = (x2 + shift) * scale,            scale = sigmoid(h + 2) in (0, 1)
    additive: y2 = x2 + shift
    mixture:  y2 = (logit F(x2) + shift) * scale,   F a mixture of ``components`` logistics
              (Flow++, section 3.2; :mod:`glowflow.mixture`)
    with ``(shift, h[, mixture parameters]) = net(x1)``. The pieces are public (:meth:`split`,
    :meth:`conditioner`, :meth:`couple`, :meth:`uncouple`), so forward, inverse and the invertible
    backward share them: ``couple(x2, *conditioner(x1))``.
    """

    def __init__(self, num_channels: int, hidden_channels: int, kind: str = "affine", generator=None,
                 components: int = MIXTURE_COMPONENTS, attention_heads: int = 0, gated: bool = False):
        super().__init__()
        if kind not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {kind!r}")
        if num_channels < 2:
            raise ValueError(f"coupling needs at least 2 channels, got {num_channels}")
        if components < 1:
            raise ValueError(f"a mixture coupling needs at least 1 component, got {components}")
        self.kind = kind
        self.components = components
        self.num_pass = num_channels - num_channels // 2
        num_change = num_channels // 2
        self.net = CouplingNet(self.num_pass, coupling_outputs(kind, num_change, components),
                               hidden_channels, generator, attention_heads, gated)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x -> (x1, x2)``: the half that passes through, the half that is changed."""
        return x[:, : self.num_pass], x[:, self.num_pass:]

    def conditioner(self, x1: torch.Tensor) -> tuple:
        """``(shift, scale)`` from the pass-through half (``scale`` None for additive coupling);
        for mixture coupling also ``(logit_pi, mu, log_s)``, each ``[B, components, C2, H, W]``."""
        h = self.net(x1).to(x1.dtype)  # back to full precision under autocast
        if self.kind == "additive":
            return h, None
        if self.kind == "affine":
            return h[:, 0::2], torch.sigmoid(h[:, 1::2] + COUPLING_SCALE_SHIFT)
        k = self.components
        h = h.unflatten(1, (3 * k + 2, -1))
        return (h[:, 0], torch.sigmoid(h[:, 1] + COUPLING_SCALE_SHIFT),
                (h[:, 2: 2 + k], h[:, 2 + k: 2 + 2 * k], h[:, 2 + 2 * k:]))

    @staticmethod
    def couple(x2: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor | None,
               mixture: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The changed half's forward map and its log|det| ``[B]``."""
        if scale is None:
            return x2 + shift, x2.new_zeros(x2.shape[0])
        if mixture is None:
            return (x2 + shift) * scale, torch.log(scale).flatten(1).sum(1)
        u, log_slope = mixture_logit(x2, *mixture)
        return (u + shift) * scale, (torch.log(scale) + log_slope).flatten(1).sum(1)

    @staticmethod
    def uncouple(y2: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor | None,
                 mixture: tuple | None = None) -> torch.Tensor:
        """The inverse of :meth:`couple` (see :func:`inverse_scale_floor`)."""
        if scale is None:
            return y2 - shift
        floor = _SCALE_FLOOR.get()
        u = y2 / (scale.clamp_min(floor) if floor > 0.0 else scale) - shift
        return u if mixture is None else mixture_logit_inverse(u, *mixture)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = self.split(x)
        y2, logdet = self.couple(x2, *self.conditioner(x1))
        return torch.cat([x1, y2], 1), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = self.split(y)
        return torch.cat([y1, self.uncouple(y2, *self.conditioner(y1))], 1)

    def backward_from_output(self, y, grad_y, grad_logdet, need_input_grad=True):
        """One network evaluation serves both the inverse and the recomputed forward: the inverse
        needs ``net(y1)``, the forward ``net(x1)``, and ``x1 == y1`` exactly."""
        params = [p for p in self.parameters() if p.requires_grad]
        y1, y2 = self.split(y.detach())
        with torch.enable_grad():
            x1 = y1.detach().requires_grad_(True)
            conditioning = self.conditioner(x1)
            with torch.no_grad():  # the inverse's own graph is never used
                x2 = self.uncouple(y2, *conditioning).requires_grad_(True)
            y2_re, logdet = self.couple(x2, *conditioning)
        grad_y1, grad_y2 = self.split(grad_y)
        outputs, grads_out = _differentiable((y2_re, logdet), (grad_y2, grad_logdet))
        g = torch.autograd.grad(outputs, [x1, x2, *params], grads_out, allow_unused=True)
        grad_x1 = grad_y1 if g[0] is None else grad_y1 + g[0]
        grad_x = torch.cat([grad_x1, g[1]], 1) if need_input_grad else None
        return torch.cat([x1.detach(), x2.detach()], 1), grad_x, dict(zip(params, g[2:]))


class Squeeze(InvertibleLayer):
    """Space-to-depth: ``[B, C, H, W] -> [B, 4C, H/2, W/2]``; a permutation, log|det| = 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c4, h, w = y.shape
        c = c4 // 4
        return y.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class FlowStep(Chain):
    """One step of flow: actnorm -> permutation (1x1 conv, shuffle or reverse) -> coupling."""

    def __init__(self, num_channels: int, hidden_channels: int, coupling: str = "affine",
                 permutation: str = "invconv_lu", generator: torch.Generator | None = None,
                 components: int = MIXTURE_COMPONENTS, attention_heads: int = 0, gated: bool = False):
        super().__init__()
        if permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
        self.actnorm = ActNorm(num_channels)
        if permutation in ("invconv", "invconv_lu"):
            self.permute = InvConv1x1(num_channels, lu=permutation == "invconv_lu", generator=generator)
        else:
            self.permute = Permute(num_channels, permutation, generator)
        self.coupling = Coupling(num_channels, hidden_channels, coupling, generator, components, attention_heads,
                                 gated)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._one_node(x):
            return self._forward_one_node(x)
        return super().forward(x)

    def _one_node(self, x: torch.Tensor) -> bool:
        """Whether this step runs as :func:`fast.affine_step`: its own layers under the plain memory
        mode (``self.memory``; the level's mode runs whole steps), an affine coupling with the
        standard network after actnorm and a 1x1 convolution, all actnorms initialised, and an
        input the fast path is for."""
        net = self.coupling.net
        return (self.memory == "none" and self.coupling.kind == "affine" and isinstance(self.permute, InvConv1x1)
                and net.plain and all(layer.weights_ready() for layer in (self.actnorm, *net.net))
                and fast.affine_step_fits(x))

    def _forward_one_node(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, logs_sum = self.actnorm.weight_tensors()
        w, w_logdet, _ = self.permute._weights(need_inverse=False)
        net = tuple(t for layer in self.coupling.net.net for t in layer.weight_tensors())
        y, logdet = fast.affine_step(x, scale.view(-1), self.actnorm.bias.view(-1), w, net,
                                     self.coupling.num_pass, COUPLING_SCALE_SHIFT)
        return y, logdet + (logs_sum + w_logdet) * (x.shape[2] * x.shape[3])


class SplitPrior(InvertibleLayer):
    """Multi-scale split: the second channel half is standardised under a prior conditioned on the first.

    ``z2 ~ N(mean(z1), exp(logs(z1))^2)`` with ``(mean, logs)`` from a zero-initialised conv on the
    kept half ``z1``. ``forward(x) = ([z1, eps2], -sum(logs))`` with ``eps2 = (z2 - mean) / exp(logs)``:
    a bijection on x's shape whose second half is unit Gaussian under the model. :class:`Level`
    hands that half (:meth:`separate`) to the model and passes ``z1`` on.

    With ``spatial=(H, W)`` a zero-initialised per-position term is added to ``(mean, logs)``: a
    convolution cannot tell the centre of an image from its border, and centred datasets
    (Fashion-MNIST) have very different statistics there.
    """

    def __init__(self, num_channels: int, spatial: tuple[int, int] | None = None):
        super().__init__()
        self.num_keep = num_channels - num_channels // 2
        self.num_out = num_channels // 2
        self.conv = ZeroConv2d(self.num_keep, 2 * self.num_out)
        self.position = nn.Parameter(torch.zeros(1, 2 * self.num_out, *spatial)) if spatial else None

    def separate(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[z1, eps] -> (z1, eps)``: the half that stays in the flow, the standardised half."""
        return y[:, : self.num_keep], y[:, self.num_keep:]

    def _mean_logs(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(z1)
        if self.position is not None:
            h = h + self.position
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = self.separate(x)
        mean, logs = self._mean_logs(z1)
        eps = (z2 - mean) * torch.exp(-logs)
        return torch.cat([z1, eps], 1), -logs.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        z1, eps = self.separate(y)
        mean, logs = self._mean_logs(z1)
        return torch.cat([z1, mean + torch.exp(logs) * eps], 1)


class Level(Chain):
    """One scale of the multi-scale architecture: squeeze, K flow steps, then (except on the last
    level) a split whose second half leaves the flow. ``[B, C, H, W] -> [B, 4C, H/2, W/2]``.

    The steps run under the level's memory mode (``level.steps.memory``).
    """

    def __init__(self, in_channels: int, steps: int, hidden_channels: int, coupling: str, permutation: str,
                 last: bool, generator: torch.Generator, spatial: tuple[int, int] | None = None,
                 components: int = MIXTURE_COMPONENTS, attention_heads: int = 0, gated: bool = False):
        super().__init__()
        channels = 4 * in_channels
        self.squeeze = Squeeze()
        self.steps = Chain(*(FlowStep(channels, hidden_channels, coupling, permutation, generator, components,
                                      attention_heads, gated)
                             for _ in range(steps)))
        self.split = None if last else SplitPrior(channels, spatial)
        self.out_channels = channels if last else self.split.num_keep  # what goes on to the next level

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.steps.memory != "none":  # the other modes recompute each layer on its own
            return super().forward(x)
        with fast.prepared_weights(self.steps):
            return super().forward(x)

    def separate(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This level's output -> (what goes on to the next level, the latent that leaves here or None)."""
        return (y, None) if self.split is None else self.split.separate(y)


class TopPrior(InvertibleLayer):
    """Prior on the last level's latent: ``N(mean, exp(logs)^2)``, learned when ``learn_top``.

    With ``num_classes`` the mean and log-scale also get a zero-initialised linear term in the
    one-hot label ``y_onehot`` ``[B, K]`` (class-conditional prior). ``forward(z, y_onehot)``
    standardises, ``-> (eps, logdet)``, like :class:`SplitPrior`; ``inverse(eps, y_onehot)``.
    It is the one layer that takes conditioning.
    """

    def __init__(self, shape: tuple[int, int, int], learn_top: bool = True, num_classes: int | None = None):
        super().__init__()
        c, h, w = shape
        self.learn_top = learn_top
        self.num_classes = num_classes
        if learn_top:
            self.params = nn.Parameter(torch.zeros(1, 2 * c, h, w))
        else:
            self.register_buffer("params", torch.zeros(1, 2 * c, h, w))
        if num_classes:
            self.class_embed = nn.Linear(num_classes, 2 * c)
            nn.init.zeros_(self.class_embed.weight)
            nn.init.zeros_(self.class_embed.bias)

    def _mean_logs(self, batch: int, y_onehot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.params.expand(batch, -1, -1, -1)
        if self.num_classes:
            if y_onehot is None:
                raise ValueError("this model has a class-conditional prior: pass labels y")
            h = h + self.class_embed(y_onehot)[:, :, None, None]
        elif y_onehot is not None:
            raise ValueError("labels were given to a prior that is not class-conditional")
        return h[:, 0::2], h[:, 1::2]

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logs = self._mean_logs(z.shape[0], y_onehot)
        return (z - mean) * torch.exp(-logs), -logs.flatten(1).sum(1)

    def inverse(self, eps: torch.Tensor, y_onehot: torch.Tensor | None = None) -> torch.Tensor:
        mean, logs = self._mean_logs(eps.shape[0], y_onehot)
        return mean + torch.exp(logs) * eps
