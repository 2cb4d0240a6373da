"""Files that are never half-written: atomic files and directories, strict JSON, SHA-256, file
modes; and ``.npy`` arrays read with their header checked first.

Everything glowflow writes to disk (checkpoints, directions, downloads, ablation results, score
tables, prepared datasets) goes through here. A write lands in a temporary sibling, is synced,
given the mode ``open`` / ``mkdir`` would have given it, and renamed over its target, so a reader
(or a process killed mid-write) sees the old file or the new one, never a mixture.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io as _io
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["atomic_file", "atomic_write_text", "atomic_write_bytes", "atomic_save_npy", "atomic_write_json", "atomic_directory", "read_json",
           "write_json", "file_sha256", "default_permissions", "remove_stale_temporaries", "pid_alive",
           "describe_os_error", "json_text", "finite_or_none", "read_npy", "parse_json", "DirectoryLock", "LockedError", "RefusedError", "check_replaceable"]

# Temporary names carry the writer's pid, so that a later writer can tell a dead writer's leftovers
# (removed) from a live one's (kept): ".<name>.tmp-<pid>-<random>".
_TMP_TAG = ".tmp-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}{_TMP_TAG}{os.getpid()}-"


def remove_stale_temporaries(path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by writers that died mid-write (a kill, a
    crash, a full disk); those of live processes are kept. Returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    stem = f".{path.name}{_TMP_TAG}"
    for candidate in path.parent.iterdir():
        if not candidate.name.startswith(stem):
            continue
        pid_text = candidate.name[len(stem):].split("-", 1)[0]
        if pid_text.isdigit() and pid_alive(int(pid_text)):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                candidate.unlink()
        removed.append(candidate)
    return removed


def describe_os_error(e: OSError, path) -> str:
    """One line for a failed write: what happened to which path, in words a user can act on."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EFBIG: "the file is larger than this system allows (file-size limit)",
               errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only",
               errno.ENOTDIR: "a parent of it is a file, not a directory",
               errno.EISDIR: "it is a directory"}
    reason = reasons.get(e.errno, e.strerror or type(e).__name__)
    return f"could not write {path}: {reason}"


@contextlib.contextmanager
def atomic_file(path, suffix: str = ""):
    """Yield a temporary path beside ``path`` for the block to write; then sync it, give it the
    usual permissions and rename it over ``path`` (readers see old or new, never half). On an
    error it is removed and ``path`` is left as it was; a failed write is an ``OSError`` whose
    message names ``path`` and the reason (:func:`describe_os_error`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # say which file, in words (disk full, ...)
            raise OSError(e.errno, describe_os_error(e, path)) from e
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write a binary file atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_npy(path, array) -> None:
    """Write one ``.npy`` array to exactly ``path`` (``np.save`` would append ``.npy``), atomically.
    The bytes are made in memory first: ``np.save`` into a file writes with C ``fwrite``, whose
    short writes on a full disk (or past ``ulimit -f``) it does not report, which would leave a
    truncated array that looks complete."""
    import numpy as np

    buffer = _io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def finite_or_none(data):
    """``data`` with every NaN and infinity replaced by None, through dicts, lists and tuples:
    strict JSON has no NaN, and strict parsers refuse the ``NaN`` Python would write."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


def json_text(data, indent: int | None = None, sort_keys: bool = True) -> str:
    """Strict JSON of ``data`` (NaN and infinities as null): what glowflow prints and writes."""
    return json.dumps(finite_or_none(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def _dumps(data, indent) -> str:
    return json_text(data, indent) + "\n"


def atomic_write_json(path, data, indent: int | None = 2) -> None:
    """Write ``data`` as JSON atomically (sorted keys, a newline at the end)."""
    atomic_write_text(path, _dumps(data, indent))


def write_json(path, data, indent: int | None = 2) -> None:
    """Write JSON into a file of a directory that is itself being written atomically."""
    Path(path).write_text(_dumps(data, indent))


def parse_json(text):
    """``json.loads``; nesting too deep for the parser is a ValueError like any other bad JSON
    (Python's parser recurses, so ``[[[[...]]]]`` would otherwise end in a RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse") from None


def read_json(path, error=ValueError):
    """Parse a JSON file; a missing or unreadable file raises ``error`` naming the path."""
    path = Path(path)
    try:
        return parse_json(path.read_text())
    except FileNotFoundError as e:
        raise error(f"missing file: {path}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"corrupt JSON in {path}: {e}") from e
    except IsADirectoryError as e:
        raise error(f"{path} is a directory, expected a JSON file") from e


def read_npy(path, what: str = "array"):
    """One ``.npy`` array, its header checked against the file before anything is allocated: an
    array whose declared shape needs more bytes than the file holds (a few-byte file declaring
    terabytes) is a ValueError, not a MemoryError. ``.npz`` archives come back as numpy opens them
    (the caller says what it expected); pickled objects are refused."""
    import numpy as np

    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                f.seek(0)
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                need = math.prod(shape) * dtype.itemsize
                have = path.stat().st_size - f.tell()
                if not dtype.hasobject and need > have:
                    raise ValueError(f"its header declares an array of shape {list(shape)} ({need:,} bytes), "
                                     f"but the file holds {have:,}: truncated or forged")
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy {what} ({e})") from None


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RefusedError(ValueError):
    """A write would replace or delete something glowflow cannot prove it wrote."""


def _is_empty_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_replaceable(path, ours=None, what: str = "a directory glowflow wrote") -> None:
    """Raise :class:`RefusedError` unless ``path`` may be replaced: it is missing, an empty
    directory, or a directory ``ours(path)`` recognises as written by glowflow. Anything else (a
    file, a link, a folder of the user's) is never deleted or moved aside."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()) or _is_empty_directory(path):
        return
    if path.is_dir() and not path.is_symlink() and ours is not None and ours(path):
        return
    kind = "a link" if path.is_symlink() else "a file" if not path.is_dir() else "a directory"
    raise RefusedError(f"{path} exists and is {kind} that is not {what}; glowflow replaces only what it "
                       "wrote itself: move it away or choose another path")


@contextlib.contextmanager
def atomic_directory(path, ours=None, what: str = "a directory glowflow wrote"):
    """Yield a temporary directory; on success it replaces ``path`` (kept as ``path.old`` meanwhile).

    At every instant either ``path`` or ``path.old`` holds a complete directory. Temporary
    directories of writers that died are removed first. Only a missing or empty ``path``, or one
    that ``ours(path)`` recognises, is replaced (likewise ``path.old``): anything else raises
    :class:`RefusedError` before a byte is written (:func:`check_replaceable`).
    """
    path = Path(path)
    old = path.with_name(path.name + ".old")
    check_replaceable(path, ours, what)
    check_replaceable(old, ours, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    try:
        yield tmp
        for f in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
            if f.is_dir():
                default_permissions(f, directory=True)
                _fsync_dir(f)
            else:
                default_permissions(f)
                _fsync_file(f)
        default_permissions(tmp, directory=True)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


class LockedError(RuntimeError):
    """Another live process holds the lock of a directory."""


class DirectoryLock:
    """An exclusive lock on a directory (``<dir>/.lock``, ``flock``): one writer at a time.

    The operating system releases it when its holder exits, however it exits, so a lock left by
    a dead process never blocks; the file's content (pid, host, time) only serves the message.
    """

    NAME = ".lock"

    def __init__(self, directory, what: str = "this directory"):
        self.path = Path(directory) / self.NAME
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "DirectoryLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(f"{self.path.parent} is in use by {self.what} ({holder}); wait for it to "
                              "finish, or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()
