"""Background tasks with an owner: a crash is reported, never left in a task nobody awaits."""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

T = TypeVar("T")


def supervise(task: asyncio.Task[T], on_crash: Callable[[BaseException], None]) -> asyncio.Task[T]:
    """Call ``on_crash(exception)`` when ``task`` ends by raising; returns ``task``.

    A task that returns or is cancelled did not crash: cancelling is how its
    owner stops it. ``on_crash`` runs as a done-callback, on the loop.
    """

    def done(finished: asyncio.Task[T]) -> None:
        if finished.cancelled():
            return
        exc = finished.exception()
        if exc is not None:
            on_crash(exc)

    task.add_done_callback(done)
    return task
