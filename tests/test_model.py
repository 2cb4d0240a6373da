"""The whole Glow model: exact likelihood by change of variables, exact inverse, sampling, the
bits/dim metric, input checks, memory modes, checkpoints and one short optimisation.

The math tests run a tiny float64 model after data-dependent init, with every zero-initialised
parameter (coupling output convs, split priors, top prior, class embedding) perturbed so that no
part of the map is the identity.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch.autograd.functional import jacobian

from glowflow import Glow, GlowConfig, numerics
from glowflow.checkpoint import CheckpointError
from glowflow.couplings import COUPLINGS

TINY = dict(image_shape=(2, 4, 4), levels=2, steps=2, hidden_channels=4)
NUM_CLASSES = 3

pytestmark = pytest.mark.usefixtures("single_thread")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(shape, batch: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """8-bit-valued images in [0, 1] (k / 255), ``[batch, *shape]``."""
    k = torch.randint(0, 256, (batch, *shape), generator=_generator(seed))
    return (k / 255.0).to(dtype)


def _labels(batch: int) -> torch.Tensor:
    return torch.arange(batch) % NUM_CLASSES


def _tiny_model(perturb_zero_init, dtype=torch.float64, batch: int = 8, std: float = 0.05, **overrides):
    """A tiny model after data-dependent init, its zero-initialised parameters perturbed."""
    cfg = {**TINY, **overrides}
    model = Glow(**cfg).to(dtype)
    y = _labels(batch) if cfg.get("num_classes") else None
    model.initialize(_images(cfg["image_shape"], batch, seed=100, dtype=dtype), y, _generator(0))
    return perturb_zero_init(model, std=std)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------- exact likelihood
@pytest.mark.parametrize("variant", [
    dict(coupling="affine"),
    dict(coupling="additive"),
    dict(coupling="mixture", coupling_options={"components": 3}),
    dict(coupling="affine", num_classes=NUM_CLASSES),
    dict(coupling="affine", split_prior="conv+position"),
    dict(coupling="affine", attention_levels=2, attention_heads=2),
    dict(coupling="affine", gated_levels=1),
    dict(coupling="affine", steps=[1, 3], hidden_channels=[3, 6]),
    dict(coupling="affine", logit_alpha=0.05),
], ids=["affine", "additive", "mixture", "class_conditional", "position_split_prior", "attention", "gated",
        "per_level", "logit_input"])
def test_log_prob_is_gaussian_of_encoding_plus_log_det_jacobian(variant, perturb_zero_init):
    model = _tiny_model(perturb_zero_init, **variant)
    batch = 2
    x = _images(TINY["image_shape"], batch, seed=1)
    y = _labels(batch) if variant.get("num_classes") else None
    log_prob = model.log_prob(x, y)
    eps = model.encode(x, y, quantized=False)
    dims = model.num_dims
    assert log_prob.shape == (batch,) and eps.shape == (batch, dims)

    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    for i in range(batch):
        yi = None if y is None else y[i: i + 1]

        def encode_one(xi, yi=yi):
            return model.encode(xi.unsqueeze(0), yi, quantized=False)[0]

        jac = jacobian(encode_one, x[i]).reshape(dims, dims)
        sign, log_abs_det = torch.linalg.slogdet(jac)
        assert sign.item() != 0
        expected = normal.log_prob(eps[i]).sum() + log_abs_det
        assert log_prob[i].item() == pytest.approx(expected.item(), abs=1e-8), f"sample {i}"
        assert abs(log_abs_det.item()) > 1.0  # a volume-changing map: the check is not vacuous

    if y is not None:  # the class-conditional prior depends on the label
        assert not torch.allclose(model.log_prob(x, (y + 1) % NUM_CLASSES), log_prob)


# ---------------------------------------------------------------------------- exact inverse
@pytest.mark.parametrize("permutation", ["invconv", "invconv_lu", "shuffle", "reverse"])
@pytest.mark.parametrize("coupling", list(COUPLINGS))
def test_decode_inverts_encode_float64(coupling, permutation, perturb_zero_init):
    model = _tiny_model(perturb_zero_init, coupling=coupling, permutation=permutation)
    x = _images(TINY["image_shape"], 4, seed=2)
    eps = model.encode(x, quantized=False)
    assert (model.decode(eps) - x).abs().max().item() <= 1e-10


@pytest.mark.parametrize("alpha", [0.05, 1e-4])
def test_decode_inverts_encode_float64_logit_input(alpha, perturb_zero_init):
    model = _tiny_model(perturb_zero_init, logit_alpha=alpha)
    x = _images(TINY["image_shape"], 4, seed=2)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # the ends of the range, where the logit is steepest
    assert (model.decode(model.encode(x, quantized=False)) - x).abs().max().item() <= 1e-10


def test_logit_input_log_det_is_the_sum_of_the_elementwise_derivatives():
    x = torch.tensor([[0.0, 1 / 255, 0.5, 1.0]], dtype=torch.float64)
    z, logdet = numerics.to_flow_input(x, 0.05)
    s = 0.05 + 0.9 * x
    assert torch.allclose(z, torch.log(s / (1 - s)))
    by_hand = sum(math.log(0.9 / (v * (1 - v))) for v in s[0].tolist())  # d logit(s)/ds = 1 / (s (1 - s))
    assert logdet.item() == pytest.approx(by_hand, rel=1e-12)
    assert torch.allclose(numerics.from_flow_input(z, 0.05), x)
    z0, logdet0 = numerics.to_flow_input(x, 0.0)  # off: the paper's centring, volume kept
    assert torch.equal(z0, x - 0.5) and logdet0.item() == 0.0


def test_decode_inverts_encode_float64_class_conditional(perturb_zero_init):
    model = _tiny_model(perturb_zero_init, num_classes=NUM_CLASSES)
    x, y = _images(TINY["image_shape"], 4, seed=2), _labels(4)
    assert (model.decode(model.encode(x, y, quantized=False), y) - x).abs().max().item() <= 1e-10


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decode_inverts_encode_float32_cifar_size(mode, perturb_zero_init):
    shape = (3, 32, 32)
    model = Glow(image_shape=shape, levels=3, steps=4, hidden_channels=64)
    model.initialize(_images(shape, 8, seed=3, dtype=torch.float32), generator=_generator(0))
    # 0.01: the split-prior convs see 9 * C inputs; much more noise makes their scales explode.
    perturb_zero_init(model, std=0.01)
    model.train(mode == "train")
    x = _images(shape, 4, seed=4, dtype=torch.float32)
    with torch.no_grad():
        eps = model.encode(x, quantized=False)
        x_back = model.decode(eps)
    assert eps.dtype == torch.float32
    assert (x_back - x).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------- sampling
def test_sample_at_zero_temperature_is_decode_of_zeros(perturb_zero_init):
    model = _tiny_model(perturb_zero_init)
    mode = model.decode(torch.zeros(1, model.num_dims, dtype=torch.float64))
    inside = ((mode > 0) & (mode < 1)).float().mean().item()
    assert inside > 0.5, "decode(0) mostly clamped: the comparison would be weak"
    s0 = model.sample(3, temperature=0.0, generator=_generator(1))
    torch.testing.assert_close(s0, mode.clamp(0, 1).expand(3, -1, -1, -1), atol=1e-12, rtol=0)


def test_sample_is_decode_of_scaled_gaussian_and_reproducible(perturb_zero_init):
    model = _tiny_model(perturb_zero_init)
    n, temperature = 4, 0.7
    a = model.sample(n, temperature, generator=_generator(5))
    b = model.sample(n, temperature, generator=_generator(5))
    c = model.sample(n, temperature, generator=_generator(6))
    assert a.shape == (n, *TINY["image_shape"]) and a.dtype == torch.float64
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 1
    eps = torch.randn(n, model.num_dims, generator=_generator(5), dtype=torch.float64)
    torch.testing.assert_close(a, model.decode(temperature * eps).clamp(0, 1), atol=1e-12, rtol=0)


def test_class_conditional_sample_depends_on_label(perturb_zero_init):
    model = _tiny_model(perturb_zero_init, num_classes=NUM_CLASSES)
    s0 = model.sample(2, 0.0, y=torch.tensor([0, 0]))
    s1 = model.sample(2, 0.0, y=torch.tensor([1, 1]))
    assert not torch.allclose(s0, s1)


# ---------------------------------------------------------------------------- dtypes
def test_model_double_end_to_end(perturb_zero_init):
    model32 = _tiny_model(perturb_zero_init, dtype=torch.float32)
    x = _images(TINY["image_shape"], 4, seed=7, dtype=torch.float32)
    lp32 = model32.log_prob(x)
    model = model32.double()
    lp = model.log_prob(x)  # float32 input is converted to the model's dtype
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, lp32.double(), rtol=1e-4, atol=1e-3)
    eps = model.encode(x.double(), quantized=False)
    assert eps.dtype == torch.float64
    assert (model.decode(eps) - x.double()).abs().max().item() <= 1e-10
    out = model(x.double(), generator=_generator(0))
    assert out.bits_per_dim.dtype == torch.float64
    out.bits_per_dim.mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float64 for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.sample(2, generator=_generator(0)).dtype == torch.float64


# ---------------------------------------------------------------------------- bits per dim
@pytest.mark.parametrize("n_bits", [8, 5])
def test_bits_per_dim_formula_and_quantisation(n_bits, perturb_zero_init):
    model = _tiny_model(perturb_zero_init, n_bits=n_bits)
    batch, shape = 4, TINY["image_shape"]
    k = torch.randint(0, 256, (batch, *shape), generator=_generator(8))
    x = (k / 255.0).double()
    out = model(x, generator=_generator(9))

    # Quantise by dropping low bits of the 8-bit value, dequantise with the same uniform noise.
    bins = k // 2 ** (8 - n_bits)
    noise = torch.rand(x.shape, generator=_generator(9), dtype=torch.float64)
    x_deq = (bins + noise) / 2 ** n_bits
    assert torch.equal(numerics.quantize(x, n_bits), bins.double())
    log_prob = model.log_prob(x_deq)
    torch.testing.assert_close(out.log_prob, log_prob, atol=1e-10, rtol=0)

    dims = math.prod(shape)
    expected = -(log_prob - dims * math.log(2 ** n_bits)) / (dims * math.log(2))
    torch.testing.assert_close(out.bits_per_dim, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(numerics.bits_per_dim(log_prob, dims, n_bits), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(model.bits_per_dim(x, generator=_generator(9)), expected, atol=1e-10, rtol=0)


def test_quantize_drops_low_bits():
    k = torch.arange(256)
    x = k / 255.0
    assert torch.equal(numerics.quantize(x, 8), k.float())
    assert torch.equal(numerics.quantize(x, 5), (k // 8).float())
    assert numerics.quantize(x, 5).max() == 31 and numerics.quantize(x, 1).max() == 1
    with pytest.raises(ValueError):
        numerics.n_bins(9)
    with pytest.raises(ValueError):
        GlowConfig(image_shape=(1, 4, 4), levels=2, n_bits=0)


# ---------------------------------------------------------------------------- input checks
@pytest.fixture(scope="module")
def plain_model():
    return Glow(**TINY)


@pytest.fixture(scope="module")
def conditional_model():
    return Glow(**TINY, num_classes=NUM_CLASSES)


def _ok_images(batch=2):
    return _images(TINY["image_shape"], batch, seed=0, dtype=torch.float32)


@pytest.mark.parametrize("x, match", [
    (torch.rand(2, 3, 4, 4), r"shape \[B, 2, 4, 4\]"),
    (torch.rand(2, 2, 8, 8), r"shape \[B, 2, 4, 4\]"),
    (torch.rand(2, 2, 4), r"shape"),
    (torch.rand(2, 2, 4, 4) + 1.0, r"\[0, 1\]"),
    (torch.rand(2, 2, 4, 4) - 1.0, r"\[0, 1\]"),
    (torch.full((2, 2, 4, 4), float("nan")), "NaN"),
    (torch.zeros(2, 2, 4, 4, dtype=torch.uint8), "float"),
], ids=["channels", "height-width", "rank", "above-1", "below-0", "nan", "uint8"])
def test_bad_images_raise_value_error(plain_model, x, match):
    for method in (plain_model.log_prob, plain_model.encode, plain_model.bits_per_dim):
        with pytest.raises(ValueError, match=match):
            method(x)


def test_bad_construction_raises_value_error():
    with pytest.raises(ValueError, match="divisible"):
        Glow(image_shape=(1, 12, 12), levels=3, steps=1, hidden_channels=4)
    with pytest.raises(ValueError, match="divisible"):
        GlowConfig(image_shape=(3, 32, 20), levels=3)
    with pytest.raises(ValueError, match="coupling"):
        Glow(**TINY, coupling="bogus")
    with pytest.raises(ValueError, match="permutation"):
        Glow(**TINY, permutation="bogus")
    with pytest.raises(ValueError, match="memory"):
        Glow(**TINY, memory="bogus")
    with pytest.raises(ValueError, match="image_shape"):
        Glow(image_shape=(4, 4), levels=1)


def test_bad_latents_raise_value_error(plain_model):
    d = plain_model.num_dims
    with pytest.raises(ValueError, match=rf"\[B, {d}\]"):
        plain_model.decode(torch.zeros(2, d + 1))
    with pytest.raises(ValueError, match=rf"\[B, {d}\]"):
        plain_model.decode(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        plain_model.decode(torch.full((2, d), float("nan")))
    with pytest.raises(ValueError):
        plain_model.sample(0)
    with pytest.raises(ValueError):
        plain_model.sample(2, temperature=-1.0)


def test_labels_are_checked(plain_model, conditional_model):
    x = _ok_images()
    d = conditional_model.num_dims
    for call in (lambda: conditional_model.log_prob(x), lambda: conditional_model.encode(x),
                 lambda: conditional_model(x), lambda: conditional_model.decode(torch.zeros(2, d)),
                 lambda: conditional_model.sample(2)):
        with pytest.raises(ValueError, match="labels"):
            call()
    with pytest.raises(ValueError, match="labels"):
        conditional_model.log_prob(x, torch.tensor([0, NUM_CLASSES]))  # out of range
    with pytest.raises(ValueError, match="labels"):
        conditional_model.log_prob(x, torch.tensor([0, 1, 2]))  # wrong count
    with pytest.raises(ValueError, match="labels"):
        plain_model.log_prob(x, torch.tensor([0, 1]))  # unconditional model
    assert conditional_model.log_prob(x, torch.tensor([0, 2])).shape == (2,)


# ---------------------------------------------------------------------------- memory modes
@pytest.mark.parametrize("memory", ["checkpoint", "invertible"])
def test_memory_modes_match_plain_autograd(memory, perturb_zero_init):
    reference = _tiny_model(perturb_zero_init, steps=3)
    model = Glow(**{**TINY, "steps": 3}, memory=memory).double()
    model.load_state_dict(reference.state_dict())
    assert model.memory == memory and all(level.steps.memory == memory for level in model.levels)

    x = _images(TINY["image_shape"], 4, seed=11)
    results = []
    for m in (reference, model):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        log_prob = m.log_prob(xi)
        (-log_prob.mean()).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((log_prob.detach(), xi.grad, grads))
    (lp_ref, gx_ref, g_ref), (lp, gx, g) = results

    assert _max_rel(lp, lp_ref) <= 1e-10
    assert _max_rel(gx, gx_ref) <= 1e-8
    assert set(g) == set(g_ref) and len(g_ref) == len(list(reference.parameters()))
    for name in g_ref:
        assert _max_rel(g[name], g_ref[name]) <= 1e-8, name
    assert any(g_ref[n].abs().max() > 0 for n in g_ref if ".steps." in n)


@pytest.mark.parametrize("memory", ["none", "checkpoint", "invertible"])
def test_log_prob_gradient_matches_finite_differences(memory, perturb_zero_init):
    """The directional derivative along random directions in (parameters, input) space."""
    reference = _tiny_model(perturb_zero_init, num_classes=NUM_CLASSES)
    model = Glow(**TINY, num_classes=NUM_CLASSES, memory=memory).double()
    model.load_state_dict(reference.state_dict())
    x, y = _images(TINY["image_shape"], 2, seed=15) * 0.8 + 0.1, _labels(2)  # room for the input step
    params = list(model.parameters())

    xg = x.clone().requires_grad_(True)
    model.log_prob(xg, y).sum().backward()
    # The class head is not part of log_prob: no gradient there, and none expected numerically.
    assert {n for n, p in model.named_parameters() if p.grad is None} == {"class_head.weight", "class_head.bias"}
    grads = [xg.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in params]

    g = _generator(16)
    step = 1e-5
    for _ in range(2):
        directions = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in [x] + params]
        analytic = sum((gr * d).sum() for gr, d in zip(grads, directions)).item()
        values = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for p, d in zip(params, directions[1:]):
                    p.add_(sign * step * d)
                values.append(model.log_prob(x + sign * step * directions[0], y).sum().item())
                for p, d in zip(params, directions[1:]):
                    p.sub_(sign * step * d)
        numeric = (values[0] - values[1]) / (2 * step)
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------------------- checkpoints
def test_save_and_load_pretrained_round_trip(tmp_path, perturb_zero_init):
    model = _tiny_model(perturb_zero_init, dtype=torch.float32, permutation="shuffle",
                        num_classes=NUM_CLASSES).eval()
    x, y = _ok_images(4), _labels(4)
    with torch.no_grad():
        expected = model.log_prob(x, y)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Glow.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.initialized
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x, y), expected)
        loaded(_images(TINY["image_shape"], 4, seed=12, dtype=torch.float32), y)  # must not re-init
        assert torch.equal(loaded.log_prob(x, y), expected)
    fresh = Glow(config=model.config).eval()  # same seed, but without the trained/perturbed weights
    with torch.no_grad():
        assert not torch.allclose(fresh.log_prob(x, y), expected)


def _truncate_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("corrupt", [
    _truncate_half,
    lambda data: data[:-1],
    lambda data: b"",
    lambda data: b"\xff" * 8 + data[8:],  # header length
    lambda data: data[:8] + b"#" + data[9:],  # header JSON
], ids=["truncated-half", "truncated-1-byte", "empty", "bad-header-length", "bad-header-json"])
@pytest.mark.parametrize("with_checksums", [True, False], ids=["checksummed", "no-manifest"])
def test_corrupt_weights_raise_checkpoint_error(tmp_path, corrupt, with_checksums):
    Glow(**TINY).save_pretrained(tmp_path)
    if not with_checksums:  # as a checkpoint written before checksums.json existed: safetensors' own checks
        (tmp_path / "checksums.json").unlink()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    match = r"corrupt file .*model\.safetensors.*SHA-256" if with_checksums else \
        r"corrupt or truncated weights file .*model\.safetensors"
    with pytest.raises(CheckpointError, match=match) as info:
        Glow.from_pretrained(tmp_path)
    assert isinstance(info.value, ValueError)


def test_a_flipped_bit_in_the_weights_is_caught_by_the_checksum(tmp_path):
    model = Glow(**TINY)
    model.save_pretrained(tmp_path)
    sums = json.loads((tmp_path / "checksums.json").read_text())
    assert set(sums) == {"config.json", "model.safetensors"}
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes: the safetensors header is untouched
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        Glow.from_pretrained(tmp_path)
    # without the manifest the same file loads, different, and only a warning says it was unchecked
    (tmp_path / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="no checksums.json"):
        loaded = Glow.from_pretrained(tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_missing_weights_raise_checkpoint_error(tmp_path):
    Glow(**TINY).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Glow.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        Glow.from_pretrained(tmp_path / "nowhere")


def test_save_pretrained_replaces_only_a_checkpoint_glowflow_wrote(tmp_path):
    from glowflow.io import RefusedError

    model = Glow(**TINY)
    # a folder of the user's, with a subfolder: refused, nothing in it touched
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (user / "sub" / "data.bin").write_bytes(b"1234")
    with pytest.raises(RefusedError, match="not a glowflow checkpoint.*move it away"):
        model.save_pretrained(user)
    assert (user / "notes.txt").read_text() == "keep me" and (user / "sub" / "data.bin").read_bytes() == b"1234"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary, no .old left
    # a plain file: refused, left as it was
    plain = tmp_path / "a-file"
    plain.write_text("x")
    with pytest.raises(RefusedError, match="is a file"):
        model.save_pretrained(plain)
    assert plain.read_text() == "x"
    # a user's folder where the swap keeps its previous copy (DIR.old): refused before anything moves
    (tmp_path / "ck.old").mkdir()
    (tmp_path / "ck.old" / "thesis.tex").write_text("keep")
    with pytest.raises(RefusedError, match=r"ck\.old"):
        model.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck.old" / "thesis.tex").read_text() == "keep" and not (tmp_path / "ck").exists()
    # a checkpoint glowflow wrote is replaced; so is an empty folder; a user's file added to a
    # checkpoint makes it no longer one glowflow may replace
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    (tmp_path / "empty" / "readme.md").write_text("mine")
    with pytest.raises(RefusedError):
        model.save_pretrained(tmp_path / "empty")
    assert (tmp_path / "empty" / "readme.md").read_text() == "mine"


def test_the_same_weights_are_saved_as_the_same_bytes(tmp_path):
    """The writer keeps metadata in a hash map whose order changes between saves; the bytes must not."""
    from glowflow.io import file_sha256

    model = Glow(**TINY)
    digests = set()
    for i in range(8):
        model.save_pretrained(tmp_path / f"ck{i}")
        digests.add(file_sha256(tmp_path / f"ck{i}" / "model.safetensors"))
    assert len(digests) == 1
    assert torch.equal(next(iter(Glow.from_pretrained(tmp_path / "ck0").state_dict().values())),
                       next(iter(model.state_dict().values())))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.complex64])
def test_weights_of_another_kind_of_dtype_are_refused_not_cast(tmp_path, dtype):
    from safetensors.torch import save_file

    model = Glow(**TINY)
    model.save_pretrained(tmp_path)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="no checksums.json"), \
            pytest.raises(CheckpointError, match=f"holds {dtype} values, the model expects torch.float32"):
        Glow.from_pretrained(tmp_path)


def test_weights_holding_nan_are_never_written_and_never_loaded(tmp_path):
    from safetensors.torch import save_file

    model = Glow(**TINY)
    model.save_pretrained(tmp_path / "good")
    before = (tmp_path / "good" / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="hold NaN or inf.*what is on disk is kept"):
        model.save_pretrained(tmp_path / "good")
    assert (tmp_path / "good" / "model.safetensors").read_bytes() == before
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},  # as another writer might
              str(tmp_path / "good" / "model.safetensors"))
    (tmp_path / "good" / "checksums.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="hold NaN or inf.*diverged"):
        Glow.from_pretrained(tmp_path / "good")


@pytest.mark.parametrize("sums,message", [
    ({}, "lists no files"),
    ({"config.json": {"a": 1}, "model.safetensors": "0" * 64}, "the entry 'config.json' is"),
])
def test_a_manifest_that_would_check_nothing_is_refused(tmp_path, sums, message):
    Glow(**TINY).save_pretrained(tmp_path)
    (tmp_path / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match=message):
        Glow.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "checksums.json"])
def test_json_nested_too_deeply_is_a_corrupt_checkpoint_not_a_recursion_error(tmp_path, name):
    Glow(**TINY).save_pretrained(tmp_path)
    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    if name == "config.json":
        (tmp_path / "checksums.json").unlink()
    with pytest.warns() if name == "config.json" else contextlib.nullcontext(), \
            pytest.raises(CheckpointError, match="JSON nested too deeply"):
        Glow.from_pretrained(tmp_path)


def test_a_batch_of_no_images_is_refused_by_every_entry_point():
    model = Glow(**TINY)
    empty = torch.zeros(0, *TINY["image_shape"])
    for call in (model.log_prob, model.bits_per_dim, model.encode, model.initialize):
        with pytest.raises(ValueError, match="holds no images"):
            call(empty)
    model.initialize(torch.rand(4, *TINY["image_shape"]))
    with pytest.raises(ValueError, match="latents hold no rows"):
        model.decode(torch.zeros(0, model.num_dims))


# ---------------------------------------------------------------------------- optimisation
def test_adam_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)  # only Adam's internals; data and model use explicit generators/seeds
    model = Glow(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=16)
    g = _generator(13)
    # Structured data (smooth ramps + noise) so there is something to learn.
    ramp = torch.linspace(0.1, 0.9, 8).view(1, 1, 1, 8)
    x = (ramp + 0.05 * torch.randn(16, 1, 8, 8, generator=g)).clamp(0, 1)
    x = torch.round(x * 255) / 255
    model.initialize(x, generator=_generator(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = model(x, generator=_generator(14)).bits_per_dim.mean()  # same dequantisation noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.skipif(not hasattr(__import__("os"), "umask") or __import__("sys").platform == "win32",
                    reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_modes_not_tempfiles_private_ones(tmp_path, umask):
    """Checkpoints and outputs are written through tempfile (0600 / 0700) and renamed; they must end
    up with the modes open() and mkdir() would give (0666 / 0777 less the umask)."""
    import os
    import stat

    from glowflow import latent
    from glowflow.io import atomic_write_text

    old = os.umask(umask)
    try:
        Glow(**TINY).save_pretrained(tmp_path / "ckpt")
        atomic_write_text(tmp_path / "out.json", "{}\n")
        latent.save_directions(latent.Directions(["a"], torch.zeros(1, 32), [1], [1], ["x"]), tmp_path / "dirs")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "ckpt") == 0o777 & ~umask
    files = [*(tmp_path / "ckpt").iterdir(), tmp_path / "out.json", *(tmp_path / "dirs").iterdir()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}


def test_decode_refuses_latents_that_are_not_real_numbers():
    model = Glow(**TINY)
    model.initialize(_images(TINY["image_shape"], 4, seed=1, dtype=torch.float32))
    d = model.num_dims
    with pytest.raises(ValueError, match="real numbers.*complex"):
        model.decode(torch.zeros(1, d, dtype=torch.complex64))
    with pytest.raises(ValueError, match="real numbers.*bool"):
        model.decode(torch.zeros(1, d, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.decode(torch.full((1, d), float("nan")))
    assert model.decode(torch.zeros(1, d, dtype=torch.int64)).shape == (1, *TINY["image_shape"])


# ---------------------------------------------------------------------------- old checkpoints
BEFORE_REDESIGN = Path(__file__).parent / "data" / "checkpoints-before-redesign"


@pytest.mark.parametrize("name", sorted(json.loads((BEFORE_REDESIGN / "expected.json").read_text())))
def test_checkpoints_written_before_the_redesign_score_the_same(name):
    """Tiny checkpoints of every kind of layer, written by glowflow before its core was redesigned
    (tests/data/checkpoints-before-redesign/make.py), load and give the per-image bits/dim and
    log-densities recorded then."""
    expected = json.loads((BEFORE_REDESIGN / "expected.json").read_text())[name]
    model = Glow.from_pretrained(BEFORE_REDESIGN / name)
    shape = model.config.image_shape
    x = torch.randint(0, 256, (4, *shape), generator=torch.Generator().manual_seed(7)) / 255.0
    y = torch.arange(4) % model.config.num_classes if model.config.num_classes else None
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        bpd, logp = model.bits_per_dim(x, y, noise=noise), model.log_prob(x, y)
    torch.testing.assert_close(bpd, torch.tensor(expected["bits_per_dim"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, torch.tensor(expected["log_prob"]), rtol=1e-5, atol=1e-4)
