"""The checkpoint format: a directory of ``config.json`` + ``model.safetensors`` + ``checksums.json``.

A checkpoint is written into a temporary sibling and swapped in with renames
(:func:`glowflow.io.atomic_directory`): at every instant either ``<dir>`` or ``<dir>.old`` holds a
complete checkpoint, and the loader falls back to ``<dir>.old`` if a kill landed between the two
renames. ``checksums.json`` holds the SHA-256 of every other file in the directory, checked on
load: safetensors validates its header but not the tensor bytes, so a flipped bit in the weights
(or an edited config) would otherwise load silently. A checkpoint without ``checksums.json``
loads with a warning. Weights are safetensors, never pickle; a training run adds its optimizer
state (``trainer.pt``, loaded with ``weights_only=True``) beside them.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import io

__all__ = ["CheckpointError", "CONFIG_NAME", "WEIGHTS_NAME", "CHECKPOINT_DIR", "CHECKSUMS_NAME",
           "checkpoint_directory", "resolve_checkpoint_dir", "read_json", "read_config", "write_model_files",
           "write_checksums", "verify_checksum", "save_tensors", "load_tensors", "load_state_into",
           "weights_sha256"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKSUMS_NAME = "checksums.json"
FORMAT = "glowflow"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


@contextlib.contextmanager
def checkpoint_directory(path):
    """Yield a temporary directory to write a checkpoint into; on success its checksums are
    written and it replaces ``path`` atomically. A failed write (disk full, a file-size limit)
    raises :class:`CheckpointError` saying so, and leaves ``path`` as it was."""
    try:
        with io.atomic_directory(path) as tmp:
            yield tmp
            write_checksums(tmp)
    except OSError as e:
        raise CheckpointError(io.describe_os_error(e, path)) from e
    except (RuntimeError, SafetensorError) as e:  # torch.save and safetensors report failed writes their own way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not write the checkpoint {path} ({first[:200]}): is the disk full, or a "
                              "file-size limit (ulimit -f) in force?") from e


def resolve_checkpoint_dir(path) -> Path:
    """A checkpoint directory, a run directory holding ``checkpoint/``, or the ``.old`` left by a kill."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT_DIR):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
        old = candidate.with_name(candidate.name + ".old")
        if not candidate.exists() and (old / CONFIG_NAME).is_file():
            return old
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    raise CheckpointError(f"no checkpoint in {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} there "
                          f"or in {path / CHECKPOINT_DIR}")


def read_json(path):
    """A JSON file of a checkpoint; missing or corrupt is a :class:`CheckpointError`."""
    return io.read_json(path, CheckpointError)


def read_config(directory) -> dict:
    """The checked ``config.json`` of a checkpoint directory, as a dict."""
    path = Path(directory) / CONFIG_NAME
    verify_checksum(path)
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"bad config in {path}: expected a JSON object, got {type(config).__name__}")
    return config


def write_model_files(directory, config: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """``config.json`` + ``model.safetensors`` (the weights, with the config in their metadata)."""
    directory = Path(directory)
    io.write_json(directory / CONFIG_NAME, config)
    save_tensors(directory / WEIGHTS_NAME, state_dict, {"format": FORMAT, "config": json.dumps(config)})


def write_checksums(directory) -> None:
    """``checksums.json``: the SHA-256 of each file in ``directory``."""
    directory = Path(directory)
    sums = {f.name: io.file_sha256(f) for f in sorted(directory.iterdir())
            if f.is_file() and f.name != CHECKSUMS_NAME}
    io.write_json(directory / CHECKSUMS_NAME, sums)


def _manifest(directory: Path) -> dict | None:
    """The checksums of a checkpoint directory, or None (with a warning) when it has none."""
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        warnings.warn(f"{directory} has no {CHECKSUMS_NAME}: its files are loaded unchecked (checkpoints "
                      "written by glowflow have one; re-save the model to add it)", stacklevel=3)
        return None
    sums = read_json(path)
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise CheckpointError(f"corrupt {path}: expected a JSON object of file name -> SHA-256, "
                              f"got {type(sums).__name__}")
    return sums


def verify_checksum(path) -> None:
    """Raise :class:`CheckpointError` if ``path`` no longer matches the SHA-256 recorded beside it.
    A file the manifest does not list passes (it was added after the checkpoint was written)."""
    path = Path(path)
    if not path.is_file():
        return
    sums = _manifest(path.parent)
    expected = None if sums is None else sums.get(path.name)
    if expected is not None and io.file_sha256(path) != expected:
        raise CheckpointError(f"corrupt file {path}: its SHA-256 does not match the one in "
                              f"{path.parent / CHECKSUMS_NAME} (the bytes changed after the checkpoint was "
                              "written; delete that file to load it unchecked)")


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file: {path}")
    verify_checksum(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt or truncated weights file {path}: {e}") from e


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """``model.load_state_dict(state)``, with a :class:`CheckpointError` naming what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {list(v.shape)}, the model expects {list(own[k].shape)}")
    model.load_state_dict(state)


def weights_sha256(checkpoint) -> str:
    """SHA-256 of a checkpoint's weights file: ties derived files (directions) to the weights they
    were made with."""
    return io.file_sha256(resolve_checkpoint_dir(checkpoint) / WEIGHTS_NAME)
