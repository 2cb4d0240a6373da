"""Put a trained run into the package as a named model (``make pretrained`` calls this): its EMA
weights as a checkpoint folder under ``src/glowflow/weights/NAME``, its directions if it has them,
and its registry entry in ``weights/models.json`` with the test bits/dim measured here.

    python scripts/package_model.py NAME RUN --dataset fashion-mnist --data DIR --description TEXT \
        --train-command "make pretrained" --data-licence TEXT [--acknowledgement TEXT] [--hub-dir DIR]

With ``--hub-dir DIR`` the same files and a model card (``README.md``, from the entry) are also
written into DIR, ready for ``hf upload ORG/NAME DIR``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from glowflow import Glow, hub, io, pretrained  # noqa: E402
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
    p.add_argument("--hub-dir", type=Path, help="also write the model and its card (README.md) here, to upload to "
                                                "the Hugging Face Hub (default: none)")
    p.add_argument("--repo-id", help="the Hub id the card's examples load (default: OWNER/NAME)")
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
    if args.hub_dir is not None:
        write_hub_dir(args.hub_dir, dest, hub.model_card(entry, args.name, args.repo_id))
    print(json.dumps({args.name: entry}))
    return entry


def write_hub_dir(path: Path, model_dir: Path, card: str) -> None:
    """``path``: the files of ``model_dir`` and ``README.md``, replaced atomically. Only a folder
    holding nothing but such files (one this wrote before) is replaced."""
    names = {f.name for f in model_dir.iterdir()} | {hub.CARD_NAME}
    with io.atomic_directory(path, ours=lambda p: all(f.is_file() and f.name in names for f in p.iterdir()),
                             what="a folder package_model.py wrote") as tmp:
        for f in model_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
        (tmp / hub.CARD_NAME).write_text(card, encoding="utf-8")


if __name__ == "__main__":
    main()
