"""The datagram intake's sockets: a Unix datagram socket file, a loopback UDP port.

The socket file is bound by the intake's one binder (forwarder/intake/unix_socket.py):
it appears with its mode already set, replaces a stale file from a crashed run
but never a socket another process still receives on, and is removed on exit
only if it is still ours. UDP drops are read from the kernel's own counter.
``Sockets`` holds the intake's open sockets and stops the loop's reading of
them while any reason to pause stands.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from forwarder.config import IntakeConfig
from forwarder.intake.unix_socket import UnixSocket, bind_unix

PROC_UDP = (Path("/proc/net/udp"), Path("/proc/net/udp6"))


class SocketError(OSError):
    """A UDP socket cannot be opened; the message names the key and what to fix.

    A socket file that cannot be bound raises unix_socket.UnixSocketError.

    An OSError, so that ``forwarder run`` reports it as it reports a port in use.
    """


@dataclass
class Bound:
    """One open datagram socket and what identifies it."""

    sock: socket.socket
    kind: str  # "unix" or "udp"
    address: str  # the path, or host:port
    inode: int  # the UDP socket's inode, as /proc/net/udp lists it (0 for unix)
    file: UnixSocket | None = None  # the socket file (unix): removed only while still ours


def bind_unix_datagram(path: str, mode: int, key: str = "intake.datagram_socket") -> Bound:
    """A non-blocking Unix datagram socket at ``path``, whose file has ``mode`` from the moment it exists."""
    unix = bind_unix(path, mode, socket.SOCK_DGRAM, key)
    return Bound(unix.sock, "unix", path, 0, unix)


def bind_udp(host: str, port: int, rcvbuf: int, key: str = "intake.datagram_port") -> Bound:
    """A non-blocking UDP socket on a loopback ``host``:``port`` asking for ``rcvbuf`` bytes of receive buffer."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SocketError(f"{key}: cannot bind UDP {host}:{port}: {e.strerror or e}") from None
    bound_port = sock.getsockname()[1]
    return Bound(sock, "udp", f"{host}:{bound_port}", os.fstat(sock.fileno()).st_ino)


def receive_buffer(sock: socket.socket) -> int:
    """The receive buffer the kernel granted, in bytes (Linux reports twice the usable size)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def remove_unix(bound: Bound) -> None:
    """Remove the socket file if it is still ours (a newer instance may have replaced it)."""
    if bound.file is not None:
        bound.file.remove()


def udp_drops(inodes: set[int], tables: tuple[Path, ...] = PROC_UDP) -> int | None:
    """Datagrams the kernel dropped for the UDP sockets ``inodes`` (the ``drops`` column); None if unknown."""
    total, found = 0, False
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 13 and int(fields[9]) in inodes:
                total += int(fields[-1])
                found = True
    return total if found else None


class Sockets:
    """The intake's sockets: opened, read while no reason to pause stands, closed."""

    def __init__(self, config: IntakeConfig, readable: Callable[[Bound], None], log: Any) -> None:
        self.bound: list[Bound] = []
        self.paused: set[str] = set()  # why the sockets are not read; empty: reading
        self._config = config
        self._size = config.datagram_max_bytes + 1  # one byte more: an oversized datagram shows
        self._readable = readable  # what the loop calls when a socket has datagrams
        self._log = log
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        """Bind the configured sockets and start reading them."""
        self._loop = asyncio.get_running_loop()
        c = self._config
        if c.datagram_socket:
            self.bound.append(bind_unix_datagram(c.datagram_socket, int(c.datagram_socket_mode, 8)))
        if c.datagram_port:
            self.bound.append(bind_udp(c.datagram_host, c.datagram_port, c.datagram_rcvbuf))
        for bound in self.bound:
            self._loop.add_reader(bound.sock.fileno(), self._readable, bound)
            self._log.info("datagram_listening", kind=bound.kind, address=bound.address,
                           rcvbuf=receive_buffer(bound.sock))

    def receive(self, bound: Bound, limit: int, into: list[bytes]) -> None:
        """Read up to ``limit`` datagrams from ``bound`` onto ``into``, until it has no more."""
        recv, size = bound.sock.recv, self._size
        add = into.append
        try:
            for _ in range(limit):
                add(recv(size))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:  # e.g. a UDP socket's ICMP error: the socket stays usable
            self._log.warning("datagram_receive_failed", address=bound.address, error=str(e))

    def pause(self, reason: str) -> None:
        """Stop reading until ``reason`` is dropped (several reasons may stand at once)."""
        if not self.paused and self._loop is not None:
            for bound in self.bound:
                self._loop.remove_reader(bound.sock.fileno())
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        """Drop one reason to pause; reading goes on once none is left."""
        if reason not in self.paused:
            return
        self.paused.discard(reason)
        if not self.paused and self._loop is not None:
            for bound in self.bound:
                self._loop.add_reader(bound.sock.fileno(), self._readable, bound)

    def refuse_senders(self) -> None:
        """Unix senders get EPIPE from now on (no path: ENOENT); what is queued stays readable."""
        for bound in self.bound:
            if bound.kind == "unix":
                bound.sock.shutdown(socket.SHUT_RD)
                remove_unix(bound)

    def close(self) -> None:
        """Close the sockets and remove the socket files still ours (idempotent)."""
        bound, self.bound = self.bound, []
        for b in bound:
            if self._loop is not None and not self.paused:
                self._loop.remove_reader(b.sock.fileno())
            b.sock.close()
            if b.kind == "unix":
                remove_unix(b)

    def kernel_drops(self) -> int | None:
        """UDP datagrams the kernel dropped for a full socket buffer (None without a UDP socket)."""
        inodes = {b.inode for b in self.bound if b.kind == "udp"}
        return udp_drops(inodes) if inodes else None
