"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

``Type=notify`` units learn from ``READY=1`` that the intake listens and from
``STOPPING=1`` that the drain has begun. Outside systemd this does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` to the service manager; False when there is none or it failed."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False
