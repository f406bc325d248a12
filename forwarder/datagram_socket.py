"""The datagram intake's sockets: a Unix datagram socket file, a loopback UDP port.

The socket file appears with its mode already set (bound under a temporary
name, chmod, renamed into place), replaces a stale file from a crashed run but
never a socket another process still receives on, and is removed on exit only
if it is still ours. UDP drops are read from the kernel's own counter.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

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
