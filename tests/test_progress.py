"""Progress on a terminal is a tqdm bar; in a log it is a plain line every few seconds."""
from __future__ import annotations

import io

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
