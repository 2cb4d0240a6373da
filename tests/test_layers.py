"""The math of every invertible layer: exact inverse, and log|det| equal to the autograd Jacobian's.

All of it in float64 on tiny inputs ``[B=2, C=4, H=4, W=4]``, so a tolerance of 1e-8 separates a
correct log-determinant from a wrong one by many orders of magnitude.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from glowflow import GlowConfig
from glowflow.blocks import FlowStep, Level
from glowflow.couplings import COUPLINGS, coupling_class
from glowflow.layers import ActNorm, Chain, InvConv1x1, Permute, SplitPrior, Squeeze, TopPrior
from glowflow.networks import CouplingNet, SelfAttention

B, C, H, W = 2, 4, 4, 4
HIDDEN = 8
NUM_CLASSES = 3

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class Bijection:
    """A layer seen as a map of flat tensors: ``fwd(x, rows) -> (y, logdet)``, ``inv(y, rows) -> x``.

    ``rows`` selects the conditioning (labels) of the samples in ``x``.
    """

    layer: torch.nn.Module
    fwd: Callable
    inv: Callable
    changes_volume: bool  # a correct layer has log|det| != 0 here (guards against trivial passes)


def _as_bijection(layer: torch.nn.Module, changes_volume: bool, cond: dict | None = None) -> Bijection:
    cond = cond or {}

    def take(rows):
        return {k: v[rows] for k, v in cond.items()}

    def fwd(x, rows=slice(None)):
        return layer(x, **take(rows))

    def inv(y, rows=slice(None)):
        return layer.inverse(y, **take(rows))
    return Bijection(layer, fwd, inv, changes_volume)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(seed: int = 0) -> torch.Tensor:
    """``[B, C, H, W]`` float64 with per-channel means and scales far from (0, 1)."""
    g = _generator(seed)
    shift = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64).view(1, C, 1, 1)
    scale = torch.tensor([0.5, 2.0, 1.5, 0.3], dtype=torch.float64).view(1, C, 1, 1)
    return torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * scale + shift


# Each builder gets (x, perturb_zero_init, perturb_all) and returns a ready, initialised Bijection.
def _actnorm(x, pz, pa):
    layer = ActNorm(C).double()
    layer(_images(seed=7))  # data-dependent init on another batch: logs, bias far from 0
    return _as_bijection(layer, changes_volume=True)


def _invconv(lu: bool):
    def build(x, pz, pa):
        layer = InvConv1x1(C, lu=lu, generator=_generator()).double()
        pa(layer, std=0.2)  # a random rotation has log|det| = 0; move it off
        return _as_bijection(layer, changes_volume=True)
    return build


def _permute(mode: str):
    def build(x, pz, pa):
        return _as_bijection(Permute(C, mode, _generator()), changes_volume=False)
    return build


def _config(**overrides) -> GlowConfig:
    """An architecture whose first level's flow steps see ``[B, C, H, W]``."""
    return GlowConfig(**{"image_shape": (C // 4, 2 * H, 2 * W), "levels": 1, "steps": 2, "hidden_channels": HIDDEN,
                         **overrides})


def _coupling(kind: str, std: float = 0.2, condition: torch.Tensor | None = None, **options):
    """A coupling of the registered ``kind``, its zero-initialised output perturbed by ``std``;
    with ``condition`` (rows per sample), a conditioned one."""
    def build(x, pz, pa):
        channels = 0 if condition is None else condition.shape[1]
        layer = coupling_class(kind)(C, HIDDEN, generator=_generator(), condition_channels=channels, **options)
        cond = None if condition is None else {"condition": condition.double()}
        layer = pz(layer.double(), std=std)
        layer(x, **(cond or {}))  # init the actnorms inside the coupling network
        return _as_bijection(layer, changes_volume=kind != "additive", cond=cond)
    return build


def _squeeze(x, pz, pa):
    return _as_bijection(Squeeze(), changes_volume=False)


def _flowstep(permutation: str, coupling: str, std: float = 0.2):
    def build(x, pz, pa):
        layer = pz(FlowStep(_config(coupling=coupling, permutation=permutation), 0, _generator()).double(), std=std)
        layer(x)  # data-dependent init
        pa(layer, std=0.05)  # off the init point: nothing is exactly standardised or orthogonal
        return _as_bijection(layer, changes_volume=True)
    return build


def _split_prior(x, pz, pa):
    return _as_bijection(pz(SplitPrior(C).double(), std=0.2), changes_volume=True)


def _chain(x, pz, pa):
    layer = Chain(ActNorm(C), InvConv1x1(C, lu=True, generator=_generator()),
                  coupling_class("affine")(C, HIDDEN, generator=_generator()))
    layer = pz(layer.double(), std=0.2)
    layer(x)  # data-dependent init
    pa(layer, std=0.05)
    return _as_bijection(layer, changes_volume=True)


def _level(last: bool):
    def build(x, pz, pa):
        # squeeze to 16 channels at 2x2, two steps of flow, and (unless last) the split; smaller
        # perturbations than a single step's, whose composition at 2x2 gets too ill-conditioned
        # for a float64 inverse at 1e-10
        config = GlowConfig(image_shape=(C, H, W), levels=1 if last else 2, steps=2, hidden_channels=HIDDEN,
                            permutation="invconv_lu")
        layer = pz(Level(config, 0, _generator()).double(), std=0.1)
        layer(x)  # data-dependent init
        pa(layer, std=0.02)
        return _as_bijection(layer, changes_volume=True)
    return build


def _top_prior(num_classes):
    def build(x, pz, pa):
        layer = pz(TopPrior((C, H, W), learn_top=True, num_classes=num_classes).double(), std=0.2)
        cond = None
        if num_classes:
            cond = {"condition": F.one_hot(torch.tensor([0, 2]), num_classes).double()}
        return _as_bijection(layer, changes_volume=True, cond=cond)
    return build


LAYERS = {
    "actnorm": _actnorm,
    "invconv": _invconv(lu=False),
    "invconv_lu": _invconv(lu=True),
    "permute_reverse": _permute("reverse"),
    "permute_shuffle": _permute("shuffle"),
    # one entry per registered coupling (test_every_coupling_is_in_the_table)
    "coupling_affine": _coupling("affine"),
    "coupling_additive": _coupling("additive"),
    "coupling_mixture": _coupling("mixture"),
    "coupling_spline": _coupling("spline"),
    "coupling_affine_attention": _coupling("affine", attention_heads=2),
    "coupling_affine_gated": _coupling("affine", gated=True),
    "coupling_affine_class_conditioned": _coupling("affine", condition=F.one_hot(torch.tensor([1, 2]), NUM_CLASSES)),
    "coupling_mixture_map_conditioned": _coupling("mixture", std=0.05, condition=torch.randn(
        B, 2, 2 * H, 2 * W, generator=_generator(9))),  # a feature map, resized to the layer's H, W
    "squeeze": _squeeze,
    **{f"flowstep_{p}_{c}": _flowstep(p, c)
       for p in ("invconv", "invconv_lu", "shuffle", "reverse") for c in ("affine", "additive")},
    # smaller mixture parameters: at 0.2 the component log-scales reach -35 (clamped to -7) and
    # +32, the map has plateaus of slope ~5e-9, and no float64 output pins the input down to 1e-10
    "flowstep_invconv_lu_mixture": _flowstep("invconv_lu", "mixture", std=0.05),
    "split_prior": _split_prior,
    "chain": _chain,
    "level": _level(last=False),
    "level_last": _level(last=True),
    "top_prior": _top_prior(None),
    "top_prior_class_conditional": _top_prior(NUM_CLASSES),
}


def test_every_coupling_is_in_the_table():
    assert {f"coupling_{name}" for name in COUPLINGS} <= set(LAYERS)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_inverse_and_logdet_match_jacobian(name, perturb_zero_init, perturb_all):
    x = _images()
    bij = LAYERS[name](x, perturb_zero_init, perturb_all)

    y, logdet = bij.fwd(x)
    assert logdet.shape == (B,) and logdet.dtype == torch.float64
    assert y.numel() == x.numel()
    assert not torch.allclose(y.flatten(), x.flatten()), "layer is the identity: the test would be vacuous"

    # (a) exact inverse
    x_back = bij.inv(y)
    assert x_back.shape == x.shape
    assert (x_back - x).abs().max().item() < 1e-10

    # (b) log|det| per sample equals that of the brute-force Jacobian of the single-sample map
    for i in range(B):
        rows = slice(i, i + 1)

        def single(xi, rows=rows):
            return bij.fwd(xi.unsqueeze(0), rows)[0].flatten()

        jac = jacobian(single, x[i]).reshape(x[i].numel(), x[i].numel())
        sign, expected = torch.linalg.slogdet(jac)
        assert sign.item() != 0, "Jacobian is singular"
        assert logdet[i].item() == pytest.approx(expected.item(), abs=1e-8), f"sample {i}"
        if bij.changes_volume:
            assert abs(expected.item()) > 1e-3
        else:
            assert abs(expected.item()) < 1e-12


# ---------------------------------------------------------------------------- 1x1 convolution
@pytest.mark.parametrize("det_sign", [1.0, -1.0])
def test_invconv_lu_and_plain_give_the_same_map(det_sign):
    g = _generator(3)
    weight = torch.eye(C, dtype=torch.float64) * 1.5 + 0.3 * torch.randn(C, C, generator=g, dtype=torch.float64)
    weight[0] *= det_sign * torch.sign(torch.linalg.det(weight))  # fix the sign of det W
    assert torch.sign(torch.linalg.det(weight)).item() == det_sign
    plain = InvConv1x1(C, lu=False, weight=weight)
    lu = InvConv1x1(C, lu=True, weight=weight)
    x = _images().float()

    y_plain, ld_plain = plain(x)
    y_lu, ld_lu = lu(x)
    y_expected = torch.einsum("oc,bchw->bohw", weight, x.double())
    ld_expected = H * W * torch.linalg.slogdet(weight)[1]
    # The LU factors are stored in float32, so agreement is to float32 precision.
    torch.testing.assert_close(y_plain.double(), y_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_lu.double(), y_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ld_plain.double(), ld_expected.expand(B), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ld_lu.double(), ld_expected.expand(B), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lu.inverse(y_lu), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.inverse(y_plain), x, atol=1e-5, rtol=1e-5)


def _count_inv_calls(monkeypatch) -> list[int]:
    calls = [0]
    real_inv = torch.linalg.inv

    def counting_inv(*args, **kwargs):
        calls[0] += 1
        return real_inv(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "inv", counting_inv)
    return calls


@pytest.mark.parametrize("lu", [False, True])
def test_invconv_eval_caches_inverse_until_weights_change(lu, monkeypatch):
    layer = InvConv1x1(C, lu=lu, generator=_generator()).double()
    x = _images()
    calls = _count_inv_calls(monkeypatch)

    layer.eval()
    with torch.no_grad():
        y, _ = layer(x)
        for _ in range(3):
            x_back = layer.inverse(y)
    assert calls[0] == 1, "eval + no_grad must compute W^-1 once"
    assert (x_back - x).abs().max().item() < 1e-10

    # An optimiser step (still in eval mode) changes W in place: the cache must notice.
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    y_grad, ld = layer(x)
    (y_grad.pow(2).mean() - ld.mean() / x[0].numel()).backward()
    opt.step()
    with torch.no_grad():
        y_new, _ = layer(x)
        assert not torch.allclose(y_new, y), "the step did not change the weight"
        x_back = layer.inverse(y_new)
    assert calls[0] == 2, "a changed weight must recompute W^-1 exactly once"
    assert (x_back - x).abs().max().item() < 1e-10

    # Training mode and grad mode never use the cache.
    with torch.no_grad():
        layer.train()
        layer.inverse(y_new)
        layer.inverse(y_new)
    assert calls[0] == 4


def test_invconv_cache_follows_dtype_change():
    layer = InvConv1x1(C, lu=True, generator=_generator()).eval()
    x = _images()
    with torch.no_grad():
        layer.inverse(x.float())  # fills the cache in float32
        layer.double()
        y, _ = layer(x)
        x_back = layer.inverse(y)
    assert x_back.dtype == torch.float64
    assert (x_back - x).abs().max().item() < 1e-10


# ---------------------------------------------------------------------------- actnorm
def test_actnorm_initialises_from_first_batch_only():
    layer = ActNorm(C).double()
    assert not bool(layer.initialized)
    x1, x2 = _images(seed=1), _images(seed=2) * 3.0 + 1.0
    y1, ld1 = layer(x1)
    assert bool(layer.initialized)
    torch.testing.assert_close(y1.mean((0, 2, 3)), torch.zeros(C, dtype=torch.float64), atol=1e-10, rtol=0)
    var1 = x1.var((0, 2, 3), unbiased=False)
    # Unit variance up to the eps in var + eps (exactly var / (var + eps)).
    torch.testing.assert_close(y1.var((0, 2, 3), unbiased=False), var1 / (var1 + layer.eps), atol=1e-10, rtol=0)
    torch.testing.assert_close(y1.var((0, 2, 3), unbiased=False), torch.ones(C, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    # log|det| = H W sum(logs) = -H W/2 sum(log(var + eps)), the same for every sample
    expected_ld = -0.5 * H * W * torch.log(var1 + layer.eps).sum()
    torch.testing.assert_close(ld1, expected_ld.expand(B), atol=1e-10, rtol=0)

    params = {k: v.clone() for k, v in layer.state_dict().items()}
    y2, _ = layer(x2)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, params[k]), f"second batch re-initialised {k}"
    assert y2.mean((0, 2, 3)).abs().max().item() > 0.5  # not standardised: no re-init


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated"])
@pytest.mark.parametrize("out_channels,hidden,image", [
    (6, HIDDEN, "small"),
    (2, 128, "10x10"),  # first and last convolutions take convs.py's thin-side routes
])
def test_coupling_net_folded_actnorm_equals_conv_then_actnorm(out_channels, hidden, image, gated):
    """The hidden layers fold actnorm into the convolution after init and ZeroConv2d scales its
    weights; both must equal the literal conv -> actnorm -> ReLU -> ... -> conv * exp(3 logs), with
    ``a * sigmoid(b)`` of the two output halves in place of the ReLU when gated."""
    net = CouplingNet(2, out_channels, hidden, gated=gated).double()
    x = _images(seed=3)[:, :2] if image == "small" else torch.randn(
        3, 2, 10, 10, dtype=torch.float64, generator=_generator(3))
    net(x)  # data-dependent init
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    h = x
    for layer in net.net[:2]:
        h = F.conv2d(h, layer.conv.weight, padding=layer.conv.padding)
        h = (h + layer.norm.bias) * torch.exp(layer.norm.logs)
        if gated:
            a, b = h[:, :hidden], h[:, hidden:]
            h = a / (1 + torch.exp(-b))
        else:
            h = h.clamp_min(0)
        assert h.shape[1] == hidden
    zero = net.net[2]
    expected = zero.conv(h) * torch.exp(3.0 * zero.logs)
    torch.testing.assert_close(net(x), expected, atol=1e-12, rtol=1e-12)


def test_self_attention_equals_written_out_softmax_attention(perturb_zero_init):
    """Per head: softmax(Q K^T / sqrt(d)) V over the H W positions, then the output map, added to h."""
    heads, c = 2, 6
    block = perturb_zero_init(SelfAttention(c, heads, _generator()).double(), std=0.3)
    h = torch.randn(2, c, 3, 5, dtype=torch.float64, generator=_generator(4))
    tokens = h.flatten(2).transpose(1, 2)  # [B, HW, C]
    wq, wk, wv = block.qkv.weight.split(c)
    d = c // heads
    attended = []
    for i in range(heads):
        q, k, v = (tokens @ w[i * d:(i + 1) * d].T for w in (wq, wk, wv))
        attended.append(torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, dim=-1) @ v)
    out = torch.cat(attended, -1) @ block.out.weight.T + block.out.bias
    expected = h + out.transpose(1, 2).reshape(h.shape)
    torch.testing.assert_close(block(h), expected, rtol=1e-12, atol=1e-12)
    assert (block(h) - h).abs().max() > 0.1  # the block acts: the check is not vacuous


def test_self_attention_starts_as_identity_and_reaches_every_position(perturb_zero_init):
    """A new block is the identity (its output map is zero), so a coupling network with it starts
    where one without it does; once trained, each output position depends on every input position,
    where the convolutional network (3x3, 1x1, 3x3) sees only a 5x5 neighbourhood."""
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=_generator(5))
    plain, attending = (CouplingNet(2, 4, HIDDEN, _generator(), attention_heads=a).double() for a in (0, 2))
    plain(x), attending(x)  # data-dependent init
    perturb_zero_init(plain.net[-1], std=0.2)  # wake the last convolution, the same in both
    attending.net[-1].load_state_dict(plain.net[-1].state_dict())
    torch.testing.assert_close(attending(x), plain(x), rtol=0, atol=0)
    assert plain(x).abs().max() > 0.1
    perturb_zero_init(attending, std=0.2)  # now the attention's output map
    reach = {}
    for name, net in (("plain", plain), ("attending", attending)):
        xi = x.clone().requires_grad_(True)
        net(xi)[:, :, 0, 0].sum().backward()  # the top-left output ...
        reach[name] = xi.grad[:, :, 7, 7].abs().max().item()  # ... against the bottom-right input
    assert reach["plain"] == 0.0 and reach["attending"] > 1e-6
    with pytest.raises(ValueError, match="divide the hidden channels"):
        SelfAttention(6, 4)


def test_actnorm_loaded_from_state_dict_does_not_reinit():
    layer = ActNorm(C).double()
    layer(_images(seed=1))
    state = layer.state_dict()
    assert "initialized" in state and bool(state["initialized"])

    loaded = ActNorm(C).double()
    loaded.load_state_dict(state)
    x2 = _images(seed=2) * 3.0 + 1.0
    y_loaded, ld_loaded = loaded(x2)
    y_orig, ld_orig = layer(x2)
    torch.testing.assert_close(y_loaded, y_orig, atol=0, rtol=0)
    torch.testing.assert_close(ld_loaded, ld_orig, atol=0, rtol=0)
    assert torch.equal(loaded.bias, state["bias"]) and torch.equal(loaded.logs, state["logs"])



def test_actnorm_loading_an_uninitialised_state_resets_its_flag():
    """The Python-side flag follows the buffer: loading a fresh state makes the next batch initialise."""
    layer = ActNorm(C).double()
    layer(_images(seed=1))
    assert layer.is_initialized
    layer.load_state_dict(ActNorm(C).double().state_dict())
    assert not layer.is_initialized
    y, _ = layer(_images(seed=2) * 3.0 + 1.0)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(C, dtype=y.dtype), atol=1e-9, rtol=0)

# ---------------------------------------------------------------------------- permutations, seeds
def test_permute_shuffle_is_a_seeded_permutation():
    n = 16
    a = Permute(n, "shuffle", _generator(5))
    b = Permute(n, "shuffle", _generator(5))
    c = Permute(n, "shuffle", _generator(6))
    assert torch.equal(a.perm, b.perm)
    assert not torch.equal(a.perm, c.perm)
    assert torch.equal(a.perm.sort().values, torch.arange(n))
    assert torch.equal(a.perm[a.inv_perm], torch.arange(n))
    assert torch.equal(Permute(n, "reverse").perm, torch.arange(n - 1, -1, -1))


def test_flowstep_init_is_deterministic_for_a_seed():
    config = _config(permutation="invconv_lu")
    a = FlowStep(config, 0, _generator(11)).state_dict()
    b = FlowStep(config, 0, _generator(11)).state_dict()
    c = FlowStep(config, 0, _generator(12)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("build", [
    lambda: Permute(C, "bogus"),
    lambda: coupling_class("bogus"),
    lambda: coupling_class("affine")(1, HIDDEN),
    lambda: coupling_class("mixture")(C, HIDDEN, components=0),
    lambda: coupling_class("affine")(C, HIDDEN, components=3),
    lambda: coupling_class("affine")(C, HIDDEN)(torch.zeros(B, C, H, W), condition=torch.zeros(B, 3)),
    lambda: coupling_class("affine")(C, HIDDEN, condition_channels=3)(torch.zeros(B, C, H, W)),
    lambda: coupling_class("affine")(C, HIDDEN, condition_channels=3)(torch.zeros(B, C, H, W),
                                                                        condition=torch.zeros(B, 2)),
    lambda: Chain(ActNorm(C))(torch.zeros(B, C, H, W), condition=torch.zeros(B, 3)),
    lambda: _config(permutation="bogus"),
    lambda: _config(coupling="bogus"),
], ids=["permute-mode", "coupling-kind", "coupling-channels", "coupling-option-range", "coupling-option-unknown",
        "condition-not-taken", "condition-missing", "condition-shape", "chain-swallows-nothing",
        "flowstep-permutation", "flowstep-coupling"])
def test_bad_layer_arguments_raise_value_error(build):
    with pytest.raises(ValueError):
        build()


def test_class_conditional_top_prior_requires_labels():
    prior = TopPrior((C, H, W), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="labels"):
        prior(torch.zeros(B, C, H, W))
