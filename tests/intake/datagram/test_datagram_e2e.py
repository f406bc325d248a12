"""The datagram intake inside the daemon: in process against the in-process emulator, and as real processes."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Iterator

import orjson
import pytest
from prometheus_client import CollectorRegistry

from forwarder.app import Forwarder
from forwarder.config import from_dict
from forwarder.intake.unix_socket import UnixSocketError
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, free_port, wait_for


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="dg-", dir="/tmp"))  # sun_path: 108 bytes at most
    yield directory
    for p in directory.iterdir():
        p.unlink()
    directory.rmdir()


def config(tmp_path: Path, emulator_url: str, **intake):
    return from_dict({
        "intake": {"port": 0, **intake},
        "batch": {"flush_interval": 0.05},
        "evidently": {"endpoint_url": emulator_url, "default_project": "dflt"},
        "dead_letter": {"path": str(tmp_path / "dl.ndjson")},
        "shutdown": {"drain_timeout": 5.0},
    }, {})


def forwarder(cfg) -> Forwarder:
    return Forwarder(cfg, credentials=("k", "s"), registry=CollectorRegistry(), process_metrics=False)


def datagram(i: int, project: str | None = None) -> bytes:
    return orjson.dumps({**({"project": project} if project else {}), "data": {"i": i}})


async def test_datagrams_over_unix_and_udp_are_delivered_to_their_projects(tmp_path, emulator, sock_dir):
    port = free_port()
    fwd = forwarder(config(tmp_path, emulator.url, datagram_socket=str(sock_dir / "s"), datagram_port=port))
    await fwd.start()
    try:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        unix.sendto(datagram(1, "alpha"), str(sock_dir / "s"))
        unix.sendto(datagram(2) + b"\n" + datagram(3, "beta"), str(sock_dir / "s"))
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(datagram(4, "alpha"), ("127.0.0.1", port))

        async def arrived() -> bool:
            return len(emulator.accepted) >= 4
        await wait_for(arrived, 5, "4 events at the emulator")
        got = sorted((e.project, orjson.loads(e.data)["i"]) for e in emulator.accepted)
        assert got == [("alpha", 1), ("alpha", 4), ("beta", 3), ("dflt", 2)]
    finally:
        await fwd.shutdown()
    assert not (sock_dir / "s").exists()


async def test_datagrams_queued_when_shutdown_begins_are_still_delivered(tmp_path, emulator, sock_dir):
    fwd = forwarder(config(tmp_path, emulator.url, datagram_socket=str(sock_dir / "s")))
    await fwd.start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.connect(str(sock_dir / "s"))
    for i in range(5):  # no await: they wait in the kernel's queue when the shutdown starts
        client.send(datagram(i))
    await fwd.shutdown()
    assert sorted(orjson.loads(e.data)["i"] for e in emulator.accepted) == list(range(5))
    with pytest.raises(OSError):
        client.send(datagram(9))


async def test_a_second_forwarder_on_the_same_socket_fails_to_start_and_leaves_the_first_alone(tmp_path, emulator,
                                                                                            sock_dir):
    first = forwarder(config(tmp_path, emulator.url, datagram_socket=str(sock_dir / "s")))
    await first.start()
    try:
        second = forwarder(config(tmp_path, emulator.url, datagram_socket=str(sock_dir / "s")))
        with pytest.raises(UnixSocketError, match="intake.datagram_socket: .* is in use by another process"):
            await second.start()
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(datagram(1), str(sock_dir / "s"))

        async def arrived() -> bool:
            return len(emulator.accepted) == 1
        await wait_for(arrived, 5, "the event through the first forwarder")
    finally:
        await first.shutdown()


@pytest.mark.e2e
async def test_a_real_forwarder_process_delivers_datagram_events_and_removes_its_socket_on_exit(
        tmp_path, procs, session, sock_dir):
    emulator = procs(EmulatorProcess(tmp_path))
    await emulator.ready(session)
    path = str(sock_dir / "events.sock")
    fwd = procs(ForwarderProcess(tmp_path, {
        "intake": {"datagram_socket": path, "datagram_socket_mode": "0666"},
        "batch": {"flush_interval": 0.05},
        "evidently": {"endpoint_url": emulator.url, "default_project": "dflt"},
    }))
    await fwd.ready(session)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.sendto(orjson.dumps({"project": "shop", "data": orjson.dumps({"user": "u1"}).decode()}), path)
    client.sendto(b'{"data": {"user": "u2"}, "type": "aws.evidently.evaluation"}\n{"project": "shop", "data": {}}',
                  path)
    client.sendto(b"not json", path)

    async def arrived() -> bool:
        return len(await emulator.events(session)) >= 3
    await wait_for(arrived, 10, "3 events at the emulator")
    events = await emulator.events(session)
    assert sorted((e["project"], e["data"]) for e in events) == [
        ("dflt", '{"user":"u2"}'), ("shop", '{"user":"u1"}'), ("shop", "{}")]
    assert await fwd.metric(session, "forwarder_datagram_rejected_total", 'reason="not_json"') == 1
    assert await fwd.metric(session, "forwarder_datagrams_received_total") == 3
    fwd.terminate()
    assert await fwd.wait(15) == 0
    assert not Path(path).exists()
    assert "datagram_listening" in fwd.logs()
