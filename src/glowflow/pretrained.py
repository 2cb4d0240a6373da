"""Trained models that ship with glowflow, by name.

``Glow.from_pretrained("orl-faces")`` and every command that takes a checkpoint (``glowflow sample
fashion-mnist``) accept a name from :func:`list_models` wherever a path does not exist. Each model
is a checkpoint folder under ``glowflow/weights/NAME`` (config, weights, checksums, and directions
where it has them); ``glowflow/weights/models.json`` holds each one's registry entry: the data it
was trained on and the data's licence, its test bits/dim with the command that measured it, the
command that trained it (``make pretrained``), and the size and SHA-256 of its weights, checked
before they are used.
"""
from __future__ import annotations

from pathlib import Path

from . import io

__all__ = ["WEIGHTS_DIR", "REGISTRY", "ENTRY_FIELDS", "list_models", "model_entry", "model_dir",
           "is_model_name", "PretrainedError"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REGISTRY = "models.json"
WEIGHTS_FILE = "model.safetensors"
# what every entry says (docs/pretrained: the registry's fields)
ENTRY_FIELDS = ("dataset", "description", "image_shape", "n_bits", "parameters", "test_bits_per_dim",
                "test_bits_per_dim_se", "test_images", "eval_command", "train_command", "data_licence",
                "acknowledgement", "size_bytes", "sha256", "directions")


class PretrainedError(ValueError):
    """An unknown model name, or a shipped model whose files are not the ones its entry names."""


def _registry(weights_dir: Path | None = None) -> dict[str, dict]:
    path = (weights_dir or WEIGHTS_DIR) / REGISTRY
    if not path.is_file():
        return {}
    entries = io.read_json(path, PretrainedError)
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise PretrainedError(f"bad registry {path}: expected an object of objects")
    return entries


def list_models(weights_dir: Path | None = None) -> dict[str, dict]:
    """Name -> registry entry (a dict of :data:`ENTRY_FIELDS`) of every shipped model."""
    return dict(sorted(_registry(weights_dir).items()))


def is_model_name(text) -> bool:
    """Whether ``text`` could name a model: no path separator, not a path that exists."""
    s = str(text)
    return bool(s) and "/" not in s and "\\" not in s and not Path(s).exists()


def model_entry(name: str, weights_dir: Path | None = None) -> dict:
    """The registry entry of model ``name``; an unknown name lists the known ones."""
    models = list_models(weights_dir)
    if name not in models:
        known = ", ".join(models) or "(none in this installation)"
        raise PretrainedError(f"{name!r} is neither a checkpoint path nor a trained model glowflow ships; "
                              f"the models are: {known} (`glowflow models` lists them)")
    return models[name]


def model_dir(name: str, weights_dir: Path | None = None) -> Path:
    """The checkpoint folder of model ``name``, after checking its weights' size and SHA-256
    against the registry."""
    entry = model_entry(name, weights_dir)
    folder = (weights_dir or WEIGHTS_DIR) / name
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise PretrainedError(f"the files of model {name!r} are missing ({weights}); reinstall glowflow or "
                              "train it with `make pretrained`")
    if weights.stat().st_size != entry.get("size_bytes") or io.file_sha256(weights) != entry.get("sha256"):
        raise PretrainedError(f"{weights} is not the file the registry names for {name!r} (size or SHA-256 "
                              "differ): reinstall glowflow, or train it again with `make pretrained`")
    return folder
