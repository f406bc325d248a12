"""Reading the files the daemon is pointed at, bounded in size and, off the event loop, in time.

The configuration, the token or credentials file and the TLS pair are read at
start and again on every reload. A reload must never freeze the daemon: a FIFO
at one of those paths would block ``open()`` until a writer came, and a
multi-gigabyte file would be read whole. So ``read_bounded`` refuses anything
but a regular file (opened non-blocking, checked with fstat) and anything over
its limit, and ``OffLoop`` runs the reading in a thread of its own under a time
limit, one read at a time, so that a file system that stops answering costs one
parked thread and a ``reload_failed``, not the intake.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from typing import Callable, TypeVar

T = TypeVar("T")

MiB = 1 << 20
READ_TIMEOUT = 5.0  # seconds a reload waits for one file's reading (and parsing) before giving up on it


class FileRefused(OSError):
    """The path is not a regular file, or the file is over its limit; the message says which."""


def read_bounded(path: str | os.PathLike[str], limit: int, *, regular_only: bool = True) -> bytes:
    """The file's bytes; raises OSError (FileRefused when it is not a regular file or is over ``limit`` bytes).

    ``regular_only=False`` also reads a pipe or a device (``--config <(...)`` at
    start), still no more than ``limit`` bytes; a reload never does.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | (os.O_NONBLOCK if regular_only else 0)
    fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO with no writer returns at once
    try:
        st = os.fstat(fd)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a directory, not a file", str(path))
        if regular_only and not stat.S_ISREG(mode):
            raise FileRefused(f"is not a regular file but {_kind(mode)}; point the key at a plain file")
        if stat.S_ISREG(mode) and st.st_size > limit:
            raise FileRefused(f"is larger than {_size(limit)} ({st.st_size} bytes)")
        chunks, total = [], 0
        while total <= limit:  # the file may grow between fstat and read: read one byte past the limit at most
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise FileRefused(f"is larger than {_size(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


class ReadTimeout(TimeoutError):
    """The file's reading did not finish within the time limit; the message names it."""


class OffLoop:
    """Blocking file work (read, parse) in a thread, under a time limit, one at a time.

    A thread is started per call, as a daemon thread: one stuck in a file system
    that never answers is abandoned, never joined, so it cannot hold up the
    daemon's exit either. While it is stuck, further calls are refused at once
    instead of parking a thread each.
    """

    def __init__(self, what: str, timeout: float = READ_TIMEOUT) -> None:
        self._what = what
        self._timeout = timeout
        self._busy: asyncio.Future[object] | None = None

    async def run(self, work: Callable[[], T]) -> T:
        """``work()``'s result or exception; ReadTimeout after ``timeout`` seconds."""
        if self._busy is not None and not self._busy.done():
            raise ReadTimeout(f"{self._what}: the previous reading has not finished yet (the file system "
                              "does not answer); nothing was re-read")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._busy = done  # type: ignore[assignment]
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when abandoned

        def settle(result: object, error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(result)  # type: ignore[arg-type]
            else:
                done.set_exception(error)

        def thread() -> None:
            result: object = None
            error: BaseException | None = None
            try:
                result = work()
            except BaseException as e:  # handed to the waiting coroutine, raised there
                error = e
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop closed while this thread was stuck: nobody waits any more
                pass

        threading.Thread(target=thread, name=f"forwarder-read {self._what}", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(done), self._timeout)
        except TimeoutError:
            raise ReadTimeout(f"{self._what}: reading did not finish within {self._timeout:g} s (a file system "
                              "that does not answer?); nothing was re-read") from None
