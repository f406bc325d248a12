"""``forwarder healthcheck``: probe the listener a configuration actually has, from the same host.

For a container's HEALTHCHECK and scripts: ``/healthz`` on the TCP intake when
there is one (HTTPS when ``intake.tls_cert_file`` is set; a wildcard host is
probed on loopback), else on the Unix socket (``intake.unix_socket``; the
configuration guarantees one of the two). The metrics-only port
(``metrics.port``) serves ``/metrics`` alone and is not probed. Exit 0 when
``/healthz`` answers 200, 1 with one line saying what failed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from dataclasses import dataclass

import aiohttp

from forwarder.config import Config

TIMEOUT = 3.0  # seconds for the probe, connecting included


@dataclass(frozen=True)
class Listener:
    """Where this host reaches the daemon: ``base`` URL, and ``unix_socket`` when the URL goes through one."""

    base: str
    unix_socket: str | None = None

    @property
    def intake(self) -> str:
        """The address ``forwarder replay --intake`` takes for this listener."""
        return f"unix://{self.unix_socket}" if self.unix_socket else self.base


def local_host(host: str) -> str:
    """The address to reach a listener bound to ``host`` from this machine (a wildcard means loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host  # a name


def intake_listener(config: Config) -> Listener:
    """The intake's TCP listener, else its Unix socket (intake.port = -1 requires one)."""
    intake = config.intake
    if intake.port != -1:
        scheme = "https" if intake.tls_cert_file else "http"
        return Listener(f"{scheme}://{local_host(intake.host)}:{intake.port}")
    return Listener("http://localhost", intake.unix_socket)


async def probe(config: Config, timeout: float = TIMEOUT) -> str | None:
    """None when the daemon answers 200 on /healthz; otherwise what went wrong, in one line."""
    listener, path = intake_listener(config), "/healthz"
    where = f"{listener.unix_socket or listener.base}{path}"
    if listener.unix_socket:
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=listener.unix_socket)
    else:
        # A liveness probe of this host's own listener: the certificate names the service, not 127.0.0.1.
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        connector = aiohttp.TCPConnector(ssl=unverified)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(f"{listener.base}{path}") as resp:
                if resp.status == 200:
                    return None
                return f"{where} answered {resp.status}: {(await resp.text())[:200]}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return f"{where}: {e or type(e).__name__}"
