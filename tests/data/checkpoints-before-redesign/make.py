"""How the checkpoints beside this file were made (glowflow at the commit that added them, before
the core's redesign): one tiny model per kind of layer, every zero-initialised branch woken, and
the per-image bits/dim and log-densities of four fixed images recorded in expected.json.
tests/test_model.py::test_checkpoints_written_before_the_redesign_score_the_same loads them."""
import json
import sys
from pathlib import Path

import torch

from glowflow import Glow

HERE = Path(__file__).parent
MODELS = {
    "affine-lu": dict(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=6, permutation="invconv_lu"),
    "additive-invconv": dict(image_shape=(3, 8, 8), levels=2, steps=2, hidden_channels=6, coupling="additive",
                             permutation="invconv"),
    "mixture-shuffle": dict(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=6, coupling="mixture",
                            permutation="shuffle", mixture_components=3),
    "conditional-position": dict(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=6, num_classes=3,
                                 split_prior="conv+position", permutation="reverse"),
    "attention-gated-logit": dict(image_shape=(1, 8, 8), levels=2, steps=[1, 2], hidden_channels=[4, 6],
                                  attention_levels=1, attention_heads=2, gated_levels=2, logit_alpha=1e-4),
    "variational": dict(image_shape=(1, 8, 8), levels=2, steps=1, hidden_channels=4, dequantization="variational",
                        dequant_hidden_channels=4, dequant_steps=2, n_bits=5),
}


def images(shape):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (4, *shape), generator=g) / 255.0


def main() -> int:
    expected = {}
    for name, kw in MODELS.items():
        model = Glow(**kw)
        x = images(kw["image_shape"])
        y = torch.arange(4) % kw["num_classes"] if kw.get("num_classes") else None
        model.initialize(x, y, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.eval()
        noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            bpd = model.bits_per_dim(x, y, noise=noise)
            logp = model.log_prob(x, y)
        model.save_pretrained(HERE / name)
        expected[name] = {"bits_per_dim": bpd.tolist(), "log_prob": logp.tolist()}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
