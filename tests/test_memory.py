"""Memory modes: "checkpoint" and "invertible" give the plain path's gradients, and "invertible" keeps
no per-step activations (counted exactly with saved-tensor hooks, the CPU version of the memory claim).

The gradient tests use a tiny float64 model after data-dependent init, every zero-initialised
parameter perturbed and the 1x1 convolutions moved off rotations, so no step is the identity.
"""
from __future__ import annotations

import pytest
import torch

import importlib.util
from pathlib import Path

from glowflow import Glow, GlowConfig, fast
from glowflow.blocks import FlowStep
from glowflow.couplings import COUPLINGS
from glowflow.layers import InvertibleLayer
from glowflow.memory import MEMORY_MODES, run_layers

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


def _saved_tensor_bytes(loss_fn) -> int:
    """benchmarks/memory.py's measure of what autograd stores for backward (one definition for both)."""
    spec = importlib.util.spec_from_file_location("glowflow_memory_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.saved_tensor_bytes(loss_fn)

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 8, 8)
TINY = dict(image_shape=SHAPE, levels=2, steps=3, hidden_channels=8)
PERMUTATIONS = ("invconv", "invconv_lu", "shuffle", "reverse")


def _images(batch: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """8-bit-valued images in [0, 1], ``[batch, *SHAPE]``."""
    k = torch.randint(0, 256, (batch, *SHAPE), generator=torch.Generator().manual_seed(seed))
    return (k / 255.0).to(dtype)


def _models(perturb_zero_init, perturb_all, dtype=torch.float64, **overrides) -> dict[str, Glow]:
    """One initialised, perturbed model per memory mode, all with the same weights."""
    cfg = {**TINY, **overrides}
    reference = Glow(**cfg, memory="none").to(dtype)
    reference.initialize(_images(16, seed=100, dtype=dtype), generator=torch.Generator().manual_seed(0))
    perturb_all(perturb_zero_init(reference, std=0.1), std=0.02)
    models = {"none": reference}
    for mode in MEMORY_MODES[1:]:
        m = Glow(**cfg, memory=mode).to(dtype)
        m.load_state_dict(reference.state_dict())
        models[mode] = m
    return models


def _bpd_gradients(model: Glow, x: torch.Tensor, noise: torch.Tensor):
    """Mean bits/dim and its gradients w.r.t. every parameter and the continuous input.

    Quantisation cuts the gradient to ``x``; the dequantisation noise enters linearly, so its gradient
    is (1 / n_bins times) the gradient w.r.t. the continuous input of the flow.
    """
    model.zero_grad(set_to_none=True)
    noise = noise.clone().requires_grad_(True)
    bpd = model(x, noise=noise).bits_per_dim.mean()
    bpd.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return bpd.detach(), noise.grad.clone(), grads


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_checkpoint_and_invertible_gradients_equal_plain_autograd(coupling, permutation, perturb_zero_init,
                                                                  perturb_all):
    _check_memory_modes_match_plain(_models(perturb_zero_init, perturb_all, coupling=coupling,
                                            permutation=permutation))


@pytest.mark.parametrize("network", [dict(attention_levels=TINY["levels"], attention_heads=2),
                                     dict(gated_levels=TINY["levels"])], ids=["attention", "gated"])
def test_checkpoint_and_invertible_gradients_with_other_coupling_networks(network, perturb_zero_init, perturb_all):
    _check_memory_modes_match_plain(_models(perturb_zero_init, perturb_all, permutation="invconv_lu", **network))


def _check_memory_modes_match_plain(models: dict[str, Glow]) -> None:
    x = _images(4, seed=1)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    bpd_ref, gin_ref, g_ref = _bpd_gradients(models["none"], x, noise)

    # the reference is not trivial: every parameter of every step gets a gradient
    step_grads = [g for name, g in g_ref.items() if ".steps." in name]
    assert len(step_grads) == len([n for n, _ in models["none"].named_parameters() if ".steps." in n])
    assert all(g.abs().max() > 0 for g in step_grads)
    assert gin_ref.abs().max() > 0

    for mode in ("checkpoint", "invertible"):
        bpd, gin, g = _bpd_gradients(models[mode], x, noise)
        assert _max_rel(bpd, bpd_ref) <= 1e-12, mode
        assert _max_rel(gin, gin_ref) <= 1e-4, mode
        assert set(g) == set(g_ref), mode
        worst = max(_max_rel(g[n], g_ref[n]) for n in g_ref)
        assert worst <= 1e-4, (mode, worst)
        # float64: equal up to rounding, not just within 1e-4 (a spline's inverse is a quadratic's root,
        # whose rounding grows where the spline is flat)
        assert worst <= 1e-7, (mode, worst)


def test_invertible_gradients_through_a_deep_sequence(perturb_zero_init, perturb_all):
    """K=12 steps: the chained inverses still give the plain gradients within the required 1e-4.

    Not to rounding level: each inverse amplifies the error it is handed by its step's Lipschitz
    constant (here up to ~1e3: the coupling nets' hidden actnorms start with gains ~20), so float64
    ends near 1e-6 after 12 steps. The plain path needs no inverse and has no such error."""
    models = _models(perturb_zero_init, perturb_all, steps=12, coupling="affine", permutation="invconv")
    x = _images(3, seed=3)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, gin_ref, g_ref = _bpd_gradients(models["none"], x, noise)
    _, gin, g = _bpd_gradients(models["invertible"], x, noise)
    assert _max_rel(gin, gin_ref) <= 1e-4
    assert max(_max_rel(g[n], g_ref[n]) for n in g_ref) <= 1e-4


def test_invertible_gradient_of_the_logdet_alone_and_of_a_frozen_input(perturb_zero_init, perturb_all):
    """Backward with only some outputs used, and an input that needs no gradient, on run_layers itself."""
    models = _models(perturb_zero_init, perturb_all)
    level_ref, level_inv = models["none"].levels[0], models["invertible"].levels[0]
    z = torch.randn(2, 8, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for use in ("logdet", "y"):
        grads = []
        for level, mode in ((level_ref, "none"), (level_inv, "invertible")):
            level.zero_grad(set_to_none=True)
            y, logdet = run_layers(list(level.steps), z, mode)
            (logdet.sum() if use == "logdet" else y.square().sum()).backward()
            grads.append([p.grad for p in level.steps.parameters()])
        for a, b in zip(*grads):
            assert (a is None) == (b is None)
            if b is not None:
                assert _max_rel(a, b) <= 1e-10, use


class _OtherStep(InvertibleLayer):
    """A layer with only forward and inverse: run_layers takes its generic inverse-then-recompute path."""

    def __init__(self, config, generator):
        super().__init__()
        self.step = FlowStep(config, 0, generator)

    def forward(self, x):
        return self.step(x)

    def inverse(self, y):
        return self.step.inverse(y)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_generic_path_for_other_steps_equals_plain_autograd(coupling, perturb_zero_init, perturb_all):
    z = torch.randn(3, 8, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    grads = {}
    for mode in ("none", "invertible"):
        g = torch.Generator().manual_seed(0)
        config = GlowConfig(image_shape=(2, 8, 8), levels=1, steps=1, hidden_channels=8, coupling=coupling,
                            permutation="invconv")
        steps = torch.nn.ModuleList(_OtherStep(config, g) for _ in range(3)).double()
        with torch.no_grad():
            run_layers(list(steps), z)  # data-dependent init
        perturb_all(perturb_zero_init(steps, std=0.1), std=0.02)
        zi = z.clone().requires_grad_(True)
        y, logdet = run_layers(list(steps), zi, mode)
        (y.square().sum() + logdet.sum()).backward()
        grads[mode] = [zi.grad] + [p.grad for p in steps.parameters()]
    for a, b in zip(grads["invertible"], grads["none"]):
        assert _max_rel(a, b) <= 1e-8


def test_invertible_backward_evaluates_each_coupling_net_once(monkeypatch, perturb_zero_init, perturb_all):
    """The coupling's inverse and its recomputed forward share one net evaluation per step."""
    models = _models(perturb_zero_init, perturb_all)
    model = models["invertible"]
    calls = []
    for m in model.modules():
        if type(m).__name__ == "CouplingNet":
            m.register_forward_hook(lambda *a: calls.append(1))
    one_node = fast.affine_step  # few-channel steps evaluate their net inside one node
    monkeypatch.setattr(fast, "affine_step", lambda *a, **k: calls.append(1) or one_node(*a, **k))
    x = _images(2, seed=15)
    bpd = model(x, noise=torch.rand(x.shape, dtype=torch.float64)).bits_per_dim.mean()
    num_steps = len(calls)
    assert num_steps == TINY["levels"] * TINY["steps"]
    bpd.backward()
    assert len(calls) == 2 * num_steps  # forward once, backward once


def test_invertible_backward_twice_through_a_retained_graph(perturb_zero_init, perturb_all):
    models = _models(perturb_zero_init, perturb_all)
    x = _images(2, seed=12)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    _, _, once = _bpd_gradients(models["none"], x, noise)
    model = models["invertible"]
    model.zero_grad(set_to_none=True)
    bpd = model(x, noise=noise).bits_per_dim.mean()
    bpd.backward(retain_graph=True)
    bpd.backward()
    assert max(_max_rel(p.grad, 2 * once[n]) for n, p in model.named_parameters()) <= 1e-8


def test_invertible_under_autocast_recomputes_with_the_forward_precision(perturb_zero_init, perturb_all):
    """Under bf16 autocast the coupling nets run in bf16; backward must recompute them in bf16 too,
    or its graph (and its inverse) would not be the one the forward pass used."""
    models = _models(perturb_zero_init, perturb_all, dtype=torch.float32, coupling="affine")
    x = _images(4, seed=6, dtype=torch.float32)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    results = {}
    for mode in ("none", "invertible"):
        # both on the layers as written: the plain mode's fast paths round differently in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16), fast.reference():
            results[mode] = _bpd_gradients(models[mode], x, noise)
    with torch.no_grad():
        full = models["none"](x, noise=noise).bits_per_dim.mean()
    bpd_ref, gin_ref, g_ref = results["none"]
    bpd, gin, g = results["invertible"]
    assert bpd.dtype == torch.float32
    assert abs(bpd_ref - full) > 1e-6  # autocast really changed the computation
    assert _max_rel(bpd, bpd_ref) <= 1e-6
    assert _max_rel(gin, gin_ref) <= 1e-3
    assert max(_max_rel(g[n], g_ref[n]) for n in g_ref) <= 1e-3


# ---------------------------------------------------------------------------- what is stored
def test_invertible_stores_nothing_per_step_while_plain_grows_with_depth():
    x = _images(4, seed=8, dtype=torch.float32)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(9))
    saved = {}
    for mode in ("none", "invertible"):
        for steps in (2, 8):
            model = Glow(**{**TINY, "steps": steps, "hidden_channels": 16}, memory=mode)
            model.initialize(x)
            saved[mode, steps] = _saved_tensor_bytes(lambda: model(x, noise=noise).bits_per_dim.mean())
    # plain autograd keeps every step's activations: 4x the steps, about 4x the bytes
    assert saved["none", 8] > 3 * saved["none", 2]
    # invertible keeps the output of each level's step sequence and nothing that depends on K
    assert saved["invertible", 8] == saved["invertible", 2]
    assert saved["invertible", 2] < saved["none", 2] / 2


def test_no_grad_and_eval_paths_are_the_plain_loop(perturb_zero_init, perturb_all):
    models = _models(perturb_zero_init, perturb_all)
    x = _images(2, seed=10)
    with torch.no_grad():
        outs = {mode: m.eval().log_prob(x) for mode, m in models.items()}
    # equal up to rounding: "none" alone runs on the fast paths (weight-side tensors computed per
    # level, folded scales), whose last bits can differ from the layers' own
    for mode in ("invertible", "checkpoint"):
        torch.testing.assert_close(outs[mode], outs["none"], rtol=1e-13, atol=1e-11)


def test_unknown_memory_mode_is_refused():
    with pytest.raises(ValueError, match="memory must be one of"):
        run_layers([], torch.zeros(1, 4, 2, 2), "bogus")


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_every_coupling_trains_under_every_memory_mode(coupling):
    """Adam steps on one batch lower its bits/dim under each memory mode, by the same steps (in
    float64: in float32 rounding alone sends a spline's bins elsewhere within a few steps)."""
    x = _images(8, seed=20)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    losses = {}
    for mode in MEMORY_MODES:
        model = Glow(**TINY, coupling=coupling, memory=mode).double()
        model.initialize(x, noise=noise)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        trace = []
        for _ in range(12):
            loss = model(x, noise=noise).bits_per_dim.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses[mode] = trace
        assert trace[-1] < trace[0] - 0.05, (mode, trace)
    for mode in MEMORY_MODES[1:]:
        assert losses[mode] == pytest.approx(losses["none"], rel=1e-5)
