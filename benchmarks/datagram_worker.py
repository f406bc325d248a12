"""Processes of the datagram benchmark; each prints one JSON line.

``send``: an application emitting single events over a datagram socket at a
fixed rate (a blocking socket waits when the forwarder's queue is full; a
non-blocking one counts EAGAIN and moves on, as DogStatsD clients do).
``receive``: the floor of the receiving side: a bare reader on the same loop as
the forwarder (uvloop) that takes each datagram and keeps nothing, either
draining the socket until EAGAIN per wake-up (``--how drain``, what
forwarder/intake/datagram/sockets.py's ``Sockets.receive`` does) or through asyncio's
one callback per datagram (``--how protocol``). CPU counts from the first
datagram to the last.
``app-cost``: what one event costs the application: ``sendto`` on a Unix
datagram socket against a POST over a keep-alive connection, alternated.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import socket
import time
from urllib.parse import urlsplit

import orjson

from benchmarks import stats, workload
from benchmarks.bare_server import loop_factory

POOL = 10_000  # distinct datagrams, cycled
IDLE_END = 1.0  # seconds without a datagram that end a receiver's run
TICK = 0.001  # the sender's pacing step


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def datagrams(n: int, project: str, form: str = "wire") -> list[bytes]:
    """Single events as the README's clients send them: the project first, no timestamp (the forwarder
    stamps the time it took the event), ``data`` a JSON string (``wire``, PutProjectEvents' form, what the
    other benchmarks send) or an object (``object``)."""
    out = []
    for i in range(n):
        data = workload.event(i)["data"]
        out.append(orjson.dumps({"project": project, "data": data if form == "object" else orjson.dumps(data).decode(),
                                 "type": workload.EVENT_TYPE}))
    return out


def address(target: str) -> tuple[int, object]:
    """``udp:HOST:PORT`` or a Unix socket path."""
    if target.startswith("udp:"):
        host, _, port = target[4:].rpartition(":")
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    return socket.AF_UNIX, target


def send(target: str, rate: float, duration: float, blocking: bool, project: str, form: str) -> dict:
    family, addr = address(target)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(blocking)
    pool = datagrams(POOL, project, form)
    total = int(rate * duration)
    sent = refused = 0
    behind: list[float] = []
    sendto = sock.sendto
    t0 = time.perf_counter()
    i = 0
    while i < total:
        now = time.perf_counter()
        due = min(total, int((now - t0) * rate) + 1)
        behind.append(max(0.0, (now - t0) - i / rate))
        while i < due:
            try:
                sendto(pool[i % POOL], addr)
                sent += 1
            except BlockingIOError:
                refused += 1
            i += 1
        pause = t0 + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(min(pause, TICK))
    seconds = time.perf_counter() - t0
    return {"offered": total, "sent": sent, "eagain": refused, "seconds": seconds, "rate": sent / seconds,
            "behind_p99_ms": stats.percentile(behind, 99) * 1e3, "behind_max_ms": max(behind) * 1e3}


async def receive(path: str, how: str) -> dict:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(path + ".new")
    os.rename(path + ".new", path)  # the orchestrator waits for the path: it appears bound
    state = {"n": 0, "wakeups": 0, "first_cpu": 0.0, "last_cpu": 0.0, "last": 0.0}

    def took(k: int) -> None:
        if not state["n"]:
            state["first_cpu"] = cpu()
        state["n"] += k
        state["last"] = time.monotonic()

    if how == "drain":
        def readable() -> None:
            recv, k = sock.recv, 0
            try:
                while k < 512:
                    recv(65537)
                    k += 1
            except BlockingIOError:
                pass
            state["wakeups"] += 1
            took(k)
        loop.add_reader(sock.fileno(), readable)
    else:
        class Counting(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                took(1)
        await loop.create_datagram_endpoint(Counting, sock=sock)
    while not state["n"] or time.monotonic() - state["last"] < IDLE_END:
        await asyncio.sleep(0.05)
        state["last_cpu"] = cpu() if time.monotonic() - state["last"] < 0.1 else state["last_cpu"]
    n = state["n"]
    used = state["last_cpu"] - state["first_cpu"]
    os.unlink(path)
    return {"how": how, "datagrams": n, "wakeups": state["wakeups"], "cpu_seconds": used,
            "cpu_us_per_datagram": used / n * 1e6}


def app_cost(path: str, url: str, rounds: int, calls: int, rate: float) -> dict:
    """Each call timed alone, paced at ``rate`` so that neither side measures a queue."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    pool = datagrams(calls, workload.PROJECT)
    target = urlsplit(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    bodies = [orjson.dumps({"events": [workload.event(i)]}) for i in range(calls)]
    waits: dict[str, list[float]] = {"sendto": [], "post": []}

    def sendtos() -> None:
        for data in pool:
            t = time.perf_counter()
            sock.sendto(data, path)
            waits["sendto"].append(time.perf_counter() - t)
            _pace(t, rate)

    def posts() -> None:
        for body in bodies:
            t = time.perf_counter()
            conn.request("POST", f"/events/projects/{workload.PROJECT}", body=body,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            waits["post"].append(time.perf_counter() - t)
            if response.status != 200:
                raise RuntimeError(f"POST to the forwarder: {response.status}")
            _pace(t, rate)

    for _ in range(rounds):
        sendtos()
        posts()
    conn.close()
    return {k: {"p50_us": stats.percentile(v, 50) * 1e6, "p99_us": stats.percentile(v, 99) * 1e6, "n": len(v)}
            for k, v in waits.items()}


def _pace(started: float, rate: float) -> None:
    while time.perf_counter() - started < 1 / rate:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True, help="a Unix socket path or udp:HOST:PORT")
    s.add_argument("--rate", type=float, required=True)
    s.add_argument("--duration", type=float, required=True)
    s.add_argument("--nonblocking", action="store_true")
    s.add_argument("--project", default=workload.PROJECT)
    s.add_argument("--form", choices=("wire", "object"), default="wire")
    r = sub.add_parser("receive")
    r.add_argument("--path", required=True)
    r.add_argument("--how", choices=("drain", "protocol"), required=True)
    a = sub.add_parser("app-cost")
    a.add_argument("--path", required=True)
    a.add_argument("--url", required=True)
    a.add_argument("--rounds", type=int, required=True)
    a.add_argument("--calls", type=int, required=True)
    a.add_argument("--rate", type=float, default=2000.0)
    args = parser.parse_args()
    if args.mode == "send":
        result = send(args.to, args.rate, args.duration, not args.nonblocking, args.project, args.form)
    elif args.mode == "receive":
        with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
            result = runner.run(receive(args.path, args.how))
    else:
        result = app_cost(args.path, args.url, args.rounds, args.calls, args.rate)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
