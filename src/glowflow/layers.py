"""The invertible layers of Glow, under one interface.

Every layer is an :class:`InvertibleLayer`: an ``nn.Module`` with ``forward(x) -> (y, logdet)`` and
``inverse(y) -> x``, ``logdet = log|det dy/dx|`` per sample, shaped ``[B]``. Images are
``[B, C, H, W]``. A layer that is conditioned (on a class one-hot today, on an image or a feature
map next) takes the conditioning tensor by keyword, ``forward(x, condition=c)``, and says so with
:attr:`~InvertibleLayer.takes_condition`; a :class:`Chain` hands it to exactly those of its layers
and refuses one that none of them would use. The couplings are in :mod:`glowflow.couplings`, the
blocks built from a config (flow step, level) in :mod:`glowflow.blocks`.

Each layer here is plain PyTorch, readable alone. Faster CPU routes to the same numbers live in
:mod:`glowflow.fast`, which reads these layers' parameters and never sets state on them.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.distributed as dist
import torch.nn as nn

from .memory import run_layers

__all__ = ["InvertibleLayer", "Chain", "ActNorm", "InvConv1x1", "Permute", "Squeeze", "SplitPrior", "TopPrior",
           "ZeroConv2d", "random_rotation", "channel_mix", "inverse_scale_floor", "scale_floor",
           "STABLE_SCALE_FLOOR", "LOGSCALE_FACTOR", "differentiable"]

# Couplings whose inverse divides by a learned scale (affine, mixture) bound it from below within
# inverse_scale_floor. At latents far from any data such a scale can underflow and the division
# overflow; the forward map is never touched.
_SCALE_FLOOR = contextvars.ContextVar("glowflow_inverse_scale_floor", default=0.0)
# The floor sampling and latent edits use: far below any scale the data produce (docs/editing.md),
# so the latents of data decode exactly as without it.
STABLE_SCALE_FLOOR = 1e-3


@contextlib.contextmanager
def inverse_scale_floor(floor: float):
    """Within the block, couplings that divide by a learned scale invert with
    ``scale = max(scale, floor)``. The forward map is untouched, and so is any inverse whose scales
    are all above ``floor`` (those of data are, for a small enough floor), so
    ``decode(encode(x))`` stays exact; latents off the data decode to finite images instead of
    overflowing."""
    if not floor >= 0.0:
        raise ValueError(f"the scale floor must be >= 0, got {floor}")
    token = _SCALE_FLOOR.set(float(floor))
    try:
        yield
    finally:
        _SCALE_FLOOR.reset(token)


def scale_floor() -> float:
    """The floor :func:`inverse_scale_floor` set for this block (0: none)."""
    return _SCALE_FLOOR.get()


def _condition_kwargs(layer, condition) -> dict:
    """``{"condition": condition}`` for a layer that takes one, else ``{}``."""
    return {"condition": condition} if layer.takes_condition else {}


class InvertibleLayer(nn.Module):
    """The one interface of the flow's layers.

    Subclasses implement ``forward(x) -> (y, logdet [B])`` and ``inverse(y) -> x``; a conditioned
    layer also takes ``condition`` by keyword in both and sets :attr:`takes_condition`.
    :meth:`backward_from_output` serves the invertible memory mode (memory.py), which stores no
    activations and rebuilds each layer's input from its output; layers override it only where
    the inverse and the recomputed forward can share work.
    """

    @property
    def takes_condition(self) -> bool:
        """Whether ``forward`` and ``inverse`` take a ``condition`` keyword (and need it)."""
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward_from_output(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                             need_input_grad: bool = True, condition: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """From this layer's output ``y`` and the loss's gradients w.r.t. ``y`` and ``logdet``:
        ``(x, dL/dx or None, {parameter: dL/dparameter})`` with ``x = inverse(y)`` rebuilt; a
        ``condition`` that requires grad gets its gradient in the dict too.

        The default inverts without a graph, recomputes ``forward(x)`` with one and differentiates it.
        """
        kwargs = _condition_kwargs(self, condition)
        with torch.no_grad():
            x = self.inverse(y, **kwargs)
        x = x.detach().requires_grad_(need_input_grad)
        params = [p for p in self.parameters() if p.requires_grad]
        if kwargs and condition.requires_grad:
            params.append(condition)
        inputs = ([x] if need_input_grad else []) + params
        if not inputs:
            return x.detach(), None, {}
        with torch.enable_grad():
            y_re, logdet = self(x, **kwargs)
        outputs, grads_out = differentiable((y_re, logdet), (grad_y, grad_logdet))
        grads = list(torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True)) if outputs else \
            [None] * len(inputs)
        grad_x = grads.pop(0) if need_input_grad else None
        return x.detach(), grad_x, dict(zip(params, grads))


def differentiable(outputs, grads):
    """The (output, gradient) pairs whose output is part of a graph (a constant log|det| is not)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    return tuple(o for o, _ in pairs), tuple(g for _, g in pairs)


class Chain(InvertibleLayer):
    """Layers applied in order; ``logdet`` is the sum of theirs. Children are registered by name
    (subclasses) or by position (``Chain(a, b, c)``) and run in registration order. A
    ``condition`` goes to the layers that take one.

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

    @property
    def takes_condition(self) -> bool:
        return any(layer.takes_condition for layer in self)

    def _check_condition(self, condition) -> None:
        if condition is not None and not self.takes_condition:
            raise ValueError("a condition was given, but no layer of this chain takes one")

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_condition(condition)
        return run_layers(list(self), x, self.memory, condition)

    def inverse(self, y: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self._check_condition(condition)
        for layer in reversed(list(self)):
            y = layer.inverse(y, **_condition_kwargs(layer, condition))
        return y

    def backward_from_output(self, y, grad_y, grad_logdet, need_input_grad=True, condition=None):
        """Layer by layer from the last: each rebuilds its input and passes the gradient on; a
        condition's gradients from several layers add up."""
        layers = list(self)
        grads: dict = {}
        for k in range(len(layers) - 1, -1, -1):
            need = need_input_grad or k > 0
            kwargs = _condition_kwargs(layers[k], condition)
            y, grad_y, g = layers[k].backward_from_output(y, grad_y, grad_logdet, need, **kwargs)
            for tensor, grad in g.items():
                grads[tensor] = grad if tensor not in grads or grads[tensor] is None or grad is None \
                    else grads[tensor] + grad
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


class ActNorm(InvertibleLayer):
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        return y, _per_sample(self.logs.sum() * (x.shape[2] * x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


def random_rotation(num_channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal matrix with determinant +1 (QR of a Gaussian matrix). On the meta device
    (a model built only to count its parameters) an empty matrix of the same shape."""
    q, r = torch.linalg.qr(torch.randn(num_channels, num_channels, generator=generator, dtype=torch.float64))
    if q.is_meta:
        return q.float()
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def channel_mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y[b, i] = sum_j w[i, j] x[b, j]`` at every pixel: ``w [C, C]``, ``x [B, C, H, W]``; the
    1x1 convolution as one matrix product over batch and space."""
    return torch.einsum("ij,bjhw->bihw", w, x)


class InvConv1x1(InvertibleLayer):
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

    def factors(self) -> tuple[torch.Tensor, ...]:
        """What ``W`` is computed from, the arguments of :meth:`compose`: ``(W,)``, or the LU
        factors ``(P, L, U, log|s|, sign(s), lower mask, I)``."""
        if self.lu:
            return self.p, self.lower, self.upper, self.log_s, self.sign_s, self.lower_mask, self.eye
        return (self.weight,)

    @staticmethod
    def compose(*factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, log|det W|)`` from :meth:`factors`; also for factors stacked along a new first
        dimension (many layers at once)."""
        if len(factors) == 1:
            (weight,) = factors
            return weight, torch.linalg.slogdet(weight.double())[1].to(weight.dtype)
        p, lower, upper, log_s, sign_s, lower_mask, eye = factors
        lower = lower * lower_mask + eye
        upper = upper * lower_mask.transpose(-1, -2) + torch.diag_embed(sign_s * torch.exp(log_s))
        return p @ lower @ upper, log_s.sum(-1)

    def _version_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())

    def _weights(self, need_inverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.training or torch.is_grad_enabled():
            w, logdet = self.compose(*self.factors())
            inv = torch.linalg.inv(w.double()).to(w.dtype) if need_inverse else None
            return w, logdet, inv
        key = self._version_key()
        if self._cache is None or self._cache[0] != key:
            w, logdet = self.compose(*self.factors())
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
            y = channel_mix(w.to(x.dtype), x)
        return y, _per_sample(logdet * (x.shape[2] * x.shape[3]), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            _, _, inv = self._weights(need_inverse=True)
            return channel_mix(inv.to(y.dtype), y)


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


# Scale on the zero-initialised layers' learned log-scale, as in the official code: lets the
# output scale move quickly while starting at exactly 1.
LOGSCALE_FACTOR = 3.0


class ZeroConv2d(nn.Module):
    """Convolution initialised to output zero, with a learned per-channel output scale
    ``exp(LOGSCALE_FACTOR * logs)``: each step of flow starts as (nearly) the identity."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.logs * LOGSCALE_FACTOR)


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


class TopPrior(InvertibleLayer):
    """Prior on the last level's latent: ``N(mean, exp(logs)^2)``, learned when ``learn_top``.

    With ``num_classes`` the mean and log-scale also get a zero-initialised linear term in the
    one-hot label, the ``condition`` ``[B, K]`` (class-conditional prior): ``forward(z,
    condition=onehot)`` standardises, ``-> (eps, logdet)``, like :class:`SplitPrior`;
    ``inverse(eps, condition=onehot)``.
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

    @property
    def takes_condition(self) -> bool:
        return bool(self.num_classes)

    def _mean_logs(self, batch: int, condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.params.expand(batch, -1, -1, -1)
        if self.num_classes:
            if condition is None:
                raise ValueError("this model has a class-conditional prior: pass labels y")
            h = h + self.class_embed(condition)[:, :, None, None]
        elif condition is not None:
            raise ValueError("labels were given to a prior that is not class-conditional")
        return h[:, 0::2], h[:, 1::2]

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logs = self._mean_logs(z.shape[0], condition)
        return (z - mean) * torch.exp(-logs), -logs.flatten(1).sum(1)

    def inverse(self, eps: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        mean, logs = self._mean_logs(eps.shape[0], condition)
        return mean + torch.exp(logs) * eps
