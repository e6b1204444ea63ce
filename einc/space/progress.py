"""A small progress bar on stderr, shown only once a task has run for a while.

Like tqdm's ``delay``: short runs print nothing; runs longer than ``delay`` seconds show a
bar that redraws at most a few times a second. ``enabled=None`` shows it only on a terminal.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", *, enabled: bool | None = None,
                 delay: float = 1.0, stream=None):
        self.total, self.desc, self.delay = max(int(total), 1), desc, delay
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.count = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = False

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start < self.delay or (now - self._last < 0.2 and self.count < self.total):
            return
        self._last = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.count / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        self.stream.write(f"\r{self.desc} [{bar}] {frac:6.1%}  {elapsed:5.1f}s"
                          f" (eta {eta:4.1f}s)")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
