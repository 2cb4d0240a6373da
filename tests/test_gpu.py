"""CUDA: bf16/fp16 autocast with log-determinants and the objective in float32, GradScaler, exact
encode/decode on the GPU, torch.compile, channels-last, and the GPU benchmark script.

Every test here but the last needs CUDA and is skipped cleanly without it.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from glowflow import Glow
from glowflow.data import ImageDataset
from glowflow.blocks import FlowStep
from glowflow.couplings import Coupling
from glowflow.layers import ActNorm, InvConv1x1, Permute, SplitPrior, Squeeze, TopPrior
from glowflow.networks import CouplingNet
from glowflow.train import TrainConfig, Trainer

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")
pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TINY = dict(image_shape=(3, 16, 16), levels=2, steps=3, hidden_channels=32, permutation="invconv")
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _images(n: int, shape=(3, 16, 16), seed: int = 0) -> ImageDataset:
    """Smooth random images (low-frequency noise, upsampled): a learnable, non-degenerate batch."""
    g = np.random.default_rng(seed)
    c, h, w = shape
    low = g.integers(0, 256, (n, c, h // 4, w // 4)).repeat(4, 2).repeat(4, 3)
    x = np.clip(low + g.integers(-8, 9, (n, c, h, w)), 0, 255).astype(np.uint8)
    return ImageDataset(torch.from_numpy(x), name="smooth")


def _cfg(**kw) -> TrainConfig:
    base = dict(model=dict(TINY), batch_size=16, init_batch_size=64, lr=1e-3, warmup_steps=1, max_steps=4,
                log_every=1, eval_every=1000, sample_every=1000, checkpoint_every=1000, progress=False,
                device=DEVICE)
    model = {**base["model"], **kw.pop("model", {})}
    return TrainConfig.from_dict({**base, **kw, "model": model})


def _trainer(tmp_path, **kw) -> Trainer:
    return Trainer(_cfg(**kw), tmp_path, _images(128), log=lambda *a: None)


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matmuls: CUDA runs float32 convs in TF32 by default (10-bit
    mantissa), which would blur comparisons of two float32 computations. Restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _logdet_dtypes(model: Glow) -> tuple[list, list]:
    """Hooks recording the dtype of every flow layer's log-determinant, and of every coupling network's
    output (its convolutions are functional calls on the weights, so the network is what is hooked)."""
    logdets, nets = [], []
    flow_layers = (ActNorm, InvConv1x1, Permute, Coupling, Squeeze, FlowStep, SplitPrior, TopPrior)
    for m in model.modules():
        if isinstance(m, flow_layers):
            m.register_forward_hook(lambda mod, inp, out: logdets.append((type(mod).__name__, out[-1].dtype)))
        elif isinstance(m, CouplingNet):
            m.register_forward_hook(lambda mod, inp, out: nets.append(out.dtype))
    return logdets, nets


# ------------------------------------------------------------------------------------ autocast
@needs_cuda
@pytest.mark.parametrize("memory", ["none", "invertible"])
def test_bf16_training_step_keeps_logdets_and_objective_in_float32(tmp_path, memory):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    trainer = _trainer(tmp_path, precision="bf16", model={"memory": memory})
    assert trainer.autocast_dtype is torch.bfloat16
    logdets, nets = _logdet_dtypes(trainer.model)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    rows = [trainer.train_step() for _ in range(3)]
    assert all(not r["skipped"] and np.isfinite(r["loss"]) for r in rows), rows
    assert logdets and all(dtype == torch.float32 for _, dtype in logdets), set(logdets)
    assert nets and all(dtype == torch.bfloat16 for dtype in nets), set(nets)  # the nets really ran in bf16
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    x, _, noise = trainer.global_batch(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = trainer.model(x, noise=noise)
    assert out.log_prob.dtype == torch.float32 and out.bits_per_dim.dtype == torch.float32
    with torch.no_grad():
        full = trainer.model(x, noise=noise).bits_per_dim
    # bf16 in the coupling nets only: the objective stays close to the float32 one
    assert float((out.bits_per_dim.detach() - full).abs().max()) < 0.05


@needs_cuda
def test_fp16_training_uses_a_grad_scaler(tmp_path):
    trainer = _trainer(tmp_path, precision="fp16", max_steps=5)
    assert trainer.scaler.is_enabled() and trainer.autocast_dtype is torch.float16
    rows = [trainer.train_step() for _ in range(5)]
    done = [r for r in rows if not r["skipped"]]
    assert done and all(np.isfinite(r["bits_per_dim"]) for r in done), rows
    assert trainer.scaler.get_scale() > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_invertible_gradients_on_gpu_equal_plain_autograd(autocast, no_tf32):
    """The gradient vector of the invertible backward against plain autograd's, relative to its norm.

    Under bf16 the invertible backward rebuilds each input from its output through coupling nets run
    in bf16, so it carries that rounding (a few 1e-3 of the norm, about twice what bf16 itself moves
    plain autograd's gradients); a wrong backward is off by order 1. In float32 both agree to rounding.
    """
    x = (_images(8).images.float() / 255).to(DEVICE)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    reference = Glow(**TINY, memory="none").to(DEVICE)
    with torch.no_grad():
        reference(x, noise=noise)

    def gradient(memory: str) -> torch.Tensor:
        model = Glow(**TINY, memory=memory).to(DEVICE)
        model.load_state_dict(reference.state_dict())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            model(x, noise=noise).bits_per_dim.mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain, invertible = gradient("none"), gradient("invertible")
    assert float(plain.norm()) > 0.1  # the comparison is not between two zero vectors
    assert float((invertible - plain).norm() / plain.norm()) < (1e-2 if autocast else 1e-5)


# ------------------------------------------------------------------------------------ exactness on the GPU
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_encode_decode_round_trip_on_gpu(autocast, perturb_zero_init, no_tf32):
    if autocast and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = Glow(**TINY, coupling="affine").to(DEVICE)
    x = (_images(8).images.float() / 255).to(DEVICE)
    with torch.no_grad():
        model(x)
    perturb_zero_init(model, std=0.05).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        eps = model.encode(x, quantized=False)
        back = model.decode(eps)
    assert eps.dtype == torch.float32 and back.device.type == "cuda"
    # bf16: decoding hands each coupling net an input that may differ from the encoder's in the last
    # float32 bit, and the cast to bf16 can round that to a different value, so the round trip is
    # exact to about bf16 precision (a wrong inverse is off by ~0.1 or more)
    assert float((back - x).abs().max()) < (2e-2 if autocast else 1e-4)
    if not autocast:  # and float32 on the GPU computes what it computes on the CPU
        cpu = model.cpu()
        with torch.no_grad():
            assert float((cpu.encode(x.cpu(), quantized=False) - eps.cpu()).abs().max()) < 1e-3


# ------------------------------------------------------------------------------------ compile, channels-last
@needs_cuda
@pytest.mark.slow
def test_compile_option_trains_like_eager(tmp_path, no_tf32):
    eager = _trainer(tmp_path / "eager")
    compiled = _trainer(tmp_path / "compiled", compile=True)
    assert compiled.train_model is not compiled.model
    a = [eager.train_step() for _ in range(2)]
    b = [compiled.train_step() for _ in range(2)]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in b), b
    assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-3  # the same weights and batch: the same loss


@needs_cuda
def test_channels_last_trains_like_contiguous(tmp_path, no_tf32):
    plain = _trainer(tmp_path / "plain")
    cl = _trainer(tmp_path / "cl", channels_last=True)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in cl.model.parameters())
    a = [plain.train_step() for _ in range(2)]
    b = [cl.train_step() for _ in range(2)]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in b), b
    assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-4
    x, _, noise = cl.global_batch(0)
    with torch.no_grad():
        channels_last = x.contiguous(memory_format=torch.channels_last)
        back = cl.model.eval().decode(cl.model.encode(channels_last, quantized=False))
    assert float((back - x).abs().max()) < 1e-4


# ------------------------------------------------------------------------------------ the GPU benchmark
def _benchmark_module():
    spec = importlib.util.spec_from_file_location("glowflow_gpu_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_cuda
def test_gpu_benchmark_runs_on_a_tiny_architecture(capsys):
    assert _benchmark_module().main(["--tiny", "--iters", "2", "--warmup", "1", "--batch", "4",
                                     "--precisions", "fp32,bf16,fp16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] != "cpu"
    for row in result["results"]:
        if "skipped" in row:
            continue
        assert row["train_images_per_s"] > 0 and row["loss_finite"] and row["loss_dtype"] == "torch.float32", row
        assert row["sample_one_image_ms"] > 0


@pytest.mark.skipif(HAS_CUDA, reason="checks the message printed where CUDA is missing")
def test_gpu_benchmark_without_cuda_prints_a_json_error(capsys):
    assert _benchmark_module().main([]) == 2
    result = json.loads(capsys.readouterr().out)
    assert "CUDA is not available" in result["error"]
