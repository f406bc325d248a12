"""The sender's AWS identity: which region, and whether credentials can be found.

The region resolves as the AWS SDKs resolve it when the configuration does not
name one: ``AWS_REGION`` (what EKS injects), ``AWS_DEFAULT_REGION``, the
profile's ``region`` in the shared config file, else us-east-1; and the
forwarder says where it came from. Credentials come from botocore's standard
chain; when none are found at start-up the forwarder says so at once and looks
again with a growing interval (instance metadata and web identity tokens can
appear late), so delivery resumes without a restart.
"""

from __future__ import annotations

import asyncio
import configparser
import os
from typing import Awaitable, Callable, Mapping

DEFAULT_REGION = "us-east-1"
# Seconds between two credential lookups while none are found: 1, 2, 4 ... capped.
FIRST_LOOKUP_INTERVAL = 1.0
MAX_LOOKUP_INTERVAL = 30.0
HOW_TO_PROVIDE = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials, "
                  "or run with an instance profile, IRSA (AWS_WEB_IDENTITY_TOKEN_FILE) or a container role")


def resolve_region(environ: Mapping[str, str]) -> tuple[str, str]:
    """(region, where it came from) when the configuration names none, as the AWS SDKs resolve it."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if environ.get(var):
            return environ[var], var
    profile = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"
    path = environ.get("AWS_CONFIG_FILE") or os.path.join(environ.get("HOME") or os.path.expanduser("~"),
                                                          ".aws", "config")
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError, OSError):
        parser = configparser.RawConfigParser()  # an unreadable file names no region; botocore will say more
    for section in ((profile, f"profile {profile}") if profile == "default" else (f"profile {profile}",)):
        if parser.has_option(section, "region") and parser.get(section, "region").strip():
            return parser.get(section, "region").strip(), f"profile {profile} ({path})"
    return DEFAULT_REGION, "default"


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
