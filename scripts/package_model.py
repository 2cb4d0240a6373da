"""Put a trained run into the package as a named model (``make pretrained`` calls this): its EMA
weights as a checkpoint folder under ``src/glowflow/weights/NAME``, its directions if it has them,
and its registry entry in ``weights/models.json`` with the test bits/dim measured here.

    python scripts/package_model.py NAME RUN --dataset fashion-mnist --data DIR --description TEXT \
        --train-command "make pretrained" --data-licence TEXT [--acknowledgement TEXT]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from glowflow import Glow, io, pretrained  # noqa: E402
from glowflow.directions import DIRECTIONS_JSON, DIRECTIONS_WEIGHTS  # noqa: E402
from glowflow.train import dataset_bits_per_dim, load_split  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("run", type=Path)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--description", required=True)
    p.add_argument("--train-command", required=True)
    p.add_argument("--data-licence", required=True)
    p.add_argument("--acknowledgement", default="")
    p.add_argument("--weights-dir", type=Path, default=pretrained.WEIGHTS_DIR)
    args = p.parse_args(argv)

    model = Glow.from_pretrained(args.run)
    dest = args.weights_dir / args.name
    if dest.exists():
        shutil.rmtree(dest)  # a folder this script wrote: the registry names it
    model.save_pretrained(dest)
    run = args.run if (args.run / DIRECTIONS_WEIGHTS).is_file() else None
    if run is not None:
        for name in (DIRECTIONS_WEIGHTS, DIRECTIONS_JSON):
            shutil.copy2(run / name, dest / name)
    test = load_split(args.dataset, args.data, "test", model.config.image_shape)
    res = dataset_bits_per_dim(model, test, seed=0)
    weights = dest / pretrained.WEIGHTS_FILE
    entry = {"dataset": args.dataset, "description": args.description,
             "image_shape": list(model.config.image_shape), "n_bits": model.config.n_bits,
             "parameters": sum(t.numel() for t in model.parameters()),
             "test_bits_per_dim": round(res["bits_per_dim"], 4), "test_bits_per_dim_se": round(res["bits_per_dim_se"], 4),
             "test_images": res["num_images"],
             "eval_command": f"glowflow eval {args.name} --dataset {args.dataset} --data DIR --seed 0",
             "train_command": args.train_command, "data_licence": args.data_licence,
             "acknowledgement": args.acknowledgement, "size_bytes": weights.stat().st_size,
             "sha256": io.file_sha256(weights), "directions": run is not None}
    registry = {**pretrained.list_models(args.weights_dir), args.name: entry}
    io.atomic_write_json(args.weights_dir / pretrained.REGISTRY, dict(sorted(registry.items())))
    print(json.dumps({args.name: entry}))
    return entry


if __name__ == "__main__":
    main()
