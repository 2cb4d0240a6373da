"""Presets (JSON or YAML data shipped with the package, or any such file) and ``key=value``
command-line overrides: plain data that :func:`glowflow.config.build_train_config` checks."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .. import io

__all__ = ["list_presets", "load_preset", "apply_overrides", "PRESET_DIR"]

PRESET_DIR = Path(__file__).parent
PRESET_SUFFIXES = (".json", ".yaml", ".yml")


def list_presets() -> dict[str, str]:
    """Name -> one-line description of every preset shipped with the package."""
    out = {}
    for path in sorted(PRESET_DIR.iterdir()):
        if path.suffix in PRESET_SUFFIXES:
            out[path.stem] = " ".join(str(_read(path).get("description", "")).split())
    return out


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
        data = io.parse_json(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"preset {path} is not valid {path.suffix[1:].upper()}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"preset {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_preset(name_or_path: str) -> dict:
    """A shipped preset by name (``fashion-mnist-cpu``) or any JSON/YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        candidates = [PRESET_DIR / f"{name_or_path}{s}" for s in PRESET_SUFFIXES]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise ValueError(f"unknown preset {name_or_path!r}: not a file, and not one of "
                             f"{', '.join(list_presets())}")
    data = _read(path)
    data.pop("description", None)
    return data


def apply_overrides(settings: dict, overrides: list[str]) -> dict:
    """``["lr=1e-4", "model.steps=16"]`` -> a copy of ``settings`` with those keys set (YAML values)."""
    out = json.loads(json.dumps(settings))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. model.steps=16)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({e})") from None
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a group of settings")
        if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
            raise ValueError(f"override {item!r}: {key} is a group of settings; set one of its keys, "
                             f"e.g. {key}.{next(iter(node[leaf]), 'steps')}=...")
        node[leaf] = value
    return out
