"""Invertible layers of Glow.

Every layer is an ``nn.Module`` with ``forward(x, **cond) -> (y, logdet)`` and
``inverse(y, **cond) -> x``; ``logdet`` is ``log|det dy/dx|`` per sample, shaped ``[B]``.
Images are ``[B, C, H, W]``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .convs import conv2d_same

# Scale on the zero-initialised layers' learned log-scale, as in the official code: lets the
# output scale move quickly while starting at exactly 1.
LOGSCALE_FACTOR = 3.0


def _per_sample(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar log-determinant shared by the whole batch -> ``[B]``."""
    return value.expand(x.shape[0])


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


class ActNorm(nn.Module):
    """Per-channel affine map ``y = (x + bias) * exp(logs)``, initialised from the first batch.

    The first forward pass sets ``bias`` and ``logs`` so that its output has zero mean and unit
    variance per channel. ``initialized`` is a buffer, so a loaded model never re-initialises.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean, var = _global_channel_moments(x.detach())
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_(-0.5 * torch.log(var + self.eps).view_as(self.logs))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.initialized):
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        logdet = self.logs.sum() * (x.shape[2] * x.shape[3])
        return y, _per_sample(logdet, x)

    def inverse(self, y: torch.Tensor, **cond) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


def random_rotation(num_channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal matrix with determinant +1 (QR of a Gaussian matrix)."""
    q, r = torch.linalg.qr(torch.randn(num_channels, num_channels, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


class InvConv1x1(nn.Module):
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

    def _weight_and_logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lu:
            lower = self.lower * self.lower_mask + self.eye
            upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
            return self.p @ lower @ upper, self.log_s.sum()
        logdet = torch.linalg.slogdet(self.weight.double())[1].to(self.weight.dtype)
        return self.weight, logdet

    def _version_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())

    def _weights(self, need_inverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.training or torch.is_grad_enabled():
            w, logdet = self._weight_and_logdet()
            inv = torch.linalg.inv(w.double()).to(w.dtype) if need_inverse else None
            return w, logdet, inv
        key = self._version_key()
        if self._cache is None or self._cache[0] != key:
            w, logdet = self._weight_and_logdet()
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
    def forward(self, x: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            w, logdet, _ = self._weights(need_inverse=False)
            y = _channel_mix(w.to(x.dtype), x)
        return y, _per_sample(logdet * (x.shape[2] * x.shape[3]), x)

    def inverse(self, y: torch.Tensor, **cond) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            _, _, inv = self._weights(need_inverse=True)
            return _channel_mix(inv.to(y.dtype), y)


def _channel_mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y[b, i] = sum_j w[i, j] x[b, j]`` at every pixel: a 1x1 convolution as one matrix product
    over batch and space (the output's strides are channel-major). On 2 CPU cores, with 4-16
    channels, 1-4% faster per training step than ``F.conv2d`` in paired runs."""
    return torch.einsum("ij,bjhw->bihw", w, x)


class Permute(nn.Module):
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

    def forward(self, x: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, **cond) -> torch.Tensor:
        return y[:, self.inv_perm]


def _scaled_conv(conv: nn.Conv2d, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(conv(x) + bias) * scale`` per output channel (``conv`` without its own bias) as a single
    convolution: the scale touches the (small) weights, not the activations."""
    scale = scale.view(-1)
    return conv2d_same(x, conv.weight * scale.view(-1, 1, 1, 1), bias.view(-1) * scale)


class ZeroConv2d(nn.Module):
    """Convolution initialised to output zero, with a learned per-channel output scale."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scaled_conv(self.conv, x, torch.exp(self.logs * LOGSCALE_FACTOR), self.conv.bias)


class _NormedConv(nn.Module):
    """Conv (no bias) followed by actnorm and ReLU: the hidden layers of the coupling network."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, generator=None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        with torch.no_grad():
            self.conv.weight.normal_(0.0, 0.05, generator=generator)
        self.norm = ActNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if not bool(norm.initialized):
            return F.relu(norm(self.conv(x))[0], inplace=True)
        # after init, actnorm is folded into the convolution
        return F.relu(_scaled_conv(self.conv, x, torch.exp(norm.logs), norm.bias), inplace=True)


class CouplingNet(nn.Module):
    """3x3 conv -> actnorm -> ReLU -> 1x1 conv -> actnorm -> ReLU -> zero-initialised 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, generator=None):
        super().__init__()
        self.net = nn.Sequential(
            _NormedConv(in_channels, hidden_channels, 3, generator),
            _NormedConv(hidden_channels, hidden_channels, 1, generator),
            ZeroConv2d(hidden_channels, out_channels, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            # oneDNN's convolutions are faster on NHWC inputs at these channel counts (a training
            # step of the default preset: about 1.15x); the flow's main path stays NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


class Coupling(nn.Module):
    """Affine or additive coupling: the first channel half passes through and conditions the second.

    affine:   y2 = (x2 + shift) * sigmoid(raw + 2)   (scale in (0, 1): stable, starts near 0.88)
    additive: y2 = x2 + shift
    """

    def __init__(self, num_channels: int, hidden_channels: int, kind: str = "affine", generator=None):
        super().__init__()
        if kind not in ("affine", "additive"):
            raise ValueError(f"coupling must be 'affine' or 'additive', got {kind!r}")
        if num_channels < 2:
            raise ValueError(f"coupling needs at least 2 channels, got {num_channels}")
        self.kind = kind
        self.num_pass = num_channels - num_channels // 2
        num_change = num_channels // 2
        out = 2 * num_change if kind == "affine" else num_change
        self.net = CouplingNet(self.num_pass, out, hidden_channels, generator)

    def _shift_scale(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.net(x1).to(x1.dtype)  # back to full precision under autocast
        if self.kind == "additive":
            return h, None
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.num_pass], x[:, self.num_pass :]
        shift, scale = self._shift_scale(x1)
        if scale is None:
            return torch.cat([x1, x2 + shift], 1), x.new_zeros(x.shape[0])
        y2 = (x2 + shift) * scale
        return torch.cat([x1, y2], 1), torch.log(scale).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, **cond) -> torch.Tensor:
        y1, y2 = y[:, : self.num_pass], y[:, self.num_pass :]
        shift, scale = self._shift_scale(y1)
        x2 = y2 - shift if scale is None else y2 / scale - shift
        return torch.cat([y1, x2], 1)


class Squeeze(nn.Module):
    """Space-to-depth: ``[B, C, H, W] -> [B, 4C, H/2, W/2]``; a permutation, log|det| = 0."""

    def forward(self, x: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: torch.Tensor, **cond) -> torch.Tensor:
        b, c4, h, w = y.shape
        c = c4 // 4
        return y.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class FlowStep(nn.Module):
    """One step of flow: actnorm -> permutation (1x1 conv, shuffle or reverse) -> coupling."""

    def __init__(self, num_channels: int, hidden_channels: int, coupling: str = "affine",
                 permutation: str = "invconv_lu", generator: torch.Generator | None = None):
        super().__init__()
        self.actnorm = ActNorm(num_channels)
        if permutation in ("invconv", "invconv_lu"):
            self.permute = InvConv1x1(num_channels, lu=permutation == "invconv_lu", generator=generator)
        elif permutation in ("shuffle", "reverse"):
            self.permute = Permute(num_channels, permutation, generator)
        else:
            raise ValueError("permutation must be one of 'invconv', 'invconv_lu', 'shuffle', 'reverse', "
                             f"got {permutation!r}")
        self.coupling = Coupling(num_channels, hidden_channels, coupling, generator)

    def forward(self, x: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.permute(x)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor, **cond) -> torch.Tensor:
        y = self.coupling.inverse(y)
        y = self.permute.inverse(y)
        return self.actnorm.inverse(y)


class SplitPrior(nn.Module):
    """Multi-scale split: half the channels leave the flow, standardised under a learned prior.

    ``z2 ~ N(mean(z1), exp(logs(z1))^2)`` with ``(mean, logs)`` from a zero-initialised conv on the
    kept half ``z1``. ``forward`` returns ``(z1, eps2, logdet)`` with ``eps2 = (z2 - mean) / exp(logs)``
    and ``logdet = -sum(logs)``, the log|det| of that standardisation.

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

    def _mean_logs(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(z1)
        if self.position is not None:
            h = h + self.position
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z1, z2 = x[:, : self.num_keep], x[:, self.num_keep :]
        mean, logs = self._mean_logs(z1)
        eps = (z2 - mean) * torch.exp(-logs)
        return z1, eps, -logs.flatten(1).sum(1)

    def inverse(self, z1: torch.Tensor, eps: torch.Tensor, **cond) -> torch.Tensor:
        mean, logs = self._mean_logs(z1)
        return torch.cat([z1, mean + torch.exp(logs) * eps], 1)


class TopPrior(nn.Module):
    """Prior on the last level's latent: ``N(mean, exp(logs)^2)``, learned when ``learn_top``.

    With ``num_classes`` the mean and log-scale also get a zero-initialised linear term in the
    one-hot label (class-conditional prior). ``forward`` standardises like :class:`SplitPrior`.
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
        return h[:, 0::2], h[:, 1::2]

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor | None = None, **cond):
        mean, logs = self._mean_logs(z.shape[0], y_onehot)
        return (z - mean) * torch.exp(-logs), -logs.flatten(1).sum(1)

    def inverse(self, eps: torch.Tensor, y_onehot: torch.Tensor | None = None, **cond) -> torch.Tensor:
        mean, logs = self._mean_logs(eps.shape[0], y_onehot)
        return mean + torch.exp(logs) * eps
