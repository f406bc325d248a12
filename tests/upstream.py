"""A misbehaving PutProjectEvents upstream for fault tests: a raw HTTP/1.1 server on 127.0.0.1.

Each call is answered by a script ``answer(call_number, events) -> Reply``: a
whole raw HTTP response, optionally cut short and the connection closed, as a
broken proxy or stand-in endpoint would. Every call's events are recorded
whatever the answer, because a broken answer does not mean nothing was stored.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import orjson


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes | None = None  # None: a correct PutProjectEvents answer for the call's events
    cut_after: int | None = None  # close the connection after this many bytes of the response
    content_type: str = "application/json"


def ok_body(n: int) -> bytes:
    results = b",".join(b'{"eventId":"00000000-0000-4000-8000-%012x"}' % i for i in range(n))
    return b'{"eventResults":[' + results + b'],"failedEventCount":0}'


class Upstream:
    def __init__(self, answer: Callable[[int, list[dict]], Reply]) -> None:
        self.answer = answer
        self.calls: list[list[dict]] = []
        self.received: Counter[str] = Counter()  # event data -> copies received
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> "Upstream":
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                events = orjson.loads(await reader.readexactly(length))["events"]
                number = len(self.calls)
                self.calls.append(events)
                self.received.update(e["data"] for e in events)
                reply = self.answer(number, events)
                body = ok_body(len(events)) if reply.body is None else reply.body
                response = (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                            % (reply.status, reply.content_type.encode(), len(body))) + body
                if reply.cut_after is not None:
                    writer.write(response[:reply.cut_after])
                    await writer.drain()
                    return
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
