"""Connection handling (issue 16, items 11 and 12): the limit, eviction, timeouts, head bounds.

In-process forwarder; the timeouts are driven through ``Connections.sweep(now)``
with times taken from the connection's own record, so no test waits for them.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from prometheus_client import CollectorRegistry

from forwarder.app import Forwarder
from forwarder.intake.aiohttp_fence import IntakeProtocol, Phase, http_error
from forwarder.intake.connections import ACCEPT_BATCH, FIXED_FILES, Limits, connection_limit, overdue
from forwarder.emulator.harness import wait_for
from tests.support import head_and_body, make_config

LIMITS = Limits(max_connections=4, idle_timeout=60.0, header_timeout=5.0, body_timeout=7.0, max_header_bytes=4096)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture
async def fwd(tmp_path, emulator):
    intake = {"max_connections": LIMITS.max_connections, "header_timeout": LIMITS.header_timeout,
              "body_timeout": LIMITS.body_timeout, "max_header_bytes": LIMITS.max_header_bytes,
              "max_body_bytes": 262_144}
    forwarder = Forwarder(make_config(tmp_path, emulator.url, intake=intake), credentials=("k", "s"),
                          registry=CollectorRegistry(), process_metrics=False)
    await forwarder.start()
    forwarder.port = forwarder.intake.port
    yield forwarder
    await forwarder.shutdown()


def closed(fwd, reason: str) -> float:
    value = fwd.metrics.registry.get_sample_value("forwarder_intake_connections_closed_total", {"reason": reason})
    return value or 0.0


class Client:
    """One raw connection."""

    async def open(self, port: int) -> "Client":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        return self

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def one_answer(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        status, headers, _ = head_and_body(head)
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def is_closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    def close(self) -> None:
        self.writer.close()


async def clients(fwd, n: int) -> list[Client]:
    opened = [await Client().open(fwd.port) for _ in range(n)]
    await wait_for(lambda: _count(fwd, n), 5, f"{n} connections at the intake")
    return opened


async def _count(fwd, n: int) -> bool:
    return fwd.intake.connections.count >= n


async def in_phase(fwd, phase: Phase, n: int = 1) -> list[IntakeProtocol]:
    async def there() -> bool:
        return sum(p.phase is phase for p in fwd.intake.connections.protocols) >= n
    await wait_for(there, 5, f"{n} connection(s) in phase {phase.value}")
    return [p for p in fwd.intake.connections.protocols if p.phase is phase]


# --- pure decisions ------------------------------------------------------------------------------

@pytest.mark.parametrize(("configured", "nofile", "upstream", "expected"), [
    (4096, 1024, 4, 1024 - FIXED_FILES - ACCEPT_BATCH - 4),
    (100, 1024, 4, 100),
    (4096, 1_048_576, 8, 4096),
    (4096, 100, 4, 0),
])
def test_the_connection_limit_stays_below_the_open_file_limit(configured, nofile, upstream, expected):
    assert connection_limit(configured, nofile, upstream) == expected


@pytest.mark.parametrize(("phase", "waited", "expected"), [
    (Phase.HEAD, 4.9, None), (Phase.HEAD, 5.0, "header_timeout"),
    (Phase.BODY, 6.9, None), (Phase.BODY, 7.0, "body_timeout"),
    (Phase.IDLE, 1000.0, None),  # idle connections are aiohttp's keep-alive timer's
    (Phase.BUSY, 1000.0, None), (Phase.CONNECTING, 1000.0, None),
    (Phase.WRITING, 59.9, None), (Phase.WRITING, 60.0, "write_timeout"),
])
def test_overdue_applies_the_timeout_of_each_phase(phase, waited, expected):
    assert overdue(phase, 100.0, 100.0 + waited, LIMITS) == expected


@pytest.mark.parametrize(("exc", "status", "reason"), [
    (LineTooLong(b"x", 8190), 431, "headers_too_large"),
    (BadHttpMessage("Too many headers received"), 431, "headers_too_large"),
    (BadHttpMessage("Invalid method"), 400, "malformed_http"),
    (RuntimeError("bug"), 500, "internal_error"),
])
def test_aiohttps_own_errors_map_to_aws_answers(exc, status, reason):
    got_status, error_type, message, got_reason = http_error(exc)
    assert (got_status, got_reason) == (status, reason) and error_type.endswith("Exception") and message


def test_only_connections_without_a_request_in_progress_may_be_evicted():
    assert {p for p in Phase if p.evictable} == {Phase.CONNECTING, Phase.IDLE, Phase.HEAD}
    assert not Phase.WRITING.evictable  # its unread answer may acknowledge events


# --- timeouts ---------------------------------------------------------------------------------

async def stalled(fwd, request: bytes, phase: Phase) -> tuple[Client, IntakeProtocol, float]:
    """A client that sent part of ``request`` and stopped; its connection, and since when it is in ``phase``."""
    client = await Client().open(fwd.port)
    client.send(request)
    (protocol,) = await in_phase(fwd, phase)
    _, since = protocol.observe(0.0)  # when the sweep first saw it so
    return client, protocol, since


async def test_a_request_head_still_incomplete_after_header_timeout_gets_408_and_is_closed(fwd):
    client, protocol, since = await stalled(fwd, b"GET /healthz HTTP/1.1\r\nHost: local", Phase.HEAD)
    fwd.intake.connections.sweep(since + LIMITS.header_timeout - 0.1)
    assert protocol.phase is Phase.HEAD  # not yet
    fwd.intake.connections.sweep(since + LIMITS.header_timeout)
    status, headers, body = head_and_body(await client.answer())
    assert status == 408 and headers["x-amzn-errortype"] == "RequestTimeoutException"
    assert "intake.header_timeout" in json.loads(body)["message"]
    assert closed(fwd, "header_timeout") == 1


async def test_a_body_still_incomplete_after_body_timeout_gets_408_and_nothing_is_buffered(fwd):
    client, protocol, since = await stalled(
        fwd, b"POST /events/projects/p HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100\r\n\r\n{\"events\":[", Phase.BODY)
    fwd.intake.connections.sweep(since + LIMITS.body_timeout - 0.1)
    assert protocol.phase is Phase.BODY  # not yet
    fwd.intake.connections.sweep(since + LIMITS.body_timeout)
    status, headers, body = head_and_body(await client.answer())
    assert status == 408 and "intake.body_timeout" in json.loads(body)["message"]
    assert fwd.buffer.depth == 0 and closed(fwd, "body_timeout") == 1


async def test_an_idle_keep_alive_connection_is_left_to_the_idle_timeout(fwd):
    client = await Client().open(fwd.port)
    client.send(HEALTHZ)
    assert (await client.one_answer())[0] == 200
    (protocol,) = await in_phase(fwd, Phase.IDLE)
    fwd.intake.connections.sweep(protocol.observe(0.0)[1] + 1000)
    client.send(HEALTHZ)  # still open: the header timeout did not apply to it
    assert (await client.one_answer())[0] == 200


# --- request heads -------------------------------------------------------------------------------

async def test_a_request_head_over_max_header_bytes_in_one_read_gets_431(fwd):
    client = await Client().open(fwd.port)
    headers = b"".join(b"X-Field-%d: %s\r\n" % (i, b"v" * 200) for i in range(40))  # 8 KiB, each field small
    client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
    status, headers_, body = head_and_body(await client.answer())
    assert status == 431 and headers_["x-amzn-errortype"] == "RequestHeaderFieldsTooLargeException"
    assert "intake.max_header_bytes is 4096" in json.loads(body)["message"]
    assert closed(fwd, "headers_too_large") == 1


async def test_a_request_head_trickled_in_small_reads_is_bounded_in_total(fwd):
    client = await Client().open(fwd.port)
    client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
    (protocol,) = await in_phase(fwd, Phase.HEAD)
    for i in range(40):  # each read well under the bound, their sum over it
        if protocol.transport is None:
            break
        before = protocol.head_bytes
        client.send(b"X-Field-%d: %s\r\n" % (i, b"v" * 200))

        async def read_by_server() -> bool:
            return protocol.transport is None or protocol.head_bytes > before
        await wait_for(read_by_server, 5, "the server to read the next header")
    status, _, _ = head_and_body(await client.answer())
    assert status == 431 and i < 39


async def test_a_large_body_arriving_with_its_head_is_not_taken_for_a_large_head(fwd, session):
    events = [{"data": {"pad": "x" * 1000, "n": i}} for i in range(200)]  # ~200 KiB in one write
    body = json.dumps({"events": events}).encode()
    cfg_most = 20  # make_config's max_events_per_request
    client = await Client().open(fwd.port)
    client.send(b"POST /events/projects/p HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body)
    status, _, answer = await client.one_answer()
    assert status == 400 and f"at most {cfg_most} events" in json.loads(answer)["message"]  # read whole, judged


async def test_pipelined_requests_are_all_answered_in_order(fwd):
    client = await Client().open(fwd.port)
    paths = [b"/healthz", b"/readyz"] * 5
    client.send(b"".join(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % p for p in paths))
    statuses = [await client.one_answer() for _ in paths]
    bodies = [json.loads(body)["status"] for _, _, body in statuses]
    assert bodies == ["ok", "ready"] * 5


# --- the connection limit ---------------------------------------------------------------------

async def test_at_the_limit_the_longest_idle_connection_makes_room_for_a_new_one(fwd, session):
    idle = await clients(fwd, LIMITS.max_connections)
    async with session.get(f"http://127.0.0.1:{fwd.port}/healthz") as r:
        assert r.status == 200
    assert await idle[0].is_closed_by_server()
    assert closed(fwd, "evicted") == 1 and fwd.intake.connections.count == LIMITS.max_connections


async def test_a_connection_that_was_just_used_is_evicted_after_older_idle_ones(fwd, session):
    first, second, *_ = await clients(fwd, LIMITS.max_connections)
    first.send(HEALTHZ)
    assert (await first.one_answer())[0] == 200  # `first` is now the most recently active
    async with session.get(f"http://127.0.0.1:{fwd.port}/healthz") as r:
        assert r.status == 200
    assert await second.is_closed_by_server()
    first.send(HEALTHZ)
    assert (await first.one_answer())[0] == 200


async def test_slow_heads_are_evicted_but_requests_in_progress_are_not(fwd, session):
    busy = await clients(fwd, 2)
    for client in busy:  # headers done, body pending: a request in progress
        client.send(b"POST /events/projects/p HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 30\r\n\r\n{")
    await in_phase(fwd, Phase.BODY, 2)
    slow = await clients(fwd, LIMITS.max_connections)
    for client in slow[2:]:
        client.send(b"GET /healthz HTTP/1.1\r\nHo")
    async with session.get(f"http://127.0.0.1:{fwd.port}/healthz") as r:
        assert r.status == 200
    for client in busy:
        client.send(b'"events":[{"data":{}}]}' + b" " * 6)
        assert (await client.one_answer())[0] == 200


async def test_at_the_limit_with_every_connection_busy_a_new_one_gets_a_clean_503(fwd):
    busy = await clients(fwd, LIMITS.max_connections)
    for client in busy:
        client.send(b"POST /events/projects/p HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 30\r\n\r\n{")
    await in_phase(fwd, Phase.BODY, LIMITS.max_connections)
    refused = await Client().open(fwd.port)
    status, headers, body = head_and_body(await refused.answer())
    assert status == 503 and headers["x-amzn-errortype"] == "ServiceUnavailableException"
    assert "intake.max_connections" in json.loads(body)["message"]
    assert closed(fwd, "refused") == 1
    assert fwd.metrics.registry.get_sample_value("forwarder_events_rejected_total",
                                                 {"reason": "connection_limit"}) == 1
    assert fwd.intake.connections.count == LIMITS.max_connections


async def test_the_connection_gauges_show_open_connections_and_the_limit(fwd):
    await clients(fwd, 3)
    registry = fwd.metrics.registry
    assert registry.get_sample_value("forwarder_intake_connections") == 3
    assert registry.get_sample_value("forwarder_intake_connection_limit") == LIMITS.max_connections


async def test_accept_running_out_of_descriptors_evicts_an_idle_connection_and_accepts_again(fwd, session, monkeypatch):
    idle = await clients(fwd, 2)
    acceptor = fwd.intake.connections._listeners[0]
    real, failures = acceptor.sock, []

    class OutOfFiles:
        """The listening socket, failing its next accept() with EMFILE."""

        def accept(self):
            if not failures:
                failures.append(1)
                raise OSError(24, "Too many open files")
            return real.accept()

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(acceptor, "sock", OutOfFiles())
    async with session.get(f"http://127.0.0.1:{fwd.port}/healthz") as r:
        assert r.status == 200  # accepted after the retry
    assert failures == [1] and await idle[0].is_closed_by_server()
    assert closed(fwd, "evicted") == 1


async def test_a_crashed_connection_sweep_makes_healthz_fail(fwd, session, monkeypatch):
    def broken(now: float) -> None:
        raise RuntimeError("bug in the sweep")

    monkeypatch.setattr(fwd.intake.connections, "sweep", broken)

    async def unhealthy() -> bool:
        async with session.get(f"http://127.0.0.1:{fwd.port}/healthz") as r:
            return r.status == 503 and "sweep" in (await r.json())["status"]
    await wait_for(unhealthy, 10, "/healthz to report the stopped sweep")


async def test_a_connection_whose_answer_is_unread_is_not_evicted_and_closes_after_idle_timeout(fwd):
    # A client that never reads, with small socket buffers on both sides: a /metrics answer stays unsent.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", fwd.port))
    try:
        (protocol,) = await in_phase(fwd, Phase.IDLE)
        protocol.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
        sock.send(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n" * 3)
        await in_phase(fwd, Phase.WRITING)
        await clients(fwd, LIMITS.max_connections)  # idle connections are evicted to make room, not this one
        assert protocol in fwd.intake.connections.protocols and closed(fwd, "evicted") == 1
        _, since = protocol.observe(0.0)
        fwd.intake.connections.sweep(since + LIMITS.idle_timeout)
        assert protocol not in fwd.intake.connections.protocols and closed(fwd, "write_timeout") == 1
    finally:
        sock.close()
