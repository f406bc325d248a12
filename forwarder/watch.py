"""Noticing that files changed on disk: certificates, CA bundles, credentials and token files.

cert-manager, the kubelet and deploy scripts replace these files while the
daemon runs; a renewed certificate must be in use before the old one expires,
without anyone sending SIGHUP. A mounted Kubernetes Secret changes by an atomic
swap of its ``..data`` symlink, so the file's own path never changes: what does
is the identity of the file it resolves to. Each path is polled (``os.stat``
follows symlinks) every ``interval`` seconds and compared on device, inode,
modification time and size; no inotify, which misses the swap of a symlink in
a parent directory anyway.

The watch only notices and, once per poll that found changes, awaits the
callback with the paths that changed; what to re-read, and keeping the old on
failure, is the callback's job (the same walk as SIGHUP: app.py,
``Forwarder.reload_files``, which re-reads every stage's files).
"""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable, Iterable

from forwarder.tasks import supervise

INTERVAL = 1.0  # seconds between two looks at the files

Identity = tuple[int, int, int, int] | None  # (st_dev, st_ino, st_mtime_ns, st_size); None: cannot be read


def identity(path: str) -> Identity:
    """What distinguishes one version of the file ``path`` resolves to from the next."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class FileWatch:
    """Polls named files and awaits ``on_change(paths)`` with those whose identity changed since the last look."""

    def __init__(self, paths: Iterable[str], on_change: Callable[[list[str]], Awaitable[None]],
                 interval: float = INTERVAL,
                 wait: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._on_change = on_change
        self._interval = interval
        self._wait = wait
        self._seen = {path: identity(path) for path in dict.fromkeys(paths)}
        self._task: asyncio.Task[None] | None = None

    @property
    def paths(self) -> list[str]:
        return list(self._seen)

    def poll(self) -> list[str]:
        """Look at every file once; the paths whose identity changed since the last look."""
        changed = []
        for path, before in self._seen.items():
            now = identity(path)
            if now != before:
                self._seen[path] = now
                changed.append(path)
        return changed

    def start(self, on_crash: Callable[[BaseException], None]) -> None:
        """Poll every interval until close(); a crash of the loop is handed to ``on_crash``."""
        if not self._seen or self._task is not None:
            return
        self._task = supervise(asyncio.get_running_loop().create_task(self._poll_forever()), on_crash)

    async def _poll_forever(self) -> None:
        while True:
            await self._wait(self._interval)
            changed = self.poll()
            if changed:
                await self._on_change(changed)

    async def close(self) -> None:
        """Stop polling (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
