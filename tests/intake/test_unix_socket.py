"""The one Unix-socket binder both intakes use (stream: intake.unix_socket; datagram: intake.datagram_socket)."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from forwarder.intake import unix_socket
from forwarder.config import UNIX_PATH_MAX
from forwarder.intake.unix_socket import UnixSocket, UnixSocketError, bind_unix

KINDS = pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["stream", "datagram"])
KEY = "intake.some_socket"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the socket goes in (pytest's tmp_path can be longer than a socket path may be)."""
    directory = Path(tempfile.mkdtemp(prefix="us-", dir="/tmp"))
    yield directory
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            path = os.path.join(root, name)
            os.unlink(path) if os.path.islink(path) else os.rmdir(path)
    directory.rmdir()


def bind(path: Path, kind: int, mode: int = 0o660) -> UnixSocket:
    bound = bind_unix(str(path), mode, kind, KEY)
    if kind == socket.SOCK_STREAM:
        bound.sock.listen(1)
    return bound


def reachable(path: Path, kind: int, bound: UnixSocket) -> bool:
    """Whether a client reaches ``bound`` through ``path``."""
    with socket.socket(socket.AF_UNIX, kind) as client:
        client.connect(str(path))
        if kind == socket.SOCK_DGRAM:
            client.send(b"x")
            return bound.sock.recv(10) == b"x"
        conn, _ = bound.sock.accept()
        conn.close()
        return True


@KINDS
def test_the_file_has_its_mode_before_it_appears_whatever_the_umask(shared, kind, monkeypatch):
    seen = []
    real_rename = os.rename

    def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        st = os.lstat(src, dir_fd=src_dir_fd)
        seen.append((stat.S_IMODE(st.st_mode), stat.S_IMODE(os.fstat(src_dir_fd).st_mode),
                     sorted(p.name for p in shared.iterdir() if not p.name.startswith(".forwarder-"))))
        real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "rename", rename)
    previous = os.umask(0)  # the most permissive umask: the mode must not come from it
    try:
        bound = bind(shared / "s", kind, 0o640)
    finally:
        os.umask(previous)
    # Created with its mode, inside a directory only its owner enters, renamed into a place nothing held.
    assert seen == [(0o640, 0o700, [])]
    assert stat.S_IMODE(os.lstat(shared / "s").st_mode) == 0o640
    assert sorted(p.name for p in shared.iterdir()) == ["s"]  # no temporary name left in the shared directory
    assert reachable(shared / "s", kind, bound)
    bound.sock.close()


@KINDS
def test_binding_changes_no_mode_by_path_so_a_planted_symlink_leads_nowhere(shared, kind, monkeypatch):
    def chmod(*args, **kwargs):
        raise AssertionError(f"chmod{args}: a chmod by path follows a symlink planted in a race")

    victim = shared / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    monkeypatch.setattr(os, "chmod", chmod)
    (shared / "s.new").symlink_to(victim)  # where the datagram binder used to bind and chmod
    bound = bind(shared / "s", kind, 0o666)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(shared / "s").st_mode) == 0o666
    bound.sock.close()


def test_the_process_umask_is_restored(shared):
    previous = os.umask(0o027)
    try:
        bind(shared / "s", socket.SOCK_DGRAM, 0o600).sock.close()
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)


@KINDS
def test_a_stale_socket_file_is_replaced_and_a_live_one_is_left_alone(shared, kind):
    with socket.socket(socket.AF_UNIX, kind) as crashed:
        crashed.bind(str(shared / "s"))  # closed without unlinking: what a kill -9 leaves
    bound = bind(shared / "s", kind)
    assert reachable(shared / "s", kind, bound)
    with pytest.raises(UnixSocketError, match=f"{KEY}: .* is in use by another process"):
        bind(shared / "s", kind)
    assert reachable(shared / "s", kind, bound)  # still the first one's
    bound.sock.close()


def test_a_live_socket_of_the_other_kind_is_named_and_left_alone(shared):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(shared / "s"))
        listener.listen(1)
        with pytest.raises(UnixSocketError, match=f"{KEY}: .* is a stream socket in use by another process"):
            bind(shared / "s", socket.SOCK_DGRAM)
        assert stat.S_ISSOCK(os.lstat(shared / "s").st_mode)


@KINDS
def test_a_path_that_is_not_a_socket_is_refused_and_kept(shared, kind):
    (shared / "s").write_text("keep me")
    with pytest.raises(UnixSocketError, match=f"{KEY}: .* exists and is not a socket"):
        bind(shared / "s", kind)
    assert (shared / "s").read_text() == "keep me"
    assert sorted(p.name for p in shared.iterdir()) == ["s"]


@KINDS
def test_a_stale_file_that_changed_before_the_rename_is_not_replaced(shared, kind, monkeypatch):
    with socket.socket(socket.AF_UNIX, kind) as crashed:
        crashed.bind(str(shared / "s"))
    other = socket.socket(socket.AF_UNIX, kind)
    real = unix_socket._private_directory

    def meanwhile(parent, directory, key):  # another instance takes the path after the probe
        other.bind(str(shared / "n"))  # a new file (a new inode), then moved over the stale one
        os.rename(shared / "n", shared / "s")
        if kind == socket.SOCK_STREAM:
            other.listen(1)
        return real(parent, directory, key)

    monkeypatch.setattr(unix_socket, "_private_directory", meanwhile)
    try:
        with pytest.raises(UnixSocketError, match=f"{KEY}: .* appeared or changed while binding"):
            bind(shared / "s", kind)
        assert reachable(shared / "s", kind, UnixSocket(other, str(shared / "s"), (0, 0)))  # still the other's
        assert sorted(p.name for p in shared.iterdir()) == ["s"]  # the private directory is gone
    finally:
        other.close()


@KINDS
def test_remove_deletes_only_the_file_this_socket_created_comparing_device_and_inode(shared, kind):
    bound = bind(shared / "s", kind)
    st = os.lstat(shared / "s")
    same_inode_other_device = UnixSocket(bound.sock, str(shared / "s"), (st.st_dev + 1, st.st_ino))
    same_inode_other_device.remove()
    assert (shared / "s").exists()
    bound.remove()
    assert not (shared / "s").exists()
    bound.remove()  # already gone: nothing to do
    bound.sock.close()


@KINDS
def test_a_path_of_the_longest_length_a_socket_takes_binds(shared, kind):
    # The temporary name costs no bytes: a path of exactly UNIX_PATH_MAX bytes works.
    deep = shared / ("d" * (UNIX_PATH_MAX - len(str(shared)) - 4))
    deep.mkdir()
    path = deep / "s"
    path = Path(str(path) + "x" * (UNIX_PATH_MAX - len(os.fsencode(str(path)))))
    assert len(os.fsencode(str(path))) == UNIX_PATH_MAX
    bound = bind(path, kind)
    assert reachable(path, kind, bound)
    bound.sock.close()
    bound.remove()


@KINDS
def test_a_path_too_long_for_a_socket_names_the_key_and_the_limit(shared, kind):
    path = shared / ("x" * (UNIX_PATH_MAX + 1 - len(str(shared)) - 1))
    with pytest.raises(UnixSocketError, match=f"{KEY}: .* is {UNIX_PATH_MAX + 1} bytes long; a socket path holds "
                                              f"at most {UNIX_PATH_MAX}"):
        bind(path, kind)


def test_a_missing_directory_is_named(shared):
    with pytest.raises(UnixSocketError, match=f"{KEY}: directory {shared}/absent does not exist"):
        bind(shared / "absent" / "s", socket.SOCK_DGRAM)
