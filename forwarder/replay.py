"""``forwarder replay``: send dead-lettered events back through a running forwarder.

Lines are grouped per project (or all sent to ``--project``) and posted in
requests of at most ``REQUEST_EVENTS`` events; the report counts what the intake
accepted and what it rejected, with the reasons. A 429 or 503 is retried after
the intake's Retry-After, at most ``MAX_ATTEMPTS`` times per request and never
past the overall deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator
from urllib.parse import quote

import aiohttp
import orjson

REQUEST_EVENTS = 500
MAX_ATTEMPTS = 5  # per request, when the forwarder answers 429/503
MAX_WAIT = 10.0  # seconds: the longest Retry-After honoured


class ReplayError(Exception):
    """Replay cannot run at all (unreadable file, unreachable intake); the message says why."""


@dataclass
class ReplayReport:
    accepted: int = 0
    rejected: int = 0
    unreadable_lines: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


def read_dead_letters(path: str, project: str | None, report: ReplayReport) -> dict[str, list[dict]]:
    """Events per project from a dead-letter file; unreadable lines are counted, not fatal."""
    out: dict[str, list[dict]] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    entry = orjson.loads(line)
                    event, target = entry["event"], project or entry["project"]
                    if type(event) is not dict or type(target) is not str:
                        raise TypeError
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    report.unreadable_lines += 1
                    continue
                out.setdefault(target, []).append(event)
    except OSError as e:
        raise ReplayError(f"cannot read {path}: {e.strerror or e}") from None
    return out


def _chunks(events: list[dict]) -> Iterator[list[dict]]:
    for i in range(0, len(events), REQUEST_EVENTS):
        yield events[i:i + REQUEST_EVENTS]


async def replay(path: str, intake: str, project: str | None = None, timeout: float = 300.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> ReplayReport:
    """Post every event of the dead-letter file at ``path`` to ``intake``, within ``timeout`` seconds."""
    report = ReplayReport()
    grouped = read_dead_letters(path, project, report)
    deadline = clock() + timeout
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for target, events in grouped.items():
                url = f"{intake.rstrip('/')}/events/projects/{quote(target, safe='')}"
                for chunk in _chunks(events):
                    await _post(session, url, chunk, report, lambda: deadline - clock(), sleep)
    except aiohttp.ClientError as e:
        raise ReplayError(f"cannot reach the intake at {intake}: {e}") from None
    return report


async def _post(session: aiohttp.ClientSession, url: str, events: list[dict], report: ReplayReport,
                remaining: Callable[[], float], sleep: Callable[[float], Awaitable[None]]) -> None:
    body = orjson.dumps({"events": events})
    for attempt in range(MAX_ATTEMPTS):
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            payload = await resp.read()
            status, retry_after = resp.status, resp.headers.get("Retry-After", "1")
        wait = min(_seconds(retry_after), MAX_WAIT)
        if status in (429, 503) and attempt + 1 < MAX_ATTEMPTS and wait < remaining():
            await sleep(wait)
            continue
        if status != 200:
            report.rejected += len(events)
            report.reasons[f"HTTP {status}: {_message(payload)}"] += len(events)
            return
        for result in orjson.loads(payload)["eventResults"]:
            if "eventId" in result:
                report.accepted += 1
            else:
                report.rejected += 1
                report.reasons[result.get("errorMessage", "rejected")] += 1
        return


def _seconds(value: str) -> float:
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0


def _message(payload: bytes) -> str:
    try:
        return str(orjson.loads(payload).get("message", ""))[:200]
    except (orjson.JSONDecodeError, AttributeError):
        return payload[:200].decode(errors="replace")
