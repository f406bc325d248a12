"""Replay's progress line (on a terminal only) and its closing summary."""

from __future__ import annotations

import time
from typing import Callable, TextIO

INTERVAL = 0.2  # seconds between redraws of the progress line


class Progress:
    """``replay: 12,000/50,000 events (24%), 8,100 events/s``, redrawn in place while stream is a terminal."""

    def __init__(self, total: int, stream: TextIO | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self._stream = stream if stream is not None and stream.isatty() else None
        self._clock = clock
        self._started = clock()
        self._drawn_at = float("-inf")
        self.done = 0

    def advance(self, events: int) -> None:
        self.done += events
        now = self._clock()
        if self._stream is not None and now - self._drawn_at >= INTERVAL:
            self._drawn_at = now
            self._stream.write("\r" + self.line(now) + "\033[K")
            self._stream.flush()

    def line(self, now: float) -> str:
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        return f"replay: {self.done:,}/{self.total:,} events{share}, {self.rate(now):,.0f} events/s"

    def rate(self, now: float | None = None) -> float:
        elapsed = (self._clock() if now is None else now) - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def elapsed(self) -> float:
        return self._clock() - self._started

    def finish(self) -> None:
        """Leave the terminal on a fresh line for the summary."""
        if self._stream is not None and self._drawn_at > float("-inf"):
            self._stream.write("\r" + self.line(self._clock()) + "\033[K\n")
            self._stream.flush()
