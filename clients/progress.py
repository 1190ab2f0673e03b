"""A dependency-free progress bar for long client jobs (`clipserve eval`), written to stderr.

On a terminal it redraws one line (``\\r``); otherwise (a log file, a CI job, a test capturing
stderr) it writes a full line at every tenth of the way and at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO

BAR_WIDTH = 28
#: Minimum seconds between two redraws on a terminal.
REDRAW_S = 0.1


class Progress(Protocol):
    """Progress of one job: `advance` by finished items (from any thread), then `close`."""

    def advance(self, count: int) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[str, int, str], Progress]
"""Makes the progress of a job from its title, total and unit (``"images"``)."""


class NullProgress:
    """Reports nothing."""

    def advance(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(title: str, total: int, unit: str) -> Progress:
    """A `ProgressFactory` that reports nothing."""
    return NullProgress()


class ProgressBar:
    """``title [#####-----]  512/1000 images  48.1 images/s  ETA 10s`` on `stream`."""

    def __init__(self, title: str, total: int, unit: str, stream: TextIO | None = None) -> None:
        self.title = title
        self.total = max(total, 0)
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last_tenth = -1
        self._closed = False
        self._lock = threading.Lock()

    def advance(self, count: int) -> None:
        with self._lock:
            self.done = min(self.done + count, self.total)
            now = time.monotonic()
            if self.interactive:
                if now - self._last_draw >= REDRAW_S or self.done == self.total:
                    self._last_draw = now
                    self.stream.write("\r" + self.line(now))
                    self.stream.flush()
                return
            tenth = self.done * 10 // self.total if self.total else 10
            if tenth > self._last_tenth and self.done < self.total:
                self._last_tenth = tenth
                self.stream.write(self.line(now) + "\n")
                self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            line = self.line(time.monotonic())
            self.stream.write(("\r" + line if self.interactive else line) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        fraction = self.done / self.total if self.total else 1.0
        filled = round(fraction * BAR_WIDTH)
        rate = self.done / elapsed
        if self.done >= self.total:
            tail = f"{elapsed:.1f}s"
        elif rate > 0:
            tail = f"ETA {(self.total - self.done) / rate:.0f}s"
        else:
            tail = "ETA ?"
        width = len(str(self.total))
        return (
            f"{self.title} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] "
            f"{self.done:>{width}}/{self.total} {self.unit}  {rate:.1f} {self.unit}/s  {tail}"
        )
