"""Progress on a terminal is a tqdm bar; in Jupyter a notebook bar; in a log a plain line every few seconds."""
from __future__ import annotations

import importlib.util
import io
import sys
import types
import warnings

from glowflow.progress import Progress


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_log_gets_a_line_every_interval_not_every_step(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("glowflow.progress.time.perf_counter", clock)
    out = io.StringIO()  # not a terminal
    bar = Progress(800, "train", stream=out, interval=10.0, unit="step")
    for _ in range(800):
        clock.t += 0.125  # 100 s in all
        bar.update(1)
        bar.set_postfix(loss="1.000")
    bar.close()
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and "\r" not in out.getvalue()
    assert lines[0].startswith("train: 80/800 step (10%), 00:10 elapsed, 01:30 left, 8.00 step/s, loss=1.000")
    assert lines[-1].startswith("train: 800/800 step (100%)")


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    bar = Progress(10, "eval", enabled=False, stream=out, interval=0.0)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert out.getvalue() == ""


class _Shell:
    def __init__(self, app: str):
        self.config = {app: {}}


def test_a_jupyter_kernel_is_told_from_a_terminal_ipython(monkeypatch):
    from glowflow.progress import in_jupyter_kernel

    def ipython(shell):
        monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
        return in_jupyter_kernel()

    assert ipython(_Shell("IPKernelApp"))
    assert not ipython(_Shell("TerminalIPythonApp"))
    assert not ipython(None)  # IPython imported, but this is no IPython session
    monkeypatch.delitem(sys.modules, "IPython")
    assert not in_jupyter_kernel()


class _WidgetBar:
    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.n, self.closed = kwargs, 0, False
        _WidgetBar.made.append(self)

    def update(self, k):
        self.n += k

    def close(self):
        self.closed = True


def test_in_a_kernel_the_bar_is_a_widget_but_a_log_file_keeps_its_lines(monkeypatch):
    monkeypatch.setattr("glowflow.progress.in_jupyter_kernel", lambda: True)
    monkeypatch.setattr("glowflow.progress._widget_bar", lambda: _WidgetBar)
    _WidgetBar.made.clear()
    with Progress(5, "score", unit="img") as bar:  # the kernel's stderr
        for _ in range(5):
            bar.update(1)
    assert len(_WidgetBar.made) == 1 and _WidgetBar.made[0].n == 5 and _WidgetBar.made[0].closed
    assert _WidgetBar.made[0].kwargs["total"] == 5 and _WidgetBar.made[0].kwargs["desc"] == "score"
    log = io.StringIO()
    with Progress(5, "score", unit="img", stream=log, interval=0.0) as bar:
        bar.update(5)
    assert len(_WidgetBar.made) == 1 and log.getvalue().startswith("score: 5/5 img (100%)")


def test_in_a_kernel_without_ipywidgets_a_text_bar_and_no_warning(monkeypatch, capsys):
    monkeypatch.setattr("glowflow.progress.in_jupyter_kernel", lambda: True)
    monkeypatch.setattr("glowflow.progress._widget_bar", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Progress(4, "score", unit="img") as bar:
            for _ in range(4):
                bar.update(1)
    err = capsys.readouterr().err
    assert "\r" in err and "4/4 [" in err  # tqdm's redrawn bar, not the log's lines
    assert not caught


def test_the_widget_bar_is_found_only_with_ipywidgets_and_silently():
    from glowflow.progress import _widget_bar

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bar = _widget_bar()
    assert (bar is None) == (importlib.util.find_spec("ipywidgets") is None)
    assert not caught
