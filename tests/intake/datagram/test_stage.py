"""The datagram intake stage on real sockets, in process: reading, refusals, backpressure, lifecycle."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import AsyncIterator, Iterator

import orjson
import pytest

from forwarder.buffer.memory import MemoryBuffer
from forwarder.config import BufferConfig, ConfigError, IntakeConfig, from_dict
from forwarder.intake.datagram.stage import DatagramIntake
from forwarder.intake.datagram.sockets import udp_drops
from forwarder.intake.unix_socket import UnixSocketError
from forwarder.buffer.disk.buffer import DiskBuffer
from forwarder.observability import Observer
from forwarder.emulator.harness import free_port, wait_for
from tests import support

REASONS = ("not_json", "truncated", "oversized", "invalid_event", "missing_project", "invalid_project")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
    directory = Path(tempfile.mkdtemp(prefix="dg-", dir="/tmp"))
    yield directory
    for p in directory.iterdir():
        p.unlink()
    directory.rmdir()


def event(i: int, project: str = "p") -> bytes:
    return orjson.dumps({"project": project, "data": orjson.dumps({"i": i}).decode()})


def numbers(taken: list[tuple[str, bytes]]) -> list[int]:
    return [orjson.loads(orjson.loads(e)["data"])["i"] for _, e in taken]


class Stage:
    """A DatagramIntake on a buffer, with what a test needs to look at."""

    def __init__(self, intake: IntakeConfig, buffer: BufferConfig | None = None, default_project: str = "",
                 make_buffer=MemoryBuffer, **kwargs) -> None:
        self.observer = support.observer()
        self.buffer = make_buffer(buffer or BufferConfig(), self.observer)
        self.crashes: list[BaseException] = []
        self.intake = DatagramIntake(intake, default_project, self.buffer, self.observer, **kwargs)
        self.path = intake.datagram_socket

    def sample(self, name: str, **labels: str) -> float:
        return self.observer.metrics.registry.get_sample_value(name, labels) or 0.0

    def rejected(self, reason: str) -> float:
        return self.sample("forwarder_datagram_rejected_total", reason=reason)

    async def take_all(self) -> list[tuple[str, bytes]]:
        """What the buffer holds now, read and acknowledged (the flush loop's and the sender's part)."""
        out = []
        for chunk in await self.buffer.read(0):
            out += [(chunk.project, e) for e in chunk.events]
            await self.buffer.ack(support.receipt(chunk))
        return out

    async def wait_depth(self, n: int) -> None:
        async def there() -> bool:
            return self.buffer.depth >= n
        await wait_for(there, 5, f"{n} events in the buffer")


@pytest.fixture
async def stages() -> AsyncIterator[list[Stage]]:
    started: list[Stage] = []
    yield started
    for s in started:
        await s.intake.close()
        await s.buffer.close()


async def start(stages: list[Stage], intake: IntakeConfig, **kwargs) -> Stage:
    s = Stage(intake, **kwargs)
    stages.append(s)
    if isinstance(s.buffer, DiskBuffer):
        await s.buffer.open()
    await s.intake.start(s.crashes.append)
    return s


def connected(path: str) -> socket.socket:
    """A non-blocking client connected to the intake's socket (what a DogStatsD-style client uses)."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    c.setblocking(False)
    c.connect(path)
    return c


async def send_all(c: socket.socket, datagrams: list[bytes]) -> None:
    """Send each datagram, waiting (on the loop) while the intake's queue is full."""
    loop = asyncio.get_running_loop()
    for data in datagrams:
        await loop.sock_sendall(c, data)


async def test_malformed_datagrams_are_counted_by_reason_and_never_stop_the_reader(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s"), datagram_max_bytes=1024))
    bad = [b"hello", b'{"project": "p", "data": "{\\"a', b'{"project": "p", "data": 5}',
           b'{"data": "{}"}', b'{"project": "no/slash", "data": "{}"}', b"x" * 2000]
    await send_all(connected(s.path), bad + [event(1)])
    await s.wait_depth(1)
    assert numbers(await s.take_all()) == [1]
    assert {r: s.rejected(r) for r in REASONS} == dict.fromkeys(REASONS, 1.0)
    assert s.sample("forwarder_datagrams_received_total") == 7
    assert s.sample("forwarder_events_received_total") == 1
    assert not s.crashes and not s.intake.paused


async def test_ndjson_datagrams_reach_the_buffer_under_each_events_project(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")), default_project="dflt")
    lines = b"\n".join([event(1, "alpha"), orjson.dumps({"data": {"i": 2}}), event(3, "beta"), event(4, "alpha")])
    await send_all(connected(s.path), [lines, event(5)])
    await s.wait_depth(5)
    by_project: dict[str, list[int]] = {}
    for project, e in await s.take_all():
        by_project.setdefault(project, []).append(orjson.loads(orjson.loads(e)["data"])["i"])
    assert by_project == {"alpha": [1, 4], "dflt": [2], "beta": [3], "p": [5]}


async def fill_until_refused(s: Stage, c: socket.socket, reason: str) -> int:
    """Send events 0, 1, 2, ... until the kernel refuses one while the reader is paused for ``reason``."""
    sent = 0
    for _ in range(100_000):  # a bound, far beyond buffer + queue
        try:
            c.send(event(sent))
            sent += 1
        except BlockingIOError:
            if reason in s.intake.paused:
                return sent
            await asyncio.sleep(0)  # the reader's turn
    raise AssertionError(f"the socket never pushed back (paused: {s.intake.paused})")


async def test_a_full_buffer_stops_the_reader_so_senders_get_eagain_and_every_event_taken_is_delivered(stages,
                                                                                                      sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")), buffer=BufferConfig(max_events=30),
                    full_poll=0.005)
    c = connected(s.path)
    sent = await fill_until_refused(s, c, "buffer_full")
    assert s.buffer.depth <= 30 < sent  # the rest wait in the reader and in the kernel's queue
    for _ in range(3):  # paused: nothing is read, however often the loop turns
        await asyncio.sleep(0)
        with pytest.raises(BlockingIOError):
            c.send(event(sent))
    taken: list[tuple[str, bytes]] = []

    async def all_delivered() -> bool:
        taken.extend(await s.take_all())  # the sender acknowledging: room again
        return len(taken) >= sent
    await wait_for(all_delivered, 5, f"{sent} events through the buffer")
    assert numbers(taken) == list(range(sent))
    assert s.sample("forwarder_events_dropped_total", reason="buffer_full") == 0
    assert not s.intake.paused


async def test_with_drop_oldest_every_event_taken_is_delivered_or_counted_as_dropped(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")),
                    buffer=BufferConfig(max_events=30, when_full="drop_oldest"))
    await send_all(connected(s.path), [event(i) for i in range(200)])

    async def all_read() -> bool:
        return s.sample("forwarder_events_received_total") == 200
    await wait_for(all_read, 5, "200 events appended")
    delivered = numbers(await s.take_all())
    dropped = s.sample("forwarder_events_dropped_total", reason="buffer_full")
    assert len(delivered) == 30 and dropped == 170
    assert delivered == list(range(170, 200))  # the oldest went


class SlowBuffer(MemoryBuffer):
    """A memory buffer whose appends wait until the test lets them through (a slow disk)."""

    def __init__(self, config: BufferConfig, observer: Observer) -> None:
        super().__init__(config, observer)
        self.gate = asyncio.Event()
        self.appends = 0

    async def append(self, project: str, events: list[bytes], received_at: float) -> None:
        self.appends += 1
        await self.gate.wait()
        await super().append(project, events, received_at)


async def test_appends_behind_stop_the_reader_at_the_bound_and_every_event_taken_is_delivered(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")), make_buffer=SlowBuffer,
                    max_unread=20)
    c = connected(s.path)
    sent = await fill_until_refused(s, c, "backlog")
    assert s.intake.held >= 20 and s.buffer.depth == 0
    s.buffer.gate.set()
    await s.wait_depth(sent)
    assert numbers(await s.take_all()) == list(range(sent))
    assert s.buffer.appends < sent / 5  # grouped: the datagram path is not one append per datagram


async def test_the_disk_buffer_takes_a_wake_ups_datagrams_in_one_commit(stages, tmp_path):
    port = free_port()
    s = await start(stages, IntakeConfig(datagram_port=port), make_buffer=DiskBuffer,
                    buffer=BufferConfig(type="disk", path=str(tmp_path / "buf")))
    commits = s.buffer.commits
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(300):  # no await in between: all of them wait in the socket for one wake-up
        c.sendto(event(i), ("127.0.0.1", port))
    await s.wait_depth(300)
    assert s.buffer.commits - commits <= 2
    assert sorted(numbers(await s.take_all())) == list(range(300))


async def test_an_append_that_fails_is_tried_again_and_loses_nothing(stages, sock_dir):
    class FlakyBuffer(MemoryBuffer):
        failures = 2

        async def append(self, project: str, events: list[bytes], received_at: float) -> None:
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EIO, "disk I/O error")
            await super().append(project, events, received_at)

    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")), make_buffer=FlakyBuffer,
                    full_poll=0.005)
    await send_all(connected(s.path), [event(i) for i in range(5)])
    await s.wait_depth(5)
    assert numbers(await s.take_all()) == list(range(5))
    assert not s.crashes


async def test_stop_refuses_new_datagrams_and_buffers_what_the_kernel_already_took(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")))
    c = connected(s.path)
    for i in range(5):  # no await: the reader has not run, the five wait in the kernel's queue
        c.send(event(i))
    await s.intake.stop()
    assert numbers(await s.take_all()) == list(range(5))
    with pytest.raises(BrokenPipeError):
        c.send(event(9))
    assert not Path(s.path).exists()
    with pytest.raises(FileNotFoundError):
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(event(9), s.path)


async def test_close_counts_events_it_could_not_append_as_dropped_at_shutdown(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")), buffer=BufferConfig(max_events=3))
    c = connected(s.path)
    await send_all(c, [event(0), event(1), event(2)])
    await s.wait_depth(3)
    await send_all(c, [event(3), event(4)])

    async def full() -> bool:
        return "buffer_full" in s.intake.paused and s.intake.held == 2
    await wait_for(full, 5, "the reader paused on a full buffer")
    await s.intake.close()
    assert s.sample("forwarder_events_dropped_total", reason="shutdown") == 2
    assert s.buffer.depth == 3


async def test_a_group_larger_than_the_whole_buffer_goes_in_as_room_allows(stages):
    port = free_port()
    s = await start(stages, IntakeConfig(datagram_port=port), buffer=BufferConfig(max_events=8), full_poll=0.005)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(50):  # no await: one wake-up reads them all, one group of 50 for an 8-event buffer
        c.sendto(event(i), ("127.0.0.1", port))
    taken: list[tuple[str, bytes]] = []

    async def all_delivered() -> bool:
        taken.extend(await s.take_all())
        return len(taken) >= 50
    await wait_for(all_delivered, 5, "50 events through an 8-event buffer")
    assert numbers(taken) == list(range(50))


async def test_the_socket_file_gets_its_mode_and_is_removed_on_close(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s"), datagram_socket_mode="0620"))
    st = os.stat(s.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    assert sorted(os.listdir(sock_dir)) == ["s"]  # the temporary name is gone
    await s.intake.close()
    assert not Path(s.path).exists()


async def test_a_stale_socket_file_is_replaced(stages, sock_dir):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(sock_dir / "s"))
    stale.close()  # a crashed run's file: nobody receives on it
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")))
    await send_all(connected(s.path), [event(1)])
    await s.wait_depth(1)


async def test_a_socket_another_process_receives_on_is_not_taken_over(stages, sock_dir):
    live = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    live.bind(str(sock_dir / "s"))
    try:
        with pytest.raises(UnixSocketError, match="intake.datagram_socket: .* is in use by another process"):
            await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")))
        live.setblocking(False)
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"still mine", str(sock_dir / "s"))
        assert live.recv(100) == b"still mine"
    finally:
        live.close()


async def test_a_path_that_is_not_a_socket_is_refused(stages, sock_dir):
    (sock_dir / "s").write_text("not a socket")
    with pytest.raises(UnixSocketError, match="exists and is not a socket"):
        await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")))
    assert (sock_dir / "s").read_text() == "not a socket"


async def test_close_leaves_a_socket_file_that_a_newer_instance_put_in_its_place(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")))
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    newer.bind(str(sock_dir / "n"))
    os.rename(sock_dir / "n", s.path)
    try:
        await s.intake.close()
        assert Path(s.path).exists()
    finally:
        newer.close()


async def test_events_arrive_over_loopback_udp(stages):
    port = free_port()
    s = await start(stages, IntakeConfig(datagram_port=port, datagram_host="127.0.0.1"))
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(3):
        c.sendto(event(i), ("127.0.0.1", port))
    await s.wait_depth(3)
    assert numbers(await s.take_all()) == [0, 1, 2]


async def test_udp_datagrams_the_kernel_dropped_are_counted_from_its_own_counter(stages):
    port = free_port()
    s = await start(stages, IntakeConfig(datagram_port=port, datagram_rcvbuf=4096))
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(200):  # no await: the reader cannot run, a 4 KiB buffer overflows
        c.sendto(event(i), ("127.0.0.1", port))

    async def all_accounted() -> bool:
        read = s.sample("forwarder_datagrams_received_total")
        return read > 0 and read + s.sample("forwarder_datagram_kernel_drops_total") == 200
    await wait_for(all_accounted, 5, "every datagram read or counted as dropped by the kernel")
    assert s.sample("forwarder_datagram_kernel_drops_total") > 0


def test_kernel_drops_are_read_for_the_intakes_own_sockets_only(tmp_path):
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n"
    row = "{sl}: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 {inode} 2 0000000000000000 {drops}\n"
    udp = tmp_path / "udp"
    udp.write_text(header + row.format(sl=1, inode=111, drops=7) + row.format(sl=2, inode=222, drops=50))
    udp6 = tmp_path / "udp6"
    udp6.write_text(header + row.format(sl=1, inode=333, drops=5))
    assert udp_drops({111, 333}, (udp, udp6)) == 12
    assert udp_drops({999}, (udp, udp6)) is None
    assert udp_drops({111}, (tmp_path / "missing", udp)) == 7


async def test_a_bug_in_the_reader_is_reported_as_a_crash_and_stops_reading(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")))

    def broken(n: int) -> None:
        raise RuntimeError("bug")
    s.observer.datagrams_received = broken  # type: ignore[method-assign]
    await send_all(connected(s.path), [event(1)])

    async def crashed() -> bool:
        return bool(s.crashes)
    await wait_for(crashed, 5, "the crash reported")
    assert [str(e) for e in s.crashes] == ["bug"] and "crashed" in s.intake.paused


async def test_a_bug_in_decoding_or_appending_crashes_the_appender_task_and_is_reported(stages, sock_dir):
    s = await start(stages, IntakeConfig(datagram_socket=str(sock_dir / "s")))

    def broken(*args):
        raise RuntimeError("bookkeeping bug")  # outside the per-append handling: the task itself is wrong
    s.intake._decoder.decode_all = broken  # type: ignore[method-assign]
    await send_all(connected(s.path), [event(1)])

    async def crashed() -> bool:
        return bool(s.crashes)
    await wait_for(crashed, 5, "the crash reported")
    assert [str(e) for e in s.crashes] == ["bookkeeping bug"]


@pytest.mark.parametrize("intake, message", [
    ({"datagram_port": 8125, "datagram_host": "0.0.0.0"}, "intake.datagram_host must be a loopback address"),
    ({"datagram_port": 8125, "datagram_host": "10.0.0.7"}, "intake.datagram_host must be a loopback address"),
    ({"datagram_port": 8125, "datagram_host": "localhost"}, "intake.datagram_host must be a loopback address"),
    ({"datagram_port": 70000}, "intake.datagram_port must be between 0 and 65535"),
    ({"datagram_socket": "/run/" + "x" * 103}, "intake.datagram_socket must be at most 107 bytes long"),
    ({"datagram_socket_mode": "rw-rw----"}, "intake.datagram_socket_mode must be octal permission bits"),
    ({"datagram_max_bytes": 100}, "intake.datagram_max_bytes must be between 1024 and 1048576"),
])
def test_bad_datagram_settings_are_refused_with_the_key_named(intake, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"intake": intake})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1"])
def test_loopback_addresses_are_accepted_for_udp(host):
    assert from_dict({"intake": {"datagram_port": 8125, "datagram_host": host}}).intake.datagram_host == host


async def test_a_udp_socket_on_ipv6_loopback_takes_events(stages):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback")
    finally:
        probe.close()
    s = await start(stages, IntakeConfig(datagram_port=port, datagram_host="::1"))
    socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(event(1), ("::1", port))
    await s.wait_depth(1)
