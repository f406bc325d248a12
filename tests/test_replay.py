"""``forwarder replay``: dead letters back through an intake, retrying 429/503 within a deadline."""

from __future__ import annotations

from contextlib import asynccontextmanager

import orjson
import pytest
from aiohttp import web

from forwarder.delivery.deadletter import lines
from forwarder.replay import MAX_ATTEMPTS, ReplayError, replay
from tests.fakes import local_server


def dead_letter_file(tmp_path, projects: list[str], extra: bytes = b""):
    path = tmp_path / "dl.ndjson"
    body = b"".join(lines(p, [orjson.dumps({"data": f'{{"i":{i}}}', "timestamp": 1, "type": "aws.evidently.custom"})],
                          "ThrottlingException", "slow", 3, 1.0, 2.0) for i, p in enumerate(projects))
    path.write_bytes(body + extra)
    return path


@asynccontextmanager
async def intake(answers: list[tuple[int, dict[str, str]]]):
    """An intake on 127.0.0.1 answering from ``answers`` (status, headers), then 200s; keeps what it got."""
    got: list[tuple[str, list[dict]]] = []

    async def handle(request: web.Request) -> web.Response:
        events = orjson.loads(await request.read())["events"]
        assert request.headers["Content-Type"] == "application/json"
        if answers:
            status, headers = answers.pop(0)
            return web.json_response({"message": "busy"}, status=status, headers=headers)
        got.append((request.match_info["project"], events))
        return web.json_response({"eventResults": [{"eventId": "x"} for _ in events], "failedEventCount": 0})

    app = web.Application()
    app.router.add_post("/events/projects/{project}", handle)
    async with local_server(app) as url:
        yield url, got


class Sleeps:
    def __init__(self) -> None:
        self.waited: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waited.append(seconds)


async def test_events_go_back_to_their_own_projects_and_unreadable_lines_are_counted(tmp_path):
    path = dead_letter_file(tmp_path, ["a", "b", "a"], extra=b"not json\n{\"event\": 5}\n\n")
    async with intake([]) as (url, got):
        report = await replay(str(path), url)
    assert sorted((p, len(evs)) for p, evs in got) == [("a", 2), ("b", 1)]
    assert (report.accepted, report.rejected, report.unreadable_lines) == (3, 0, 2)


async def test_project_sends_every_event_to_one_project(tmp_path):
    path = dead_letter_file(tmp_path, ["a", "b"])
    async with intake([]) as (url, got):
        await replay(str(path), url, project="elsewhere")
    assert [(p, len(evs)) for p, evs in got] == [("elsewhere", 2)]


async def test_429_and_503_are_retried_after_their_retry_after(tmp_path):
    path = dead_letter_file(tmp_path, ["a"])
    sleeps = Sleeps()
    async with intake([(429, {"Retry-After": "2"}), (503, {"Retry-After": "1"})]) as (url, got):
        report = await replay(str(path), url, sleep=sleeps)
    assert sleeps.waited == [2.0, 1.0]
    assert report.accepted == 1 and len(got) == 1


async def test_retries_stop_after_max_attempts_and_count_the_events_rejected(tmp_path):
    path = dead_letter_file(tmp_path, ["a"])
    sleeps = Sleeps()
    async with intake([(429, {"Retry-After": "1"})] * MAX_ATTEMPTS) as (url, got):
        report = await replay(str(path), url, sleep=sleeps)
    assert len(sleeps.waited) == MAX_ATTEMPTS - 1 and got == []
    assert report.rejected == 1 and "HTTP 429" in next(iter(report.reasons))


async def test_no_retry_waits_past_the_overall_deadline(tmp_path):
    path = dead_letter_file(tmp_path, ["a"])
    sleeps = Sleeps()
    async with intake([(503, {"Retry-After": "5"})]) as (url, got):
        report = await replay(str(path), url, timeout=3.0, sleep=sleeps)
    assert sleeps.waited == [] and report.rejected == 1


async def test_a_missing_file_and_an_unreachable_intake_are_replay_errors(tmp_path):
    with pytest.raises(ReplayError, match="cannot read"):
        await replay(str(tmp_path / "nope"), "http://127.0.0.1:9")
    path = dead_letter_file(tmp_path, ["a"])
    with pytest.raises(ReplayError, match="cannot reach the intake"):
        await replay(str(path), "http://127.0.0.1:9")
