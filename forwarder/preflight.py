"""What ``check-config`` checks beyond the values: every file the configuration names can be used.

The credentials and token files are parsed as the intake will parse them, the
TLS pair is loaded as the listener will load it, and the directories the
forwarder writes to (buffer, dead letters, sockets) must exist or be creatable,
and be writable. Each problem names its key. Nothing is created or changed.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry

from forwarder.config import Config
from forwarder.intake.auth import CredentialsError, make_authenticator
from forwarder.intake.listeners import ListenerError, TlsCertificates
from forwarder.observability import Metrics, Observer


class _Quiet:
    """A logger that keeps check-config's output to its own lines."""

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: None


def problems(config: Config) -> list[str]:
    """What would keep the daemon from starting or from writing, one sentence per problem, naming its key."""
    found: list[str] = []
    intake = config.intake
    if intake.auth != "none":
        try:
            make_authenticator(intake, config.evidently.region,
                               Observer(Metrics(CollectorRegistry(), process_collectors=False), _Quiet()))
        except CredentialsError as e:
            found.append(str(e))
    if intake.tls_cert_file:
        try:
            TlsCertificates(intake.tls_cert_file, intake.tls_key_file)
        except ListenerError as e:
            found.append(str(e))
    directories = [("dead_letter.path", os.path.dirname(os.path.abspath(config.dead_letter.path)))]
    if config.buffer.type == "disk":
        directories.append(("buffer.path", os.path.abspath(config.buffer.path)))
    for key in ("unix_socket", "datagram_socket"):
        path = getattr(intake, key)
        if path:
            directories.append((f"intake.{key}", os.path.dirname(os.path.abspath(path))))
    found.extend(p for key, directory in directories if (p := _writable(key, directory)) is not None)
    return found


def _writable(key: str, directory: str) -> str | None:
    """None when ``directory`` is writable, or can be created under a writable parent."""
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{key}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "directory" if existing == directory else f"directory {directory} would be created in"
        return f"{key}: {what} {existing} is not writable by this user"
    return None
