"""Restoring images with a trained flow as the prior: denoising, inpainting, super-resolution,
deblurring and compressed sensing.

An observation is ``y = A(x) + noise`` for a known forward operator ``A`` (one class each below,
all with the same interface) and Gaussian noise of a known standard deviation ``noise_std``. The
flow maps standardised latents ``z`` to images ``x = G(z)`` one to one, so

* :func:`restore` finds the MAP estimate over the latents (Asim et al., ICML 2020, "Invertible
  generative models for inverse problems"): it minimises
  ``||A(G(z)) - y||^2 / (2 noise_std^2) + gamma * ||z||^2 / 2`` with L-BFGS (or Adam). With
  ``gamma = 1`` that is exactly ``-log p(z | y)`` up to a constant, the posterior over latents
  under the flow's unit Gaussian prior; a smaller ``gamma`` trusts the observation more.
  ``prior="likelihood"`` puts the image's exact negative log-density ``-log p(x)`` in place of the
  norm (the paper found the norm better: the density also rewards smooth, low-detail images).
* :func:`denoise` gives the posterior mean ``E[x | y]`` of a denoising in one backward pass, by
  Tweedie's formula, from a flow trained on noisy images (``noise_std`` in its config): no
  optimisation, and the estimate that minimises the mean squared error where :func:`restore`'s
  gives the mode.
* :func:`posterior_samples` draws from ``p(z | y)`` itself with the Metropolis-adjusted Langevin
  algorithm, started at the MAP estimate: the samples' per-pixel standard deviation says where
  the restoration is unsure (inside a mask, at edges the noise hides). The posterior over latents
  needs no Jacobian: ``p(z | y) ∝ p(y | G(z)) N(z; 0, I)``, and its image under ``G`` is the
  posterior over images.

Images are ``[B, C, H, W]`` in [0, 1]; observations have the shape the operator gives
(:meth:`Operator.observation_shape`). Example::

    >>> import torch
    >>> from glowflow import Glow
    >>> from glowflow.restore import Inpaint, restore
    >>> model = Glow(image_shape=(1, 8, 8), levels=1, steps=1, hidden_channels=4)
    >>> x = torch.rand(2, 1, 8, 8)
    >>> op = Inpaint.centre((1, 8, 8), fraction=0.25)
    >>> result = restore(model, op(x), op, noise_std=0.01, steps=5)
    >>> result.images.shape
    torch.Size([2, 1, 8, 8])
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data.transforms import translate

__all__ = ["Operator", "Denoise", "Inpaint", "Downsample", "Blur", "CompressedSensing", "OPERATORS",
           "make_operator", "degrade", "restore", "denoise", "view_list", "posterior_steps", "posterior_samples", "RestoreResult", "PosteriorResult", "psnr", "ssim",
           "REGIONS", "View", "VIEWS",
           "PRIORS", "OPTIMIZERS", "INITS"]

PRIORS = ("norm", "likelihood")
OPTIMIZERS = ("lbfgs", "adam")
INITS = ("naive", "zero")
# the solver's settings chosen on training faces (docs/restore.md): the noise a command assumes
# when given none, and the MAP's prior weight, steps and start
DEFAULT_NOISE = {"denoise": 0.1, "other": 0.01}
DEFAULT_GAMMA = 1.5
DEFAULT_STEPS = 12
DEFAULT_INIT = "zero"
DENOISE_BATCH = 32  # images in one pass of denoise (its views of a few images go together)
DEFAULT_DENOISE_SHIFT = 2  # denoise: moves of up to 2 pixels each way, chosen on training faces (docs/restore.md)
DEFAULT_THIN, DEFAULT_BURN_IN = 5, 50  # the Langevin sampler's: steps between kept samples, steps before
SSIM_WINDOW = 11  # the side of SSIM's Gaussian window: smaller images have no SSIM


# ----------------------------------------------------------------------------------- operators
class Operator:
    """A linear forward operator ``A``: images ``[B, C, H, W]`` -> observations.

    A subclass gives :meth:`forward` (``A x``), :meth:`adjoint` (``A^T y``, checked against
    ``<A x, y> = <x, A^T y>`` in the tests), :meth:`naive` (a quick estimate of ``x`` from ``y``
    alone, where the solver starts) and :meth:`observation_shape`; it registers under ``name``."""

    name = ""

    def __init__(self, image_shape):
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        self.image_shape = shape

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            OPERATORS[cls.name] = cls

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(self.check_images(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def naive(self, y: torch.Tensor) -> torch.Tensor:
        """An image estimate from ``y`` alone, clamped to [0, 1]."""
        return self.adjoint(y).clamp(0, 1)

    def observation_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def picture(self, y: torch.Tensor) -> torch.Tensor:
        """Observations as images of the model's size to show beside the restoration, in [0, 1]."""
        return y.clamp(0, 1)

    def check_images(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: expected images [B, {', '.join(map(str, self.image_shape))}], got {got}")
        return x

    def check_observation(self, y: torch.Tensor) -> torch.Tensor:
        want = self.observation_shape()
        if not isinstance(y, torch.Tensor) or y.dim() != len(want) + 1 or tuple(y.shape[1:]) != want:
            got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{self.name}: expected observations [B, {', '.join(map(str, want))}], got {got}")
        if not y.is_floating_point() or not torch.isfinite(y).all():
            raise ValueError(f"{self.name}: observations must be finite real numbers")
        return y

    def to(self, device=None, dtype=None) -> "Operator":
        """This operator with its tensors on ``device`` / in ``dtype``."""
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device=device, dtype=dtype if value.is_floating_point() else None))
        return self


OPERATORS: dict[str, type[Operator]] = {}


class Denoise(Operator):
    """``A = I``: the observation is the image plus noise."""

    name = "denoise"

    def forward(self, x):
        return x

    def adjoint(self, y):
        return y


# (top, left, height, width) as shares of the image's sides, for centred upright faces
FACE_REGIONS = {"eyes": (0.34, 0.12, 0.16, 0.76), "mouth": (0.72, 0.26, 0.15, 0.48)}
REGIONS = ("centre", "random", *FACE_REGIONS)


class Inpaint(Operator):
    """Keeps the pixels where ``mask`` is 1 (observed) and zeroes the rest. ``mask`` is ``[H, W]``
    (all channels) or ``[C, H, W]`` of 0/1 values. :meth:`centre`, :meth:`random` and :meth:`box`
    make the usual ones."""

    name = "inpaint"

    def __init__(self, image_shape, mask):
        super().__init__(image_shape)
        mask = torch.as_tensor(mask)
        c, h, w = self.image_shape
        if mask.dim() == 2 and tuple(mask.shape) == (h, w):
            mask = mask[None].expand(c, h, w)
        if tuple(mask.shape) != self.image_shape:
            raise ValueError(f"inpaint: the mask must be [H, W] = [{h}, {w}] or [C, H, W], got {list(mask.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("inpaint: the mask must hold 0 (missing) and 1 (observed) only")
        if not mask.any():
            raise ValueError("inpaint: the mask observes no pixel; there is nothing to restore from")
        self.mask = mask.float().contiguous()

    @classmethod
    def box(cls, image_shape, top: int, left: int, height: int, width: int) -> "Inpaint":
        """Every pixel observed except the rectangle ``[top:top+height, left:left+width]``."""
        c, h, w = image_shape
        if height < 1 or width < 1 or top < 0 or left < 0 or top + height > h or left + width > w:
            raise ValueError(f"inpaint: the box {height}x{width} at ({top}, {left}) does not lie inside {h}x{w}")
        mask = torch.ones(h, w)
        mask[top:top + height, left:left + width] = 0
        return cls(image_shape, mask)

    @classmethod
    def centre(cls, image_shape, fraction: float = 0.3) -> "Inpaint":
        """A centred square holding about ``fraction`` of the pixels missing."""
        if not 0 < fraction < 1:
            raise ValueError(f"inpaint: the missing fraction must lie in (0, 1), got {fraction}")
        _, h, w = image_shape
        side_h, side_w = max(1, round(h * math.sqrt(fraction))), max(1, round(w * math.sqrt(fraction)))
        return cls.box(image_shape, (h - side_h) // 2, (w - side_w) // 2, side_h, side_w)

    @classmethod
    def random(cls, image_shape, fraction: float = 0.3, seed: int = 0) -> "Inpaint":
        """``fraction`` of the pixels (all channels of each) missing at random, drawn from ``seed``."""
        if not 0 < fraction < 1:
            raise ValueError(f"inpaint: the missing fraction must lie in (0, 1), got {fraction}")
        _, h, w = image_shape
        order = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(h * w)
        mask[order[:round(fraction * h * w)]] = 0
        return cls(image_shape, mask.view(h, w))

    @classmethod
    def region(cls, image_shape, region: str, fraction: float = 0.3, seed: int = 0) -> "Inpaint":
        """A named mask (:data:`REGIONS`): ``"centre"`` and ``"random"`` as :meth:`centre` and
        :meth:`random`; ``"eyes"`` and ``"mouth"`` a band across where they lie in a centred,
        upright face crop (the orl-faces model's: the eyes a little over a third of the way down, the mouth
        about three quarters)."""
        if region == "centre":
            return cls.centre(image_shape, fraction)
        if region == "random":
            return cls.random(image_shape, fraction, seed)
        if region not in FACE_REGIONS:
            raise ValueError(f"inpaint: unknown region {region!r}; expected one of {', '.join(REGIONS)}")
        _, h, w = image_shape
        top, left, height, width = FACE_REGIONS[region]
        return cls.box(image_shape, round(top * h), round(left * w), max(1, round(height * h)),
                       max(1, round(width * w)))

    def forward(self, x):
        return x * self.mask

    def adjoint(self, y):
        return y * self.mask

    def naive(self, y):
        """Missing pixels filled with the mean of the observed ones, per image and channel."""
        observed = self.mask.sum((1, 2)).clamp_min(1)
        mean = (y * self.mask).sum((2, 3)) / observed
        return (y * self.mask + (1 - self.mask) * mean[:, :, None, None]).clamp(0, 1)


class Downsample(Operator):
    """Super-resolution: the average of each ``factor`` x ``factor`` block (a box kernel)."""

    name = "superres"

    def __init__(self, image_shape, factor: int = 2):
        super().__init__(image_shape)
        _, h, w = self.image_shape
        if not isinstance(factor, int) or factor < 2:
            raise ValueError(f"superres: the factor must be an integer >= 2, got {factor!r}")
        if h % factor or w % factor:
            raise ValueError(f"superres: the factor {factor} must divide the image's sides {h}x{w}")
        self.factor = factor

    def observation_shape(self):
        c, h, w = self.image_shape
        return (c, h // self.factor, w // self.factor)

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor**2

    def picture(self, y):
        """The small image, enlarged pixel for pixel."""
        return F.interpolate(y, scale_factor=self.factor, mode="nearest").clamp(0, 1)

    def naive(self, y):
        """Bicubic upsampling of the small image."""
        return F.interpolate(y, scale_factor=self.factor, mode="bicubic", align_corners=False).clamp(0, 1)


class Blur(Operator):
    """A Gaussian blur of standard deviation ``sigma`` pixels (zero padding, so ``A`` is exactly
    symmetric: its adjoint is itself)."""

    name = "deblur"

    def __init__(self, image_shape, sigma: float = 1.0):
        super().__init__(image_shape)
        if not (isinstance(sigma, (int, float)) and 0 < sigma <= 16):
            raise ValueError(f"deblur: sigma must lie in (0, 16] pixels, got {sigma!r}")
        radius = max(1, math.ceil(3 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        self.sigma, self.radius = float(sigma), radius
        self.kernel = (k[:, None] * k[None, :]).float()

    def forward(self, x):
        c = x.shape[1]
        weight = self.kernel.to(x)[None, None].expand(c, 1, *self.kernel.shape)
        return F.conv2d(x, weight, padding=self.radius, groups=c)

    adjoint = forward

    def naive(self, y):
        return y.clamp(0, 1)


class CompressedSensing(Operator):
    """``m`` random Gaussian measurements of the whole image: ``y = Phi x`` with ``Phi`` of shape
    ``[m, C*H*W]``, entries drawn from N(0, 1/m) with ``seed``. ``ratio`` gives ``m`` as a share
    of the pixels."""

    name = "cs"

    def __init__(self, image_shape, ratio: float = 0.4, seed: int = 0, measurements: int | None = None):
        super().__init__(image_shape)
        d = math.prod(self.image_shape)
        m = measurements if measurements is not None else round(ratio * d)
        if not (isinstance(m, int) and 1 <= m <= d):
            raise ValueError(f"cs: the number of measurements must lie in [1, {d}] (a ratio in (0, 1]), got {m!r}")
        self.measurements, self.seed = m, seed
        gen = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(m, d, generator=gen) / math.sqrt(m)

    def observation_shape(self):
        return (self.measurements,)

    def forward(self, x):
        return x.flatten(1) @ self.matrix.to(x).T

    def adjoint(self, y):
        return (y @ self.matrix.to(y)).view(-1, *self.image_shape)

    def picture(self, y):
        """The image the measurements give by least squares (:meth:`naive`)."""
        return self.naive(y)

    def naive(self, y):
        """The least-squares solution of least norm, ``Phi^+ y``, around the mid-grey image."""
        phi = self.matrix.to(y)
        mid = torch.full((1, phi.shape[1]), 0.5, dtype=y.dtype, device=y.device)
        residual = y - mid @ phi.T
        x = mid + torch.linalg.lstsq(phi, residual.T).solution.T
        return x.view(-1, *self.image_shape).clamp(0, 1)


def _check_noise_std(noise_std) -> None:
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and 0 <= noise_std <= 1):
        raise ValueError(f"noise_std must lie in [0, 1] (images in [0, 1]), got {noise_std!r}")


def degrade(x: torch.Tensor, operator: Operator, noise_std: float, seed: int = 0) -> torch.Tensor:
    """An observation of clean images ``x``: ``A x`` plus Gaussian noise of ``noise_std`` drawn
    from ``seed`` (on the CPU, so every device draws the same noise). The missing pixels of an
    inpainting observation stay 0: nothing was observed there, not even noise."""
    _check_noise_std(noise_std)
    clean = operator(x)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = (noise_std * noise).to(device=clean.device, dtype=clean.dtype)
    return clean + (noise * operator.mask if isinstance(operator, Inpaint) else noise)


def make_operator(task: str, image_shape, **options) -> Operator:
    """The operator of ``task`` (:data:`OPERATORS`: denoise, inpaint, superres, deblur, cs)."""
    if task not in OPERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(OPERATORS)}")
    return OPERATORS[task](image_shape, **options)


# ----------------------------------------------------------------------------------- solver
@dataclass
class RestoreResult:
    """``images`` ``[B, C, H, W]`` clamped to [0, 1]: the mean of the ``views`` MAP estimates
    ``view_images`` ``[V, B, C, H, W]``; ``latents`` ``[B, D]`` those of the first view (the image
    as it is), where :func:`posterior_samples` starts; per image the data misfit ``||A x - y||^2`` of
    ``images`` and ``||z||^2`` of ``latents``; ``history`` the first view's objective (sum over the
    batch) after each outer step."""

    images: torch.Tensor
    latents: torch.Tensor
    misfit: torch.Tensor
    latent_norm2: torch.Tensor
    history: list[float] = field(default_factory=list)
    view_images: torch.Tensor | None = None


class View:
    """A rearrangement of the pixels under which the prior is (nearly) unchanged: a left-right
    mirror (the faces and Fashion-MNIST models were trained on mirrored images too) and a cyclic
    shift of ``shift`` pixels down and right. :func:`restore` with ``views=V`` solves the problem
    once through each of the first V of :data:`VIEWS` (the decoder's image rearranged before the
    operator sees it) and averages the restorations: the single MAP estimate's artefacts (a
    blotch, the flow's 2x2 checkerboard) differ from view to view and average away."""

    def __init__(self, mirror: bool = False, shift: tuple[int, int] = (0, 0)):
        self.mirror, self.shift = mirror, tuple(shift)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flip(3) if self.mirror else x
        return torch.roll(x, self.shift, (2, 3)) if any(self.shift) else x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.roll(x, (-self.shift[0], -self.shift[1]), (2, 3)) if any(self.shift) else x
        return x.flip(3) if self.mirror else x

    def __repr__(self):
        return f"View(mirror={self.mirror}, shift={self.shift})"


VIEWS = tuple(View(m, d) for d in ((0, 0), (1, 1), (0, 1), (1, 0)) for m in (False, True))


def _objective(model, z, y, operator, noise_std, gamma, prior, labels, view=None):
    x = model.decode(z, labels)
    seen = x if view is None else view(x)
    misfit = (operator.forward(seen) - y).flatten(1).pow(2).sum(1)
    if prior == "norm":
        penalty = 0.5 * gamma * z.pow(2).sum(1)
    else:  # the image's exact -log p(x), in nats
        penalty = -gamma * model.log_prob(x.clamp(0, 1), labels)
    return misfit / (2 * noise_std**2) + penalty, misfit, seen


def _noise_floor(model, noise_std: float) -> float:
    """The noise level the misfit is weighed by: ``noise_std``, at least the quantisation's own
    (a uniform error over one of ``2^n_bits`` levels), so a noiseless observation stays finite."""
    return max(float(noise_std), 1.0 / (2**model.config.n_bits * math.sqrt(12)))


def _problem(model, y, operator, noise_std):
    """The checked observation and operator on the model's device and dtype, and the noise level
    the misfit is weighed by; what :func:`restore` and :func:`posterior_samples` both start from."""
    if tuple(operator.image_shape) != tuple(model.config.image_shape):
        raise ValueError(f"the operator is for images {operator.image_shape}, the model takes "
                         f"{tuple(model.config.image_shape)}")
    if model.config.noise_std:
        raise ValueError(f"this model is of noisy images (noise_std {model.config.noise_std}): as a prior it would "
                         "put the noise back; denoise with glowflow.restore.denoise, restore with a model of "
                         "clean images")
    operator.check_observation(y)
    _check_noise_std(noise_std)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    return (y.to(device=device, dtype=dtype), operator.to(device=device, dtype=dtype),
            _noise_floor(model, noise_std))


@contextmanager
def _frozen(model):
    """``model`` in eval mode with no parameter gradients (only the latents are optimised or
    sampled), as it was afterwards."""
    was_training, requires = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)


def _check_solver(gamma, prior, optimizer, init, steps):
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def view_list(views: int | None = None, mirror: bool = True) -> list:
    """The first ``views`` of :data:`VIEWS` (every one allowed when None), the mirrored ones only
    with ``mirror``: the views :func:`restore` averages over (:func:`denoise` averages over moves)."""
    if views is None:
        return [v for v in VIEWS if mirror or not v.mirror]
    if not (isinstance(views, int) and 1 <= views <= len(VIEWS)):
        raise ValueError(f"views must be an integer 1..{len(VIEWS)}, got {views!r}")
    chosen = [v for v in VIEWS if mirror or not v.mirror][:views]
    if len(chosen) < views:
        raise ValueError(f"views must be at most {len(chosen)} without mirroring, got {views}")
    return chosen


def _solve(model, y, operator, sigma, gamma, prior, steps, optimizer, lr, z0, labels, view, progress):
    """One MAP estimate from latents ``z0``: the best finite iterate's latents and the history."""
    z = z0.clone().requires_grad_(True)
    best = {"value": math.inf, "z": z0.clone()}
    device, dtype = y.device, y.dtype

    def evaluate():
        value, _, _ = _objective(model, z, y, operator, sigma, gamma, prior, labels, view)
        total = value.sum()
        if torch.isfinite(total) and total.item() < best["value"]:
            best["value"], best["z"] = total.item(), z.detach().clone()
        return total

    def make(rate):
        if optimizer == "lbfgs":
            return torch.optim.LBFGS([z], lr=rate, max_iter=10, history_size=20, line_search_fn="strong_wolfe",
                                     tolerance_grad=1e-9, tolerance_change=1e-12)
        return torch.optim.Adam([z], lr=rate)

    def closure():
        opt.zero_grad()
        total = evaluate()
        if not torch.isfinite(total):  # a step too far: L-BFGS's line search backs off
            return torch.tensor(float("inf"), device=device, dtype=dtype)
        total.backward()
        return total

    rate = (1.0 if optimizer == "lbfgs" else 0.05) if lr is None else lr
    opt, history = make(rate), []
    for step in range(steps):
        try:
            opt.step(closure)
            failed = not torch.isfinite(z).all()
        except ValueError:  # the decode of a non-finite latent
            failed = True
        if failed:  # back to the best finite iterate, with a fresh optimiser taking shorter steps
            with torch.no_grad():
                z.copy_(best["z"])
            rate /= 4
            opt = make(rate)
        history.append(best["value"])
        if progress is not None:
            progress(step + 1, best["value"])
    return best["z"], history


def restore(model, y: torch.Tensor, operator: Operator, noise_std: float = 0.05, gamma: float = DEFAULT_GAMMA,
            prior: str = "norm", steps: int = DEFAULT_STEPS, optimizer: str = "lbfgs", lr: float | None = None,
            init: str = DEFAULT_INIT, views: int = 1, mirror: bool = True, labels: torch.Tensor | None = None,
            progress=None) -> RestoreResult:
    """The MAP estimate of the images behind observations ``y`` (see the module's docstring),
    averaged over ``views`` rearrangements of the pixels (:class:`View`; 1: the image as it is);
    ``mirror=False`` leaves out the mirrored ones, for data that is not left-right symmetric
    (Fashion-MNIST's shoes all point one way).

    ``steps``: L-BFGS outer steps (each up to 10 evaluations with a strong-Wolfe line search) or
    Adam steps, per view. ``init="naive"`` starts from ``encode`` of the operator's naive estimate,
    ``"zero"`` from the mean latent. The same inputs give the same result (no randomness).
    ``progress``, a callable ``(step, total, objective)``, is told after each step of each view.
    """
    y, operator, sigma = _problem(model, y, operator, noise_std)
    _check_solver(gamma, prior, optimizer, init, steps)
    chosen = view_list(views, mirror)
    dtype, device = y.dtype, y.device
    with _frozen(model):
        images, first, history = [], None, []
        for k, view in enumerate(chosen):
            with torch.no_grad():
                z0 = (model.encode(view.inverse(operator.naive(y)), labels) if init == "naive"
                      else torch.zeros(y.shape[0], model.num_dims, device=device, dtype=dtype))

            def told(step, value, k=k):
                if progress is not None:
                    progress(k * steps + step, views * steps, value)

            z, h = _solve(model, y, operator, sigma, gamma, prior, steps, optimizer, lr, z0, labels, view, told)
            with torch.no_grad():
                images.append(view(model.decode(z, labels)).clamp(0, 1))
            if first is None:
                first, history = z, h
        stack = torch.stack(images)
        x = stack.mean(0)
        with torch.no_grad():
            misfit = (operator.forward(x) - y).flatten(1).pow(2).sum(1)
        return RestoreResult(x, first, misfit, first.pow(2).sum(1), history, stack)


# ----------------------------------------------------------------------------------- Tweedie
def _moved(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` moved ``dy`` pixels down and ``dx`` right (negative: up, left), the
    uncovered border filled with copies of the edge pixels, as the training translations fill it."""
    p = max(abs(dy), abs(dx))
    if not p:
        return x
    offsets = torch.tensor([[p - dy], [p - dx]]).expand(2, x.shape[0])
    return translate(x, offsets, p)


def denoise(model, y: torch.Tensor, noise_std: float | None = None, shift: int = DEFAULT_DENOISE_SHIFT,
            mirror: bool = True, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """The posterior mean ``E[x | y]`` of the images behind ``y = x + noise_std * n`` (``n``
    standard Gaussian), from a model of noisy images (``model.config.noise_std`` = ``s`` > 0, trained
    so: ``presets/orl-faces-64-denoise.json``), by Tweedie's formula (Robbins 1956; Efron 2011,
    "Tweedie's formula and selection bias")::

        E[x | y] = y + s^2 * grad_y log p_s(y)

    where ``p_s`` is the density of noisy images, which the flow gives exactly and whose gradient
    is one backward pass: no optimisation, and no choice of prior weight. It is the estimate with
    the least mean squared error under the model (:func:`restore` gives the mode); its errors are
    the model's, and they differ when the image is moved, so the estimate is averaged over the
    image moved by every ``(dy, dx)`` with ``|dy|, |dx| <= shift`` pixels (default 2, chosen on
    training faces; the border filled with copies of the edge pixels, as the training translations
    fill it; each pixel averaged over the moves that keep it in the frame) and, with ``mirror``,
    mirrored too: ``(2 shift + 1)^2`` gradients, twice that mirrored, :data:`DENOISE_BATCH` images
    to a pass.

    ``noise_std`` (default: the model's ``s``) below ``s``: the observation's noise is first topped
    up to ``s`` with ``sqrt(s^2 - noise_std^2)`` times Gaussian draws from ``seed`` (a fresh draw
    per move), which gives up some of the observation's detail; above: refused. Returns
    ``[B, C, H, W]`` clamped to [0, 1].
    """
    s = model.config.noise_std
    if not s:
        raise ValueError("denoise needs a model of noisy images (noise_std > 0 in its config, e.g. "
                         "orl-faces-denoise); with a model of clean images use restore(..., Denoise(...))")
    noise_std = s if noise_std is None else noise_std
    _check_noise_std(noise_std)
    if noise_std > s + 1e-12:
        raise ValueError(f"this model is of images with noise {s}; it cannot denoise noisier observations "
                         f"(noise_std {noise_std}): train one at that level (model.noise_std={noise_std})")
    h, w = model.config.image_shape[1:]
    if not (isinstance(shift, int) and not isinstance(shift, bool) and 0 <= shift < min(h, w)):
        raise ValueError(f"shift must be an integer 0..{min(h, w) - 1} (pixels), got {shift!r}")
    Denoise(model.config.image_shape).check_observation(y)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    y = y.to(device=device, dtype=dtype)
    top_up = math.sqrt(max(s * s - noise_std * noise_std, 0.0))
    gen = torch.Generator().manual_seed(seed)
    total, count = torch.zeros_like(y), torch.zeros_like(y)
    views = [(flip, dy, dx) for flip in ((False, True) if mirror else (False,))
             for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]
    together = max(1, DENOISE_BATCH // y.shape[0])  # views whose gradients one pass takes
    with _frozen(model):
        for start in range(0, len(views), together):
            chunk, seens = views[start:start + together], []
            for flip, _, _ in chunk:
                seen = y
                if top_up:
                    draw = torch.randn(y.shape, generator=gen, dtype=torch.float64)
                    seen = y + top_up * draw.to(device=device, dtype=dtype)
                seens.append(seen.flip(3) if flip else seen)
            u = torch.cat([_moved(seen, dy, dx) for seen, (_, dy, dx) in zip(seens, chunk)])
            u = u.detach().requires_grad_(True)
            grads = torch.autograd.grad(model.log_prob(u, None if labels is None else labels.repeat(len(chunk))).sum(),
                                        u)[0].split(y.shape[0])
            for (flip, dy, dx), seen, grad in zip(chunk, seens, grads):
                # pixel (i, j) of seen sits at (i + dy, j + dx) of the moved image, when inside the frame
                rows, cols = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
                moved = (slice(rows.start + dy, rows.stop + dy), slice(cols.start + dx, cols.stop + dx))
                estimate, covered = torch.zeros_like(seen), torch.zeros_like(seen)
                estimate[..., rows, cols] = seen[..., rows, cols] + s * s * grad[..., moved[0], moved[1]]
                covered[..., rows, cols] = 1
                total += estimate.flip(3) if flip else estimate
                count += covered.flip(3) if flip else covered
    return (total / count).clamp(0, 1).detach()


# ----------------------------------------------------------------------------------- posterior
@dataclass
class PosteriorResult:
    """``mean`` and ``std`` ``[B, C, H, W]``: the per-pixel mean and standard deviation of the
    posterior samples ``samples`` ``[S, B, C, H, W]``; ``acceptance`` the Metropolis acceptance
    rate per image after burn-in; ``step_size`` per image as adapted."""

    mean: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor
    acceptance: torch.Tensor
    step_size: torch.Tensor


def posterior_steps(num_samples: int, thin: int = DEFAULT_THIN, burn_in: int = DEFAULT_BURN_IN) -> int:
    """How many Langevin steps :func:`posterior_samples` takes for these settings (for progress)."""
    return burn_in + num_samples * thin


def posterior_samples(model, y: torch.Tensor, operator: Operator, noise_std: float, start: torch.Tensor,
                      num_samples: int = 16, thin: int = DEFAULT_THIN, burn_in: int = DEFAULT_BURN_IN,
                      step_size: float = 1e-3,
                      seed: int = 0, labels: torch.Tensor | None = None, progress=None) -> PosteriorResult:
    """Samples of ``p(z | y) ∝ N(y; A G(z), noise_std^2) N(z; 0, I)`` by the Metropolis-adjusted
    Langevin algorithm from latents ``start`` (the MAP estimate's), decoded to images.

    One chain per image; its step size adapts during ``burn_in`` towards an acceptance rate of
    0.57 (Roberts & Rosenthal 1998) and is then held, so the chain samples the posterior exactly.
    ``num_samples`` samples are kept, ``thin`` steps apart. Randomness comes from ``seed`` alone.
    """
    y, operator, sigma = _problem(model, y, operator, noise_std)
    if not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    if not (isinstance(thin, int) and thin >= 1 and isinstance(burn_in, int) and burn_in >= 0):
        raise ValueError(f"thin must be >= 1 and burn_in >= 0, got {thin!r}, {burn_in!r}")
    if not (isinstance(step_size, (int, float)) and step_size > 0):
        raise ValueError(f"step_size must be > 0, got {step_size!r}")
    dtype, device = y.dtype, y.device
    gen = torch.Generator(device=device).manual_seed(seed)

    def energy_and_grad(z):
        z = z.detach().requires_grad_(True)
        try:
            u, _, x = _objective(model, z, y, operator, sigma, 1.0, "norm", labels)
        except ValueError:  # a latent whose decode is not finite: infinite energy
            inf = torch.full((z.shape[0],), math.inf, device=device, dtype=dtype)
            return inf, torch.zeros_like(z), None
        g, = torch.autograd.grad(u.sum(), z)
        u = torch.where(torch.isfinite(u) & torch.isfinite(g).all(1), u, torch.full_like(u, math.inf))
        return u.detach(), torch.nan_to_num(g), x.detach()

    with _frozen(model):
        z = start.detach().to(device=device, dtype=dtype).clone()
        u, g, x = energy_and_grad(z)
        if not torch.isfinite(u).all():
            raise ValueError("the starting latents' energy is not finite; start from restore(...).latents")
        h = torch.full((z.shape[0],), float(step_size), device=device, dtype=dtype)
        accepted = torch.zeros(z.shape[0], device=device, dtype=dtype)
        kept = []
        total = posterior_steps(num_samples, thin, burn_in)
        for k in range(total):
            noise = torch.randn(z.shape, generator=gen, device=device, dtype=dtype)
            hz = h[:, None]
            proposal = z - hz * g + torch.sqrt(2 * hz) * noise
            u_new, g_new, x_new = energy_and_grad(proposal)
            # log q(z | z') - log q(z' | z) for the Langevin proposal
            forward = ((proposal - z + hz * g) ** 2).sum(1) / (4 * h)
            backward = ((z - proposal + hz * g_new) ** 2).sum(1) / (4 * h)
            log_alpha = (u - u_new) + forward - backward
            log_alpha = torch.where(torch.isfinite(u_new), log_alpha, torch.full_like(log_alpha, -math.inf))
            accept = torch.log(torch.rand(z.shape[0], generator=gen, device=device, dtype=dtype)) < log_alpha
            z = torch.where(accept[:, None], proposal, z)
            u = torch.where(accept, u_new, u)
            g = torch.where(accept[:, None], g_new, g)
            if x_new is not None:
                x = torch.where(accept[:, None, None, None], x_new, x)
            if k < burn_in:  # Robbins-Monro on log h towards 0.57 acceptance
                rate = torch.exp(log_alpha.clamp(max=0))
                h = h * torch.exp((rate - 0.57) / math.sqrt(k + 1))
            else:
                accepted += accept.to(dtype)
                if (k - burn_in + 1) % thin == 0:
                    kept.append(x.clamp(0, 1))
            if progress is not None:
                progress(k + 1, total)
        samples = torch.stack(kept)
        return PosteriorResult(samples.mean(0), samples.std(0), samples,
                               accepted / max(1, num_samples * thin), h)


# ----------------------------------------------------------------------------------- metrics
def psnr(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], per image: ``[B, ...] -> [B]``."""
    if x.shape != reference.shape:
        raise ValueError(f"psnr: shapes differ, {list(x.shape)} and {list(reference.shape)}")
    mse = (x.double() - reference.double()).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-20))


def ssim(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Structural similarity of images in [0, 1], per image ``[B, ...] -> [B]``: Wang, Bovik,
    Sheikh & Simoncelli (2004) with their 11x11 Gaussian window of standard deviation 1.5,
    ``K1 = 0.01``, ``K2 = 0.03``, averaged over the positions where the window fits and over
    channels (what scikit-image's ``structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)`` computes)."""
    if x.shape != reference.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two [B, C, H, W] of one shape, got {list(x.shape)} and "
                         f"{list(reference.shape)}")
    c, h, w = x.shape[1:]
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"ssim: images of {h}x{w} are smaller than its {SSIM_WINDOW}x{SSIM_WINDOW} window")
    t = torch.arange(-(SSIM_WINDOW // 2), SSIM_WINDOW // 2 + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / 1.5) ** 2)
    k = k / k.sum()
    window = (k[:, None] * k[None, :])[None, None].expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)
    a, b = x.double(), reference.double()

    def mean(v):
        return F.conv2d(v, window, groups=c)

    mu_a, mu_b = mean(a), mean(b)
    var_a, var_b = mean(a * a) - mu_a**2, mean(b * b) - mu_b**2
    cov = mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
