"""``forwarder replay``: send dead-lettered events back through a running forwarder's intake.

Reads the dead-letter file's rotations oldest first, then the file itself
(source.py), and posts runs of consecutive lines for one project, each request
sized to fit the intake's ``max_body_bytes`` and ``max_events_per_request``. A
413 splits the request in two (a single event the intake still refuses is
counted as rejected); a 429 or 503 waits for its ``Retry-After``; a 5xx or a
broken connection is retried with a capped exponential backoff; every wait and
every request ends by the run's deadline (``timeout``). After each answered
request the offset past its last line is committed (``<file>.replayed``), so a
second run sends nothing already answered and an interrupted run resumes where
it stopped. A request cut short before its answer (the deadline, or a second
Ctrl-C) is sent again by the next run.

Events the intake refuses for good (a per-event ``ValidationException``, a
400) are counted with their reason and not sent again; a refusal of the
credentials, or an answer that says this is not an intake, stops the run.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Iterator, TextIO

import aiohttp
import orjson

from forwarder.replay.progress import Progress
from forwarder.replay.source import DeadLetterFile, Entry, Offsets, SourceError, Unreadable, files_in_order
from forwarder.replay.target import Target, TargetError, make_target

MAX_WAIT = 10.0  # seconds: the longest Retry-After honoured
MAX_BACKOFF = 5.0  # seconds: the longest wait after a 5xx or a broken connection
REQUEST_TIMEOUT = 30.0  # seconds for one request, within the run's deadline
BODY_OVERHEAD = len(b'{"events":[]}')
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})


class ReplayError(Exception):
    """Replay cannot run or go on (unreadable file, unreachable intake, refused credentials); the message says why."""


@dataclass(frozen=True)
class Limits:
    """What one request may hold: the intake's ``intake.max_body_bytes`` and ``max_events_per_request``."""

    max_body_bytes: int = 1_048_576
    max_events: int = 500


@dataclass
class ReplayReport:
    files: list[str] = field(default_factory=list)
    total: int = 0  # lines left to replay when the run started
    accepted: int = 0
    rejected: int = 0
    unreadable_lines: int = 0
    requests: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    per_project: Counter[str] = field(default_factory=Counter)  # dry run: what would be sent
    per_code: Counter[str] = field(default_factory=Counter)  # dry run: by the dead letter's errorCode
    stopped: str | None = None  # why the run ended early ("interrupted", "timed out after 5 s")
    seconds: float = 0.0


class _Stopped(Exception):
    """The run ends early, what was answered committed: interrupted or out of time."""


async def replay(path: str, intake: Target | str, *, project: str | None = None, timeout: float = 300.0,
                 limits: Limits = Limits(), dry_run: bool = False, from_start: bool = False,
                 stop: asyncio.Event | None = None, progress: TextIO | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> ReplayReport:
    """Replay what is left of the dead-letter file at ``path`` (and its rotations) into ``intake``."""
    try:
        target = make_target(intake) if isinstance(intake, str) else intake
        names = files_in_order(path)
        offsets = Offsets(path, fresh=from_start)
        files = [DeadLetterFile.open(name) for name in names]
    except (SourceError, TargetError) as e:
        raise ReplayError(str(e)) from None
    report = ReplayReport(files=names)
    try:
        starts = [offsets.start(f) for f in files]
        report.total = sum(f.count_lines(start) for f, start in zip(files, starts))
        if dry_run:
            _count(files, starts, project, report)
            return report
        meter = Progress(report.total, progress, clock)
        try:
            async with target.session(timeout=REQUEST_TIMEOUT) as session:
                poster = _Poster(target, session, report, clock() + timeout, timeout, stop, sleep, clock)
                for f, start in zip(files, starts):
                    await _replay_file(f, start, project, limits, poster, offsets, files, meter)
        except _Stopped as e:
            report.stopped = str(e)
        except SourceError as e:
            raise ReplayError(str(e)) from None
        finally:
            meter.finish()
            report.seconds = meter.elapsed()
        return report
    finally:
        for f in files:
            f.close()


def _count(files: list[DeadLetterFile], starts: list[int], project: str | None, report: ReplayReport) -> None:
    for f, start in zip(files, starts):
        for item in f.entries(start, project):
            if isinstance(item, Entry):
                report.per_project[item.project] += 1
                report.per_code[item.code] += 1
            elif not item.blank:
                report.unreadable_lines += 1


async def _replay_file(f: DeadLetterFile, start: int, project: str | None, limits: Limits, poster: "_Poster",
                       offsets: Offsets, live: list[DeadLetterFile], meter: Progress) -> None:
    committed = start

    def commit(offset: int, lines: int) -> None:
        nonlocal committed
        if offset > committed:
            offsets.commit(f, offset, live)
            committed = offset
        meter.advance(lines)

    read = [start]  # the end of the last line read, unreadable ones included
    for run in _runs(f.entries(start, project), limits, poster.report, read):
        await poster.deliver(run, commit)
    end = read[0]
    if end > committed:  # unreadable or blank lines at the end: nothing to send, nothing to read again
        commit(end, 0)


def _runs(items: Iterable[Entry | Unreadable], limits: Limits, report: ReplayReport,
          read: list[int]) -> Iterator[list[Entry]]:
    """Consecutive entries for one project, each run fitting one request; ``read[0]``: the end of the last line."""
    run: list[Entry] = []
    size = BODY_OVERHEAD
    for item in items:
        read[0] = item.end
        if isinstance(item, Unreadable):
            report.unreadable_lines += 0 if item.blank else 1
            continue
        cost = len(item.event) + 1
        if run and (item.project != run[0].project or len(run) >= limits.max_events
                    or size + cost > limits.max_body_bytes):
            yield run
            run, size = [], BODY_OVERHEAD
        run.append(item)
        size += cost
    if run:
        yield run


class _Poster:
    """Posts runs to the intake, owning retries, the deadline and what the answers say."""

    def __init__(self, target: Target, session: aiohttp.ClientSession, report: ReplayReport, deadline: float,
                 timeout: float, stop: asyncio.Event | None, sleep: Callable[[float], Awaitable[None]],
                 clock: Callable[[], float]) -> None:
        self.target, self.session, self.report = target, session, report
        self.deadline, self.timeout, self.stop, self.sleep, self.clock = deadline, timeout, stop, sleep, clock
        self.reached = False  # an intake that never answered is a wrong address, not a hiccup

    async def deliver(self, run: list[Entry], commit: Callable[[int, int], None]) -> None:
        """Post ``run``, halving it on 413, and commit past each part once answered."""
        status, payload = await self._post(run[0].project, run)
        if status == 413 and len(run) > 1:
            half = len(run) // 2
            await self.deliver(run[:half], commit)
            await self.deliver(run[half:], commit)
            return
        if status == 200:
            self._count_results(run, payload)
        elif status in (400, 413):
            self.report.rejected += len(run)
            self.report.reasons[f"HTTP {status}: {_message(payload)}"] += len(run)
        elif status in AUTH_STATUSES:
            raise ReplayError(f"the intake refused the request: HTTP {status} {_message(payload)}; check --auth "
                              "and its credentials (--token-file or FORWARDER_TOKEN; the AWS credential chain "
                              "and --region for sigv4)")
        else:
            raise ReplayError(f"the intake at {self.target.base} answered HTTP {status}: {_message(payload)}")
        commit(run[-1].end, len(run))

    def _count_results(self, run: list[Entry], payload: bytes) -> None:
        try:
            results = orjson.loads(payload)["eventResults"]
            if len(results) != len(run):
                raise ValueError(f"{len(results)} results for {len(run)} events")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ReplayError(f"the intake at {self.target.base} answered 200 without one result per event ({e}): "
                              "is --intake a forwarder's intake?") from None
        for result in results:
            if "eventId" in result:
                self.report.accepted += 1
            else:
                self.report.rejected += 1
                self.report.reasons[f"{result.get('errorCode', 'rejected')}: {result.get('errorMessage', '')}"] += 1
        self.report.requests += 1

    def _remaining(self) -> float:
        if self.stop is not None and self.stop.is_set():
            raise _Stopped("interrupted")
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            raise _Stopped(f"timed out after {self.timeout:g} s")
        return remaining

    async def _post(self, project: str, run: list[Entry]) -> tuple[int, bytes]:
        """The intake's final answer for one request: 429/503/5xx and broken connections retried in here."""
        body = b'{"events":[' + b",".join(e.event for e in run) + b"]}"
        url = self.target.request_url(project)
        attempt = 0
        while True:
            remaining = self._remaining()
            headers = self.target.sign(str(url), body, {"Content-Type": "application/json"})
            try:
                async with asyncio.timeout(min(remaining, REQUEST_TIMEOUT)):
                    async with self.session.post(url, data=body, headers=headers) as resp:
                        status, payload = resp.status, await resp.read()
                        retry_after = resp.headers.get("Retry-After")
            except aiohttp.ClientSSLError as e:
                raise ReplayError(f"TLS with the intake at {self.target.base} failed: {e}; trust its CA with "
                                  "--ca-bundle or AWS_CA_BUNDLE") from None
            except (aiohttp.ClientError, TimeoutError) as e:
                if not self.reached:
                    raise ReplayError(f"cannot reach the intake at {self.target.unix_socket or self.target.base}: "
                                      f"{e or type(e).__name__}") from None
                wait = _backoff(attempt)
            else:
                self.reached = True
                if status not in RETRY_STATUSES:
                    return status, payload
                wait = min(_seconds(retry_after), MAX_WAIT) if retry_after is not None else _backoff(attempt)
            if wait >= self._remaining():
                raise _Stopped(f"timed out after {self.timeout:g} s")
            await self._pause(wait)
            attempt += 1

    async def _pause(self, seconds: float) -> None:
        """Wait before a retry; a stop (Ctrl-C) ends the wait at once."""
        if self.stop is None:
            await self.sleep(seconds)
            return
        waits = [asyncio.ensure_future(self.sleep(seconds)), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


def _backoff(attempt: int) -> float:
    return min(MAX_BACKOFF, 0.1 * 2 ** min(attempt, 10))


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
