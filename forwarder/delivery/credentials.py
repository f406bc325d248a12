"""The sender's AWS identity: whether credentials can be found (the region: ``forwarder/region.py``).

Credentials come from botocore's standard chain; when none are found at start-up the forwarder says so at once and looks
again with a growing interval (instance metadata and web identity tokens can
appear late), so delivery resumes without a restart.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

# Seconds between two credential lookups while none are found: 1, 2, 4 ... capped.
FIRST_LOOKUP_INTERVAL = 1.0
MAX_LOOKUP_INTERVAL = 30.0
HOW_TO_PROVIDE = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials, "
                  "or run with an instance profile, IRSA (AWS_WEB_IDENTITY_TOKEN_FILE) or a container role")


class CredentialsWatch:
    """Looks for credentials until some are found, with a growing interval; reports each change."""

    def __init__(self, lookup: Callable[[], Awaitable[str | None]], on_missing: Callable[[str], None],
                 on_found: Callable[[str], Awaitable[None]], sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._lookup = lookup  # the method of the credentials found (e.g. "env", "iam-role"), None if none
        self._on_missing = on_missing
        self._on_found = on_found
        self._sleep = sleep
        self.method: str | None = None  # how the credentials in use were found; None while none are

    async def check(self) -> bool:
        """One lookup at start-up; False (and reported) when none are found."""
        self.method = await self._lookup()
        if self.method is None:
            self._on_missing(HOW_TO_PROVIDE)
            return False
        return True

    async def watch(self) -> None:
        """Look again until credentials are found (a task: its owner cancels it at shutdown)."""
        interval = FIRST_LOOKUP_INTERVAL
        while self.method is None:
            await self._sleep(interval)
            self.method = await self._lookup()
            interval = min(MAX_LOOKUP_INTERVAL, interval * 2)
            if self.method is None:
                self._on_missing(HOW_TO_PROVIDE)  # rate-limited by the observer: once a minute
        await self._on_found(self.method)
