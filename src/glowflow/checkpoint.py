"""Checkpoints: JSON config + safetensors weights, written so that a kill never corrupts them.

A checkpoint is a directory. It is written into a temporary sibling and swapped in with renames:
at every instant either ``<dir>`` or ``<dir>.old`` holds a complete checkpoint, and the loader
falls back to ``<dir>.old`` if a kill landed between the two renames. Beside the files sits
``checksums.json``, the SHA-256 of every binary file in the directory, checked on load: safetensors
validates its header but not the tensor bytes, so a flipped bit in the weights would otherwise load
silently. Checkpoints without the manifest (written before it existed) load unchecked.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKSUMS_NAME = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask: from /proc where Linux has it, else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_permissions(path, directory: bool = False) -> None:
    """Give a file or directory made by ``tempfile`` (0600 / 0700) the mode that ``open`` or
    ``mkdir`` would have given it (0666 / 0777 less the umask), so that checkpoints and outputs
    are as readable to a group as any other file the user writes."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path, suffix: str = ""):
    """Yield a temporary path beside ``path`` for the block to write; then sync it, give it the
    usual permissions and rename it over ``path`` (readers see old or new, never half). On an
    error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory; on success it replaces ``path`` (kept as ``path.old`` meanwhile)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        write_checksums(tmp)
        for f in tmp.iterdir():
            default_permissions(f)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        default_permissions(tmp, directory=True)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


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


def read_json(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"missing file: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt JSON in {path}: {e}") from e


def write_json(path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory) -> None:
    """``checksums.json``: the SHA-256 of each binary file in ``directory``. JSON files are left out,
    so that a config may be edited by hand; their parser catches truncation."""
    directory = Path(directory)
    sums = {f.name: file_sha256(f) for f in sorted(directory.iterdir())
            if f.is_file() and f.suffix != ".json"}
    write_json(directory / CHECKSUMS_NAME, sums)


def verify_checksum(path) -> None:
    """Raise :class:`CheckpointError` if ``path`` no longer matches the SHA-256 recorded beside it.
    Files with no recorded sum (no manifest, or not listed in it) pass."""
    path = Path(path)
    manifest = path.parent / CHECKSUMS_NAME
    if not manifest.is_file() or not path.is_file():
        return
    expected = read_json(manifest).get(path.name)
    if expected is not None and file_sha256(path) != expected:
        raise CheckpointError(f"corrupt file {path}: its SHA-256 does not match the one in {manifest} "
                              "(the bytes changed after the checkpoint was written)")


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


def write_model_files(directory, model, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``config.json`` + ``model.safetensors`` of ``model`` (or of ``state_dict`` under its config)."""
    directory = Path(directory)
    config = model.config.to_dict()
    write_json(directory / CONFIG_NAME, config)
    state = model.state_dict() if state_dict is None else state_dict
    save_tensors(directory / WEIGHTS_NAME, state, {"format": "glowflow", "config": json.dumps(config)})


def save_model(model, directory) -> None:
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, model)


def load_state_into(model, state: dict[str, torch.Tensor], source) -> None:
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


def load_model(directory, map_location="cpu", weights_name: str = WEIGHTS_NAME):
    """Build a :class:`Glow` from ``config.json`` and load ``weights_name`` into it."""
    from .model import Glow, GlowConfig

    directory = resolve_checkpoint_dir(directory)
    try:
        config = GlowConfig.from_dict(read_json(directory / CONFIG_NAME))
    except TypeError as e:
        raise CheckpointError(f"bad config in {directory / CONFIG_NAME}: {e}") from e
    model = Glow(config=config)
    load_state_into(model, load_tensors(directory / weights_name), directory / weights_name)
    return model.to(map_location).eval()
