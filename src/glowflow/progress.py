"""Progress of long work: a tqdm bar on a terminal; in Jupyter a notebook bar (tqdm's widget where
ipywidgets is installed, else its text bar); elsewhere (a log file, CI) one plain line every few
seconds, so a 15-minute run writes a readable log instead of a megabyte of bar redraws."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress", "LOG_INTERVAL_S", "in_jupyter_kernel"]

LOG_INTERVAL_S = 10.0


def in_jupyter_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (a notebook, JupyterLab, VS Code), where stderr is
    no terminal yet a bar can be drawn. IPython is looked up, not imported: a kernel has loaded it."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _widget_bar():
    """tqdm's notebook (widget) bar class, or None without ipywidgets. Chosen here rather than by
    ``tqdm.auto``, which warns on every import in a kernel that lacks ipywidgets."""
    try:
        from tqdm import notebook
    except ImportError:
        return None
    return notebook.tqdm if getattr(notebook, "IProgress", None) is not None else None


def _bar_class(stream):
    """The tqdm class that draws progress on ``stream``, or None where plain lines are wanted."""
    if stream in (sys.stderr, sys.stdout) and in_jupyter_kernel():
        # the kernel's own output: a widget, or tqdm's text bar (Jupyter draws its carriage returns)
        # where ipywidgets is missing; a stream passed in, such as a log file, keeps its lines
        return _widget_bar() or tqdm
    if getattr(stream, "isatty", lambda: False)():
        return tqdm
    return None


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``Progress(total, "train")``: ``update()``, ``set_postfix(loss=...)``, ``total`` and ``n`` may
    be set, ``write(msg)`` prints above the bar, ``close()``. ``enabled=False`` shows nothing."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "it",
                 initial: int = 0, stream=None, interval: float = LOG_INTERVAL_S):
        self.desc, self.unit, self.enabled, self.interval = desc, unit, enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self._total, self._n, self._postfix = total, initial, ""
        self._start_n = initial
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        bar = _bar_class(self.stream) if enabled else None
        if bar is not None:
            self._bar = bar(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                            file=self.stream)

    # tqdm-like attributes -------------------------------------------------------------------
    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    @property
    def n(self) -> int:
        return self._n

    @n.setter
    def n(self, value: int) -> None:
        self._n = value
        if self._bar is not None:
            self._bar.n = value
            self._bar.refresh()

    def update(self, k: int = 1) -> None:
        self._n += k
        if self._bar is not None:
            self._bar.update(k)
        elif self.enabled and time.perf_counter() - self._last >= self.interval:
            self._line()

    def set_postfix(self, **values) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._n > self._start_n:
            self._line()
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _line(self) -> None:
        now = time.perf_counter()
        self._last = now
        elapsed = now - self._t0
        done = self._n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self._n}" + (f"/{self._total}" if self._total else "") + f" {self.unit}"]
        if self._total:
            parts[0] += f" ({100.0 * self._n / self._total:.0f}%)"
        parts.append(f"{_clock(elapsed)} elapsed")
        if self._total and rate > 0:
            parts.append(f"{_clock((self._total - self._n) / rate)} left")
        parts.append(f"{rate:.2f} {self.unit}/s")
        if self._postfix:
            parts.append(self._postfix)
        print(", ".join(parts), file=self.stream, flush=True)
