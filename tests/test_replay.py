"""``forwarder replay`` in process: dead letters back through an intake, resumable, sized to fit, on a deadline.

The real intakes (token, SigV4 over TLS, a Unix socket) are in tests/e2e/test_replay_e2e.py.
"""

from __future__ import annotations

import asyncio
import io
import os
from contextlib import asynccontextmanager

import orjson
import pytest
from aiohttp import web

from forwarder.delivery.deadletter import lines
from forwarder.replay.progress import Progress
from forwarder.replay.run import Limits, ReplayError, replay
from forwarder.replay.target import make_target
from tests.fakes import local_server


def dead_letters(projects: list[str], first: int = 0, pad: int = 0, code: str = "ThrottlingException") -> bytes:
    return b"".join(lines(p, [orjson.dumps({"data": orjson.dumps({"i": i, "pad": "x" * pad}).decode(),
                                            "timestamp": 1, "type": "aws.evidently.custom"})],
                          code, "slow", 3, 1.0, 2.0) for i, p in enumerate(projects, first))


def dead_letter_file(tmp_path, projects: list[str], extra: bytes = b"", name: str = "dl.ndjson", **kw):
    path = tmp_path / name
    path.write_bytes(dead_letters(projects, **kw) + extra)
    return path


class Intake:
    """An intake on 127.0.0.1: answers from ``answers`` (status, headers) first, then 200s; keeps what it got.

    ``max_body``: a body larger than this gets 413, like intake.max_body_bytes.
    """

    def __init__(self, answers: list[tuple[int, dict[str, str]]] | None = None, max_body: int = 1 << 30) -> None:
        self.answers = answers or []
        self.max_body = max_body
        self.got: list[tuple[str, list[dict]]] = []
        self.headers: list[dict[str, str]] = []
        self.stop_after: tuple[int, asyncio.Event] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.headers.append(dict(request.headers))
        assert request.headers["Content-Type"] == "application/json"
        if len(body) > self.max_body:
            return web.json_response({"message": "too large"}, status=413)
        if self.answers:
            status, headers = self.answers.pop(0)
            return web.json_response({"message": "busy"}, status=status, headers=headers)
        events = orjson.loads(body)["events"]
        self.got.append((request.match_info["project"], events))
        if self.stop_after and len(self.got) == self.stop_after[0]:
            self.stop_after[1].set()  # as a Ctrl-C while this request is in flight
        return web.json_response({"eventResults": [{"eventId": "x"} for _ in events], "failedEventCount": 0})

    def numbers(self) -> list[int]:
        return [orjson.loads(e["data"])["i"] for _, events in self.got for e in events]


@asynccontextmanager
async def serving(intake: Intake):
    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/events/projects/{project}", intake.handle)
    async with local_server(app) as url:
        yield url


class Sleeps:
    """A sleep that only records, with a clock it advances."""

    def __init__(self) -> None:
        self.waited: list[float] = []
        self.now = 0.0

    async def __call__(self, seconds: float) -> None:
        self.waited.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


async def test_events_go_back_to_their_own_projects_and_unreadable_lines_are_counted(tmp_path):
    path = dead_letter_file(tmp_path, ["a", "b", "a"], extra=b"not json\n{\"event\": 5}\n\n")
    intake = Intake()
    async with serving(intake) as url:
        report = await replay(str(path), url)
    assert [(p, len(evs)) for p, evs in intake.got] == [("a", 1), ("b", 1), ("a", 1)]
    assert (report.accepted, report.rejected, report.unreadable_lines) == (3, 0, 2)


async def test_project_sends_every_event_to_one_project(tmp_path):
    path = dead_letter_file(tmp_path, ["a", "b"])
    intake = Intake()
    async with serving(intake) as url:
        await replay(str(path), url, project="elsewhere")
    assert [(p, len(evs)) for p, evs in intake.got] == [("elsewhere", 2)]


async def test_429_and_503_are_retried_after_their_retry_after(tmp_path):
    path = dead_letter_file(tmp_path, ["a"])
    sleeps = Sleeps()
    intake = Intake([(429, {"Retry-After": "2"}), (503, {"Retry-After": "1"}), (502, {})])
    async with serving(intake) as url:
        report = await replay(str(path), url, sleep=sleeps, clock=sleeps.clock)
    assert sleeps.waited == [2.0, 1.0, 0.4]  # the 502: the backoff of a third attempt
    assert report.accepted == 1 and len(intake.got) == 1


async def test_retries_end_at_the_deadline_and_the_events_stay_for_the_next_run(tmp_path):
    path = dead_letter_file(tmp_path, ["a"])
    sleeps = Sleeps()
    intake = Intake([(429, {"Retry-After": "4"})] * 3)
    async with serving(intake) as url:
        first = await replay(str(path), url, timeout=10.0, sleep=sleeps, clock=sleeps.clock)
        second = await replay(str(path), url, timeout=10.0, sleep=sleeps, clock=sleeps.clock)
    assert sleeps.waited == [4.0, 4.0]  # after the third 429, a wait would end past the deadline
    assert first.stopped == "timed out after 10 s" and first.accepted == 0
    assert second.stopped is None and second.accepted == 1 and intake.numbers() == [0]


async def test_a_missing_file_and_an_unreachable_intake_are_replay_errors(tmp_path):
    with pytest.raises(ReplayError, match="cannot read"):
        await replay(str(tmp_path / "nope"), "http://127.0.0.1:9")
    path = dead_letter_file(tmp_path, ["a"])
    with pytest.raises(ReplayError, match="cannot reach the intake"):
        await replay(str(path), "http://127.0.0.1:9")


async def test_a_second_run_after_a_complete_one_sends_nothing(tmp_path):
    path = dead_letter_file(tmp_path, ["a", "a", "b"])
    intake = Intake()
    async with serving(intake) as url:
        first = await replay(str(path), url)
        second = await replay(str(path), url)
    assert first.accepted == 3 and (second.total, second.accepted) == (0, 0)
    assert sorted(intake.numbers()) == [0, 1, 2]


async def test_an_interrupted_run_resumes_where_it_stopped_and_nothing_is_sent_twice(tmp_path):
    path = dead_letter_file(tmp_path, ["a"] * 100)
    intake = Intake()
    stop = asyncio.Event()
    intake.stop_after = (3, stop)
    async with serving(intake) as url:
        first = await replay(str(path), url, limits=Limits(max_events=10), stop=stop)
        second = await replay(str(path), url, limits=Limits(max_events=10))
    assert first.stopped == "interrupted" and first.accepted == 30
    assert second.total == 70 and second.accepted == 70
    assert intake.numbers() == list(range(100))


async def test_rotated_files_are_replayed_oldest_first(tmp_path):
    dead_letter_file(tmp_path, ["a"] * 2, first=0, name="dl.ndjson.2")
    dead_letter_file(tmp_path, ["a"] * 2, first=2, name="dl.ndjson.1")
    path = dead_letter_file(tmp_path, ["a"] * 2, first=4)
    intake = Intake()
    async with serving(intake) as url:
        report = await replay(str(path), url)
    assert report.files == [f"{path}.2", f"{path}.1", str(path)]
    assert intake.numbers() == [0, 1, 2, 3, 4, 5]


async def test_offsets_follow_a_file_the_forwarder_rotates_between_runs(tmp_path):
    path = dead_letter_file(tmp_path, ["a"] * 3)
    intake = Intake()
    async with serving(intake) as url:
        await replay(str(path), url)
        os.replace(path, f"{path}.1")  # the forwarder's rotation: a rename
        path.write_bytes(dead_letters(["a"] * 2, first=3))
        second = await replay(str(path), url)
    assert second.total == 2 and intake.numbers() == [0, 1, 2, 3, 4]


async def test_requests_fit_the_body_and_event_limits(tmp_path):
    path = dead_letter_file(tmp_path, ["a"] * 40, pad=4000)
    intake = Intake(max_body=40_000)
    async with serving(intake) as url:
        report = await replay(str(path), url, limits=Limits(max_body_bytes=40_000, max_events=500))
    assert report.accepted == 40 and report.requests == 5  # 9 events of ~4.1 KB per 40 KB body
    assert intake.numbers() == list(range(40))


async def test_a_413_splits_the_request_and_never_rejects_what_fits(tmp_path):
    path = dead_letter_file(tmp_path, ["a"] * 40, pad=4000)
    intake = Intake(max_body=20_000)  # the intake is stricter than the limits replay was told
    async with serving(intake) as url:
        report = await replay(str(path), url, limits=Limits(max_body_bytes=1_048_576))
    assert (report.accepted, report.rejected) == (40, 0)
    assert intake.numbers() == list(range(40))


async def test_a_single_event_too_large_for_the_intake_is_rejected_alone(tmp_path):
    path = tmp_path / "dl.ndjson"
    path.write_bytes(dead_letters(["a"]) + dead_letters(["a"], first=1, pad=30_000) + dead_letters(["a"], first=2))
    intake = Intake(max_body=20_000)
    async with serving(intake) as url:
        report = await replay(str(path), url)
    assert (report.accepted, report.rejected) == (2, 1) and intake.numbers() == [0, 2]
    assert "HTTP 413" in next(iter(report.reasons))


async def test_refused_credentials_stop_the_run_and_nothing_is_marked_sent(tmp_path):
    path = dead_letter_file(tmp_path, ["a", "a"])
    intake = Intake([(401, {"WWW-Authenticate": "Bearer"})])
    async with serving(intake) as url:
        with pytest.raises(ReplayError, match="refused the request: HTTP 401"):
            await replay(str(path), url)
        report = await replay(str(path), url)
    assert report.accepted == 2 and intake.numbers() == [0, 1]


async def test_a_token_from_a_file_or_the_environment_is_sent_as_bearer(tmp_path):
    path = dead_letter_file(tmp_path, ["a"])
    tokens = tmp_path / "tokens"
    tokens.write_text("# the replay token\nreplay-token-0123456789\nother-token-0123456789\n")
    intake = Intake()
    async with serving(intake) as url:
        await replay(str(path), make_target(url, "token", token_file=str(tokens)))
        await replay(str(path), make_target(url, "token", environ={"FORWARDER_TOKEN": "env-token-0123456789"}),
                     from_start=True)
    assert [h["Authorization"] for h in intake.headers] == ["Bearer replay-token-0123456789",
                                                           "Bearer env-token-0123456789"]


async def test_a_dry_run_counts_per_project_and_error_code_and_sends_nothing(tmp_path):
    path = tmp_path / "dl.ndjson"
    path.write_bytes(dead_letters(["a", "a", "b"]) + dead_letters(["b"], code="ValidationException") + b"junk\n")
    report = await replay(str(path), "http://127.0.0.1:9", dry_run=True)
    assert dict(report.per_project) == {"a": 2, "b": 2}
    assert dict(report.per_code) == {"ThrottlingException": 3, "ValidationException": 1}
    assert report.unreadable_lines == 1 and not os.path.exists(f"{path}.replayed")


def test_the_progress_line_is_drawn_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    now = [0.0]
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        now[0] = 0.0
        progress = Progress(1000, stream, lambda: now[0])
        now[0] = 2.0
        progress.advance(500)
        progress.finish()
    assert "replay: 500/1,000 events (50%), 250 events/s" in terminal.getvalue()
    assert pipe.getvalue() == ""


async def test_a_hanging_intake_is_cut_at_the_deadline_of_the_whole_run(tmp_path):
    path = dead_letter_file(tmp_path, ["a", "b"])
    hang = asyncio.Event()
    answered: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        if answered:
            await hang.wait()  # the second request never gets an answer
        answered.append(request.match_info["project"])
        events = orjson.loads(await request.read())["events"]
        return web.json_response({"eventResults": [{"eventId": "x"} for _ in events], "failedEventCount": 0})

    app = web.Application()
    app.router.add_post("/events/projects/{project}", handle)
    async with local_server(app) as url:
        report = await asyncio.wait_for(replay(str(path), url, timeout=0.2), 5)
        hang.set()
    assert report.stopped == "timed out after 0.2 s" and report.accepted == 1


async def test_a_200_without_one_result_per_event_stops_the_run_and_commits_nothing(tmp_path):
    path = dead_letter_file(tmp_path, ["a", "a"])

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})  # not a forwarder's intake

    app = web.Application()
    app.router.add_post("/events/projects/{project}", handle)
    async with local_server(app) as url:
        with pytest.raises(ReplayError, match="without one result per event"):
            await replay(str(path), url)
    assert not os.path.exists(f"{path}.replayed")
