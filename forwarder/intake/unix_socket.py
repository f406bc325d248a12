"""Binding a Unix socket file safely, for both intakes (stream: listeners.py; datagram: datagram/sockets.py).

The guarantees, each against someone else who can write to the socket's
directory (a group-writable /run/forwarder, a sticky /tmp):

* The file appears at its path already with its mode: the socket is bound with
  a umask that leaves exactly ``mode``, inside a fresh directory only this
  process's user can enter, then renamed into place (atomic, and it replaces a
  stale file from a crashed run in one step). No chmod: a chmod by path could
  follow a symlink planted in a race, and fchmod on a socket does not reach its
  file.
* Every step after the directory exists goes through descriptors of the two
  directories, never through their names again, so renaming them away in the
  meantime changes nothing. Binding goes through ``/proc/self/fd``, which also
  means the temporary name costs no bytes of the 108 that sun_path holds.
* An existing file is replaced only if it is a socket nobody uses (a probe with
  the same socket type is refused), and only if it is still that same file
  (st_dev and st_ino) just before the rename; on close the file is removed
  only if it is still the one this process created.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
from dataclasses import dataclass

from forwarder.config import UNIX_PATH_MAX

_PROC_FD = "/proc/self/fd"
_TEMP = "s"  # the socket's name inside the private directory

_KINDS = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram"}


class UnixSocketError(OSError):
    """A socket file cannot be bound; the message names the configuration key and what to fix."""


@dataclass(frozen=True)
class UnixSocket:
    """A bound Unix socket and the identity of its file, so that ``remove`` deletes only ours."""

    sock: socket.socket
    path: str
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file

    def is_ours(self) -> bool:
        """Whether the file at ``path`` is still the one this socket created."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def remove(self) -> None:
        """Unlink the socket file if it is still ours (a newer instance may have replaced it)."""
        if self.is_ours():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def bind_unix(path: str, mode: int, kind: int, key: str) -> UnixSocket:
    """A non-blocking Unix socket of ``kind`` bound at ``path``, whose file has ``mode`` from its first instant.

    ``key`` names the configuration key in every error. A stream socket still
    needs ``listen()``.
    """
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UnixSocketError(f"{key}: {path} is {len(os.fsencode(path))} bytes long; a socket path holds at most "
                              f"{UNIX_PATH_MAX}")
    try:
        parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnixSocketError(f"{key}: directory {directory} does not exist") from None
    except OSError as e:
        raise UnixSocketError(f"{key}: cannot open directory {directory}: {e.strerror}") from None
    try:
        stale = _stale_identity(parent, name, path, kind, key)
        private_name, private = _private_directory(parent, directory, key)
        try:
            sock, identity = _bind_inside(private, private_name, directory, mode, kind, key)
            try:
                _replace(parent, private, name, path, stale, key)
            except BaseException:
                sock.close()
                raise
        finally:
            _remove_private(parent, private, private_name)
    finally:
        os.close(parent)
    return UnixSocket(sock, path, identity)


def _stale_identity(parent: int, name: str, path: str, kind: int, key: str) -> tuple[int, int] | None:
    """None when nothing is at ``path``; the identity of a socket file nobody uses; else an error."""
    try:
        st = os.lstat(name, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UnixSocketError(f"{key}: cannot inspect {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UnixSocketError(f"{key}: {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return (st.st_dev, st.st_ino)  # stale: nobody receives on it, the rename replaces it
    except BlockingIOError:
        pass  # a stream listener with a full backlog: alive
    except OSError as e:
        if e.errno == errno.EPROTOTYPE:
            other = "datagram" if kind == socket.SOCK_STREAM else "stream"
            raise UnixSocketError(f"{key}: {path} is a {other} socket in use by another process; "
                                  "choose another path") from None
        raise UnixSocketError(f"{key}: cannot check whether {path} is in use: {e.strerror}") from None
    finally:
        probe.close()
    raise UnixSocketError(f"{key}: {path} is in use by another process (another forwarder running?)")


def _private_directory(parent: int, directory: str, key: str) -> tuple[str, int]:
    """A new 0700 directory beside the socket's path, opened: (its name, its descriptor)."""
    for _ in range(100):
        private_name = f".forwarder-{secrets.token_hex(4)}"
        try:
            os.mkdir(private_name, 0o700, dir_fd=parent)
        except FileExistsError:
            continue
        except OSError as e:
            raise UnixSocketError(f"{key}: cannot create a socket in {directory}: {e.strerror}") from None
        break
    else:
        raise UnixSocketError(f"{key}: cannot create a private directory in {directory}")
    try:
        private = os.open(private_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError as e:  # replaced by a symlink between mkdir and open
        raise UnixSocketError(f"{key}: the private directory in {directory} changed while binding: "
                              f"{e.strerror}") from None
    st = os.fstat(private)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:  # someone else's, swapped in a race
        os.close(private)
        raise UnixSocketError(f"{key}: the private directory in {directory} changed while binding")
    return private_name, private


def _bind_inside(private: int, private_name: str, directory: str, mode: int, kind: int,
                 key: str) -> tuple[socket.socket, tuple[int, int]]:
    """A socket bound as ``_TEMP`` in the private directory with ``mode``, and its file's identity."""
    via_proc = f"{_PROC_FD}/{private}/{_TEMP}"
    address = via_proc if os.path.isdir(f"{_PROC_FD}/{private}") else os.path.join(directory, private_name, _TEMP)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.setblocking(False)
        # The file is created 0777 & ~umask: this umask gives exactly ``mode``.
        # (Process-wide for an instant: a file another thread creates meanwhile
        # gets fewer permissions, never more.)
        previous = os.umask(0o777 & ~mode)
        try:
            sock.bind(address)
        finally:
            os.umask(previous)
        st = os.lstat(_TEMP, dir_fd=private)
    except OSError as e:
        sock.close()
        raise UnixSocketError(f"{key}: cannot bind a socket in {directory}: {e.strerror or e}") from None
    return sock, (st.st_dev, st.st_ino)


def _replace(parent: int, private: int, name: str, path: str, stale: tuple[int, int] | None, key: str) -> None:
    """Rename the bound socket onto ``name``, replacing only the stale file judged before (if any)."""
    try:
        st = os.lstat(name, dir_fd=parent)
        now = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        now = None
    if now is not None and now != stale:
        raise UnixSocketError(f"{key}: {path} appeared or changed while binding (another process starting?)")
    try:
        os.rename(_TEMP, name, src_dir_fd=private, dst_dir_fd=parent)
    except OSError as e:
        raise UnixSocketError(f"{key}: cannot put the socket at {path}: {e.strerror}") from None


def _remove_private(parent: int, private: int, private_name: str) -> None:
    try:
        os.unlink(_TEMP, dir_fd=private)  # still there only if the rename did not happen
    except FileNotFoundError:
        pass
    finally:
        os.close(private)
    try:
        os.rmdir(private_name, dir_fd=parent)
    except OSError:
        pass  # renamed away by someone who can write the directory: what is left is theirs to remove
