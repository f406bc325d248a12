"""The datagram intake's sockets: a Unix datagram socket file, a loopback UDP port.

The socket file appears with its mode already set (bound under a temporary
name, chmod, renamed into place), replaces a stale file from a crashed run but
never a socket another process still receives on, and is removed on exit only
if it is still ours. UDP drops are read from the kernel's own counter.
``Sockets`` holds the intake's open sockets and stops the loop's reading of
them while any reason to pause stands.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from forwarder.config import IntakeConfig

TEMP_SUFFIX = ".new"  # config.py allows 103 bytes of path so that this fits in sun_path
PROC_UDP = (Path("/proc/net/udp"), Path("/proc/net/udp6"))


class SocketError(OSError):
    """A datagram socket cannot be opened; the message names the key and what to fix.

    An OSError, so that ``forwarder run`` reports it as it reports a port in use.
    """


@dataclass
class Bound:
    """One open datagram socket and what identifies it."""

    sock: socket.socket
    kind: str  # "unix" or "udp"
    address: str  # the path, or host:port
    inode: int  # the socket file's inode (unix) or the socket's own (udp, as /proc/net/udp lists it)


def bind_unix(path: str, mode: int, key: str = "intake.datagram_socket") -> Bound:
    """A non-blocking Unix datagram socket at ``path``, whose file has ``mode`` from the moment it exists."""
    _refuse_live(path, key)
    temp = path + TEMP_SUFFIX
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        _unlink_stale(temp)
        sock.bind(temp)
        os.chmod(temp, mode)
        os.rename(temp, path)  # atomic: replaces a stale file, never shows the wrong mode
        return Bound(sock, "unix", path, os.stat(path).st_ino)
    except OSError as e:
        sock.close()
        _unlink_stale(temp)
        raise SocketError(f"{key}: cannot bind {path}: {e.strerror or e}") from None


def _refuse_live(path: str, key: str) -> None:
    """Fail unless ``path`` is absent or a socket file nobody receives on (left by a crashed run)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise SocketError(f"{key}: cannot inspect {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{key}: {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return  # stale: the rename replaces it
    except OSError as e:
        if e.errno == errno.EPROTOTYPE:
            raise SocketError(f"{key}: {path} is a stream socket in use (another listener?)") from None
        raise SocketError(f"{key}: cannot probe {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise SocketError(f"{key}: another process receives on {path}; stop it or choose another path")


def _unlink_stale(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
    try:
        if os.stat(bound.address).st_ino == bound.inode:
            os.unlink(bound.address)
    except FileNotFoundError:
        pass


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
            self.bound.append(bind_unix(c.datagram_socket, int(c.datagram_socket_mode, 8)))
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
