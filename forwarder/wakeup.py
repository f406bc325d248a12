"""A wake-up flag with a timed wait that creates no task.

``asyncio.wait_for(event.wait(), timeout)`` wraps the wait in a new Task on
every call; on the intake's hot path (the flush loop and the sender's schedule
wake per request) that was a visible share of a single-event request.
"""

from __future__ import annotations

import asyncio

# Seconds: timers fire up to the loop clock's resolution early, and a deadline
# re-armed for less than that fires again at once. What is due this soon is due.
EARLY = 1e-6


class Wakeup:
    """``set()`` wakes the waiter; ``wait(timeout)`` returns early or on time."""

    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[asyncio.Future[None]] = []

    def set(self) -> None:
        self._flag = True
        if self._waiters:  # usually none: the intake sets it on every request
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until set or ``timeout`` seconds; True when set."""
        if self._flag:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        handle = None if timeout is None else loop.call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            if handle is not None:
                handle.cancel()
            if fut in self._waiters:
                self._waiters.remove(fut)
        return self._flag


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
