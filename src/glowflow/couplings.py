"""Coupling layers: one base class owns the split, the network and the plumbing; each kind of
coupling is a subclass that gives only its elementwise transform.

The first channel half ``x1`` passes through unchanged and conditions the second::

    h       = net([x1, condition])          # [B, params_per_channel * C2, H, W]
    y2, ld  = transform(x2, h)              # the kind's map and its log|det| [B]
    x2      = inverse_transform(y2, h)

A subclass sets :meth:`~Coupling.params_per_channel` (how many network outputs each changed
channel needs), :meth:`~Coupling.transform` and :meth:`~Coupling.inverse_transform`, and
registers its name with :func:`register`; config validation, parameter counting, the command
line's choices and the tests all read :data:`COUPLINGS`. Options of a kind (a mixture's
components, a spline's bins) are its keyword arguments, declared in :attr:`~Coupling.defaults`
and set from a config's ``coupling_options``.

Example, the whole additive coupling (NICE)::

    @register("additive")
    class AdditiveCoupling(Coupling):
        def params_per_channel(self): return 1
        def transform(self, x2, h): return x2 + h, x2.new_zeros(x2.shape[0])
        def inverse_transform(self, y2, h): return y2 - h
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from .layers import InvertibleLayer, differentiable, scale_floor
from .mixture import mixture_logit, mixture_logit_inverse
from .networks import CouplingNet
from .splines import rational_quadratic, rational_quadratic_inverse

__all__ = ["Coupling", "AffineCoupling", "AdditiveCoupling", "MixtureCoupling", "SplineCoupling", "COUPLINGS", "register",
           "coupling_class", "COUPLING_SCALE_SHIFT"]

COUPLINGS: dict[str, type["Coupling"]] = {}

# The affine (and mixture) couplings' scale is sigmoid(h + COUPLING_SCALE_SHIFT): in (0, 1), so
# that step never amplifies, and close to 1 at initialisation (h = 0), as in the official code.
COUPLING_SCALE_SHIFT = 2.0


def register(name: str):
    """Class decorator: make a :class:`Coupling` subclass available as ``coupling=name``."""
    def add(cls):
        if name in COUPLINGS:
            raise ValueError(f"a coupling named {name!r} is already registered ({COUPLINGS[name].__name__})")
        cls.name = name
        COUPLINGS[name] = cls
        return cls
    return add


def coupling_class(name: str) -> type["Coupling"]:
    """The registered coupling called ``name``, or a ValueError listing the known ones."""
    if name not in COUPLINGS:
        raise ValueError(f"coupling must be one of {tuple(COUPLINGS)}, got {name!r}")
    return COUPLINGS[name]


class Coupling(InvertibleLayer):
    """The first channel half passes through and, with an optional ``condition``, sets the
    parameters of an invertible elementwise map of the second half.

    ``condition_channels > 0``: the network also sees a conditioning tensor, passed by keyword,
    ``[B, K]`` (broadcast over the image) or ``[B, K, H', W']`` (resized to the layer's H, W).
    Options of the kind are keyword arguments (see :attr:`defaults`).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}  # the kind's options and their default values

    def __init__(self, num_channels: int, hidden_channels: int, *, condition_channels: int = 0,
                 attention_heads: int = 0, gated: bool = False, generator: torch.Generator | None = None,
                 **options):
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got {num_channels}")
        self.options = self.check_options(options)
        for key, value in self.options.items():
            setattr(self, key, value)
        self.num_pass = num_channels - num_channels // 2
        self.num_change = num_channels // 2
        self.condition_channels = condition_channels
        self.net = CouplingNet(self.num_pass + condition_channels, self.params_per_channel() * self.num_change,
                               hidden_channels, generator, attention_heads, gated)

    @classmethod
    def check_options(cls, options: dict) -> dict:
        """``options`` with the kind's defaults filled in; unknown keys and values of the wrong
        type are refused by name. Subclasses add range checks."""
        unknown = set(options) - set(cls.defaults)
        if unknown:
            known = ", ".join(cls.defaults) or "none"
            raise ValueError(f"unknown options {sorted(unknown)} for coupling {cls.name!r} (its options: {known})")
        out = dict(cls.defaults)
        for key, value in options.items():
            kind = type(cls.defaults[key])
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (kind is int and not float(value).is_integer()):
                raise ValueError(f"coupling option {key} must be a{'n integer' if kind is int else ' number'}, "
                                 f"got {value!r}")
            out[key] = kind(value)
        return out

    # ------------------------------------------------------------------ what a kind gives
    def params_per_channel(self) -> int:
        """Network outputs per changed channel."""
        raise NotImplementedError

    def transform(self, x2: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The changed half's map given the network's output ``h``: ``(y2, log|det| [B])``."""
        raise NotImplementedError

    def inverse_transform(self, y2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`transform` for the same ``h``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the plumbing
    @property
    def takes_condition(self) -> bool:
        return self.condition_channels > 0

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x -> (x1, x2)``: the half that passes through, the half that is changed."""
        return x[:, : self.num_pass], x[:, self.num_pass:]

    def network_input(self, x1: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """``x1``, with the condition concatenated as extra channels if this coupling takes one."""
        if not self.condition_channels:
            if condition is not None:
                raise ValueError("a condition was given to a coupling built without condition_channels")
            return x1
        if condition is None:
            raise ValueError(f"this coupling is conditioned ({self.condition_channels} channels): pass condition=")
        c = condition.to(x1.dtype)
        if c.dim() == 2:
            c = c[:, :, None, None].expand(-1, -1, *x1.shape[2:])
        elif c.dim() == 4 and c.shape[2:] != x1.shape[2:]:
            c = F.adaptive_avg_pool2d(c, x1.shape[2:])
        if c.dim() != 4 or c.shape[:2] != (x1.shape[0], self.condition_channels):
            raise ValueError(f"condition must be [{x1.shape[0]}, {self.condition_channels}] or "
                             f"[{x1.shape[0]}, {self.condition_channels}, H, W], got {list(condition.shape)}")
        return torch.cat([x1, c], 1)

    def network(self, x1: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The transform's parameters ``h`` from the pass-through half (in full precision, also
        when the network ran under autocast)."""
        return self.net(self.network_input(x1, condition)).to(x1.dtype)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = self.split(x)
        y2, logdet = self.transform(x2, self.network(x1, condition))
        return torch.cat([x1, y2], 1), logdet

    def inverse(self, y: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        y1, y2 = self.split(y)
        return torch.cat([y1, self.inverse_transform(y2, self.network(y1, condition))], 1)

    def backward_from_output(self, y, grad_y, grad_logdet, need_input_grad=True, condition=None):
        """One network evaluation serves both the inverse and the recomputed forward: the inverse
        needs ``net(y1)``, the forward ``net(x1)``, and ``x1 == y1`` exactly."""
        params = [p for p in self.parameters() if p.requires_grad]
        if condition is not None and condition.requires_grad:
            params.append(condition)
        y1, y2 = self.split(y.detach())
        with torch.enable_grad():
            x1 = y1.detach().requires_grad_(True)
            h = self.network(x1, condition)
            with torch.no_grad():  # the inverse's own graph is never used
                x2 = self.inverse_transform(y2, h).requires_grad_(True)
            y2_re, logdet = self.transform(x2, h)
        grad_y1, grad_y2 = self.split(grad_y)
        outputs, grads_out = differentiable((y2_re, logdet), (grad_y2, grad_logdet))
        g = torch.autograd.grad(outputs, [x1, x2, *params], grads_out, allow_unused=True)
        grad_x1 = grad_y1 if g[0] is None else grad_y1 + g[0]
        grad_x = torch.cat([grad_x1, g[1]], 1) if need_input_grad else None
        return torch.cat([x1.detach(), x2.detach()], 1), grad_x, dict(zip(params, g[2:]))


def _sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def _divide(y2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y2 / scale``, the scale bounded below by :func:`~glowflow.layers.inverse_scale_floor`."""
    floor = scale_floor()
    return y2 / (scale.clamp_min(floor) if floor > 0.0 else scale)


@register("affine")
class AffineCoupling(Coupling):
    """RealNVP/Glow: ``y2 = (x2 + shift) * scale``, ``scale = sigmoid(h + 2)`` in (0, 1)."""

    def params_per_channel(self) -> int:
        return 2

    @staticmethod
    def shift_scale(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output, interleaved per channel, as ``(shift, scale)``."""
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + COUPLING_SCALE_SHIFT)

    def transform(self, x2, h):
        shift, scale = self.shift_scale(h)
        return (x2 + shift) * scale, _sum_per_sample(torch.log(scale))

    def inverse_transform(self, y2, h):
        shift, scale = self.shift_scale(h)
        return _divide(y2, scale) - shift


@register("additive")
class AdditiveCoupling(Coupling):
    """NICE: ``y2 = x2 + shift``; volume-preserving."""

    def params_per_channel(self) -> int:
        return 1

    def transform(self, x2, h):
        return x2 + h, x2.new_zeros(x2.shape[0])

    def inverse_transform(self, y2, h):
        return y2 - h


@register("mixture")
class MixtureCoupling(Coupling):
    """Flow++ (Ho et al. 2019, section 3.2): ``y2 = (logit F(x2) + shift) * scale`` with ``F`` a
    mixture of ``components`` logistics (:mod:`glowflow.mixture`)."""

    defaults = {"components": 4}  # Flow++ used 32; 4 is the screen's choice on few cores (docs/ablation/)

    @classmethod
    def check_options(cls, options):
        out = super().check_options(options)
        if out["components"] < 1:
            raise ValueError(f"a mixture coupling needs at least 1 component, got {out['components']}")
        return out

    def params_per_channel(self) -> int:
        return 3 * self.components + 2

    def split_parameters(self, h):
        """``(shift, scale, (logit_pi, mu, log_s))`` from the network output, blocked by parameter."""
        k = self.components
        h = h.unflatten(1, (3 * k + 2, -1))
        return (h[:, 0], torch.sigmoid(h[:, 1] + COUPLING_SCALE_SHIFT),
                (h[:, 2: 2 + k], h[:, 2 + k: 2 + 2 * k], h[:, 2 + 2 * k:]))

    def transform(self, x2, h):
        shift, scale, mixture = self.split_parameters(h)
        u, log_slope = mixture_logit(x2, *mixture)
        return (u + shift) * scale, _sum_per_sample(torch.log(scale) + log_slope)

    def inverse_transform(self, y2, h):
        shift, scale, mixture = self.split_parameters(h)
        return mixture_logit_inverse(_divide(y2, scale) - shift, *mixture)


@register("spline")
class SplineCoupling(Coupling):
    """Neural spline flow (Durkan et al. 2019): ``y2`` a monotonic rational-quadratic spline of
    ``x2`` with ``bins`` bins on ``[-tail_bound, tail_bound]``, the identity outside
    (:mod:`glowflow.splines`)."""

    defaults = {"bins": 8, "tail_bound": 3.0}

    @classmethod
    def check_options(cls, options):
        out = super().check_options(options)
        if out["bins"] < 1 or not out["tail_bound"] > 0:
            raise ValueError(f"a spline coupling needs bins >= 1 and tail_bound > 0, got {out}")
        return out

    def params_per_channel(self) -> int:
        return 3 * self.bins - 1

    def _spline_parameters(self, h):
        """``[B, (3K - 1) C2, H, W]`` -> ``[B, C2, H, W, 3K - 1]``."""
        return h.unflatten(1, (3 * self.bins - 1, -1)).movedim(1, -1)

    def transform(self, x2, h):
        y2, log_slope = rational_quadratic(x2, self._spline_parameters(h), self.tail_bound)
        return y2, _sum_per_sample(log_slope)

    def inverse_transform(self, y2, h):
        return rational_quadratic_inverse(y2, self._spline_parameters(h), self.tail_bound)
