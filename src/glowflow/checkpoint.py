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
from safetensors.torch import load_file, save

from . import hub, io, pretrained

__all__ = ["CheckpointError", "CONFIG_NAME", "WEIGHTS_NAME", "CHECKPOINT_DIR", "CHECKSUMS_NAME",
           "checkpoint_directory", "resolve_checkpoint_dir", "resolve_model_dir", "read_json", "read_config", "write_model_files",
           "write_checksums", "verify_checksum", "save_tensors", "load_tensors", "load_state_into",
           "weights_sha256", "is_checkpoint"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKSUMS_NAME = "checksums.json"
FORMAT = "glowflow"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


def is_checkpoint(directory) -> bool:
    """Whether ``directory`` is a checkpoint glowflow wrote, and so may be replaced by a newer one:
    plain files only, ``config.json`` among them, each named in its ``checksums.json``. A folder
    holding anything else (a user's file, a subfolder) is not, whatever its name."""
    directory = Path(directory)
    try:
        entries = list(directory.iterdir())
        sums = io.parse_json((directory / CHECKSUMS_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(sums, dict) or CONFIG_NAME not in sums:
        return False
    return all(f.is_file() and not f.is_symlink() and (f.name in sums or f.name == CHECKSUMS_NAME)
               for f in entries)


@contextlib.contextmanager
def checkpoint_directory(path):
    """Yield a temporary directory to write a checkpoint into; on success its checksums are
    written and it replaces ``path`` atomically. A failed write (disk full, a file-size limit)
    raises :class:`CheckpointError` saying so, and leaves ``path`` as it was. Only a checkpoint
    glowflow wrote (:func:`is_checkpoint`), an empty folder or nothing is replaced; anything else
    raises :class:`glowflow.io.RefusedError` before a byte is written."""
    try:
        with io.atomic_directory(path, ours=is_checkpoint, what="a glowflow checkpoint") as tmp:
            yield tmp
            write_checksums(tmp)
    except OSError as e:
        raise CheckpointError(io.describe_os_error(e, path)) from e
    except (RuntimeError, SafetensorError) as e:  # torch.save and safetensors report failed writes their own way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not write the checkpoint {path} ({first[:200]}): is the disk full, or a "
                              "file-size limit (ulimit -f) in force?") from e


def resolve_model_dir(source) -> Path:
    """Where a model is read from: :func:`resolve_checkpoint_dir` of a path that exists; else the
    folder of the model glowflow ships under that name (a bare name, :mod:`glowflow.pretrained`);
    else, for ``owner/name`` or ``owner/name@revision``, that Hugging Face Hub repo in the hub's
    cache (:mod:`glowflow.hub`). A run's own directory is never a name or an id: training resolves
    it with :func:`resolve_checkpoint_dir`."""
    if pretrained.is_model_name(source):
        try:
            return pretrained.model_dir(str(source))
        except pretrained.PretrainedError as e:
            raise CheckpointError(str(e)) from None
    path = Path(source)
    # a path always wins, the .old a kill left (resolve_checkpoint_dir) included
    if hub.is_hub_id(source) and not path.exists() and not path.with_name(path.name + ".old").exists():
        try:
            folder = hub.download(source)
        except hub.HubError as e:
            raise CheckpointError(str(e)) from None
        try:
            return resolve_checkpoint_dir(folder)
        except CheckpointError:
            raise CheckpointError(f"the Hugging Face Hub repo {source} holds no glowflow checkpoint: expected "
                                  f"{CONFIG_NAME} and {WEIGHTS_NAME} at its top or in {CHECKPOINT_DIR}/") from None
    return resolve_checkpoint_dir(path)


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
    if not isinstance(sums, dict):
        raise CheckpointError(f"corrupt {path}: expected a JSON object of file name -> SHA-256, "
                              f"got {type(sums).__name__}")
    bad = next(((k, v) for k, v in sums.items() if not (isinstance(v, str) and len(v) == 64)), None)
    if bad is not None:
        raise CheckpointError(f"corrupt {path}: the entry {bad[0]!r} is {json.dumps(bad[1])[:60]}, expected the "
                              "file's SHA-256 as 64 hex digits")
    if not sums:
        raise CheckpointError(f"corrupt {path}: it lists no files, so nothing would be checked (glowflow writes "
                              "one entry per file; delete it to load the checkpoint unchecked)")
    return sums


def verify_checksum(path) -> None:
    """Raise :class:`CheckpointError` if ``path`` no longer matches the SHA-256 recorded beside it.
    A file the manifest does not list is read with a warning that says so."""
    path = Path(path)
    if not path.is_file():
        return
    sums = _manifest(path.parent)
    expected = None if sums is None else sums.get(path.name)
    if sums is not None and expected is None:
        warnings.warn(f"{path} is not listed in {path.parent / CHECKSUMS_NAME}: it is read unchecked", stacklevel=3)
    if expected is not None and io.file_sha256(path) != expected:
        raise CheckpointError(f"corrupt file {path}: its SHA-256 does not match the one in "
                              f"{path.parent / CHECKSUMS_NAME} (the bytes changed after the checkpoint was "
                              "written; delete that file to load it unchecked)")


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors. Weights holding NaN or inf are refused (a
    :class:`CheckpointError`) before anything is written: a diverged model never replaces a good
    checkpoint on disk. The same tensors and metadata always give the same bytes."""
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(f"refusing to write {path}: {len(bad)} of {len(tensors)} tensors hold NaN or inf "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the weights diverged, "
                              "and what is on disk is kept")
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with open(path, "wb") as f:
        f.write(_canonical_header(data))


def _canonical_header(data: bytes) -> bytes:
    """safetensors bytes with the metadata's keys in sorted order. The writer keeps metadata in a
    hash map whose order changes from process to process, so the same weights would otherwise get
    another SHA-256 each time they are saved. The header stays JSON padded to 8 bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


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
    """``model.load_state_dict(state)``, with a :class:`CheckpointError` naming what does not fit: a
    missing or unexpected name, a shape, a dtype of another kind (integer or complex values where
    the model holds real numbers, which ``load_state_dict`` would cast silently), NaN or inf."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {list(v.shape)}, the model expects {list(own[k].shape)}")
        if v.is_floating_point() != own[k].is_floating_point() or v.is_complex() != own[k].is_complex():
            raise CheckpointError(f"{source}: {k} holds {v.dtype} values, the model expects {own[k].dtype}")
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} of {len(state)} tensors hold NaN or inf ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}); these weights diverged and cannot be used")
    model.load_state_dict(state)


def weights_sha256(checkpoint) -> str:
    """SHA-256 of a checkpoint's weights file: ties derived files (directions) to the weights they
    were made with."""
    return io.file_sha256(resolve_model_dir(checkpoint) / WEIGHTS_NAME)
