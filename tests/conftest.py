"""Shared test helpers: perturbing zero-initialised parameters, and a dtype guard."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn


def _perturb_zero_init(module: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Fill every parameter that is exactly zero everywhere with N(0, std^2) noise.

    Glow zero-initialises its coupling output convs, split priors and top prior so that the flow
    starts as (almost) the identity; a test of the math on such a model would not see those
    branches. Noise there makes every part of the map non-trivial.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) * std)
    return module


def _perturb_all(module: nn.Module, std: float = 0.05, seed: int = 1) -> nn.Module:
    """Add N(0, std^2) noise to every parameter (e.g. to move a 1x1 conv off a rotation, det != 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) * std)
    return module


def awake_glow(image_shape, init_images: torch.Tensor, levels: int = 2, steps: int = 2, hidden_channels: int = 8):
    """A small Glow in eval mode, its zero-initialised branches woken (N(0, 0.05^2), so every part of
    the flow acts) and data-dependent init run on ``init_images`` (float in [0, 1])."""
    from glowflow import Glow

    model = Glow(image_shape=image_shape, levels=levels, steps=steps, hidden_channels=hidden_channels)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if bool((p == 0).all()):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.initialize(init_images)
    return model.eval()


@pytest.fixture
def perturb_zero_init():
    return _perturb_zero_init


@pytest.fixture
def perturb_all():
    return _perturb_all


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """A test that changes the default dtype must not leak it into the next test."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests.

    On tiny tensors a second thread only adds synchronisation, and when other processes share the
    cores a spinning thread pool makes such tests 10-30x slower. Restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # Every test uses tiny tensors, where a second intra-op thread only adds synchronisation (and
    # stalls badly when other processes share the cores). Subprocesses the tests start set their own.
    torch.set_num_threads(1)
