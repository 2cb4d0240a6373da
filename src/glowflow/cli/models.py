"""``glowflow models``: the trained models glowflow ships, each usable by name as a checkpoint.

  glowflow models
  glowflow sample fashion-mnist --n 16 --out s.png
"""
from __future__ import annotations

from .. import pretrained
from .common import add_json, emit


def cmd_models(args) -> int:
    models = pretrained.list_models()
    if args.json:
        emit(args, {"models": models})
        return 0
    if not models:
        print("no trained models in this installation (`make pretrained` trains them)")
        return 0
    for name, e in models.items():
        bpd = f"{e['test_bits_per_dim']:.3f} ± {e['test_bits_per_dim_se']:.3f}"
        print(f"{name:28s} {e['dataset']}, {e['n_bits']}-bit test bits/dim {bpd} on {e['test_images']:,} images; "
              f"{e['parameters']:,} parameters, {e['size_bytes'] / 1e6:.1f} MB")
        print(f"{'':28s} {e['description']}")
        print(f"{'':28s} data: {e['data_licence']}" + (f"; {e['acknowledgement']}" if e.get("acknowledgement") else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="list the trained models glowflow ships (usable by name as a checkpoint)",
                       description=__doc__)
    add_json(p)
    p.set_defaults(func=cmd_models)
