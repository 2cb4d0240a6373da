"""Downloads into a data directory: atomic, and offline a message saying what to put where."""
from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

from ..io import atomic_file

__all__ = ["download_files", "DOWNLOAD_TIMEOUT_S"]

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
                f"offline. Fetch {files} elsewhere and put them in {root}, then call again "
                f"without download=True.") from e
