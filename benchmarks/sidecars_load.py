"""Many sidecars at once, in one process: N keep-alive connections (plain, TLS or mTLS) posting one pre-built
request back to back, each waiting for its answer (closed loop); prints one JSON line.

Leaner than benchmarks/loadgen.py (aiohttp's client): a raw asyncio protocol that
writes the request's bytes and reads the answer's head for its status and
Content-Length, so that one driver core makes as many TLS requests as it can.
Every connection is open (its handshake done) before the clock starts: the
window measures a fleet of sidecars that keep their connections, as they do.
A first JSON line (``{"connected": N}``) says when they are; the last line is
the result.

    python -m benchmarks.sidecars_load --url https://127.0.0.1:8443/events/projects/bench \\
        --body-file body.json --connections 256 --duration 4 --cafile ca.crt --cert c.crt --key c.key
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from urllib.parse import urlsplit

from benchmarks import stats
from benchmarks.bare_server import loop_factory

SETTLE = 0.5  # seconds between the last connection made and the window


class Window:
    """What every connection records during one measured window."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.going = True


class Sidecar(asyncio.Protocol):
    """One keep-alive connection posting ``request`` again as soon as the answer to the last one is complete."""

    def __init__(self, request: bytes, window: Window, connected: asyncio.Future) -> None:
        self._request = request
        self._window = window
        self._connected = connected
        self._buffer = b""
        self._sent = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._connected.set_result(None)

    def send(self) -> None:
        self._sent = time.perf_counter()
        self.transport.write(self._request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            at = self._buffer.find(b"\r\nContent-Length: ", 0, head_end)
            length = int(self._buffer[at + 18:self._buffer.index(b"\r\n", at + 2)]) if at >= 0 else 0
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            status = int(self._buffer[9:12])
            self._buffer = self._buffer[end:]
            self._answered(status)

    def _answered(self, status: int) -> None:
        now = time.perf_counter()
        w = self._window
        if w.start <= self._sent and now <= w.end:
            w.latencies.append(now - self._sent)
            w.statuses[status] = w.statuses.get(status, 0) + 1
        if w.going and now < w.end:
            self.send()
        else:
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._connected.done():
            self._connected.set_exception(exc or ConnectionError("closed before it was made"))
        if not self.closed.done():
            self.closed.set_result(None)


def build_request(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def client_context(cafile: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if cert:
        context.load_cert_chain(cert, key)
    return context


async def run(url: str, body: bytes, headers: dict[str, str], connections: int, duration: float,
              tls: ssl.SSLContext | None) -> dict:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    request = build_request(url, body, headers)
    window = Window()
    sidecars = []
    opening = time.perf_counter()
    for _ in range(connections):  # one by one: a burst of handshakes is not what is measured
        connected = loop.create_future()
        sidecar = Sidecar(request, window, connected)
        await loop.create_connection(lambda: sidecar, parts.hostname, parts.port, ssl=tls)
        await connected
        sidecars.append(sidecar)
    connect_ms = (time.perf_counter() - opening) / connections * 1e3
    # Tell the orchestrator, which reads the server's CPU counters here, so that
    # the window's CPU is the requests' and not the handshakes'; the pause lets
    # the server finish its side of the last handshake first.
    print(json.dumps({"connected": connections}), flush=True)
    await asyncio.sleep(SETTLE)
    window.start = time.perf_counter()
    window.end = window.start + duration
    for sidecar in sidecars:
        sidecar.send()
    await asyncio.sleep(duration)
    window.going = False
    await asyncio.wait_for(asyncio.gather(*(s.closed for s in sidecars)), 30)
    ok = window.statuses.get(200, 0)
    answered = sum(window.statuses.values())
    return {"requests": answered, "ok": ok, "errors": answered - ok, "seconds": duration, "rps": ok / duration,
            "p50_ms": stats.percentile(window.latencies, 50) * 1e3,
            "p99_ms": stats.percentile(window.latencies, 99) * 1e3, "statuses": window.statuses,
            "connections": connections, "connect_ms": connect_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--cafile", help="trust this CA for the server's certificate (https URLs)")
    parser.add_argument("--cert", help="present this client certificate (mTLS)")
    parser.add_argument("--key", help="the client certificate's key")
    args = parser.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read()
    headers = dict(h.split(":", 1) for h in args.header)
    tls = client_context(args.cafile, args.cert, args.key) if args.url.startswith("https:") else None
    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        result = runner.run(run(args.url, body, headers, args.connections, args.duration, tls))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
