"""Signals and the shutdown deadline: what the daemon's run loop waits on.

Handlers only set flags. They stay installed for the daemon's whole life,
through the drain: a second SIGTERM/SIGINT shortens the drain (the shutdown
still runs its phases in order and reports what is left), SIGHUP while
draining is ignored and logged. Without them, a second signal would get the
default action and kill the process mid-drain.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable
from typing import Any, Callable, TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Signals:
    """The daemon's signal flags: stop, hurry (a second stop), reload."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.reload = asyncio.Event()
        self._installed: list[int] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop_requested, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested)
        self._installed = [*STOP_SIGNALS, signal.SIGHUP]

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed = []

    def stop_requested(self, sig: int = signal.SIGTERM) -> None:
        if not self.stop.is_set():
            self.stop.set()
        elif not self.hurry.is_set():
            self.hurry.set()
            self._log.warning("shutdown_hurried", signal=signal.Signals(sig).name,
                              reason="second stop signal: the drain ends now")

    def reload_requested(self) -> None:
        if self.stop.is_set():
            self._log.warning("reload_ignored", reason="shutting down")
            return
        self.reload.set()

    async def next(self) -> str:
        """Wait for a stop or a reload request: "stop" or "reload"."""
        if not self.stop.is_set() and not self.reload.is_set():
            waiters = [asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self.reload.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
        if self.stop.is_set():
            return "stop"
        self.reload.clear()
        return "reload"

    async def unless_stopped(self, work: Awaitable[object]) -> None:
        """Run ``work`` (a reload) to its end, or cancel it when a stop is requested first."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, stop, return_exceptions=True)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]  # the reload handles its own errors: this is a bug


class Deadline:
    """The drain's deadline, which a second stop signal brings forward to now."""

    def __init__(self, seconds: float, hurry: asyncio.Event,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = clock() + seconds
        self._hurry = hurry

    def remaining(self) -> float:
        return 0.0 if self._hurry.is_set() else max(0.0, self._at - self._clock())

    async def within(self, phase: Awaitable[T], default: T) -> T:
        """The phase's result, or ``default`` when the deadline (or a hurry) came first."""
        task = asyncio.ensure_future(phase)
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait([task, hurry], timeout=self.remaining(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return default
