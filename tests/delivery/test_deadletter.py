"""The dead-letter file: one line per event with its error, rotated by size, never losing a line."""

from __future__ import annotations

import asyncio
import os

import orjson

from forwarder.delivery.deadletter import KEEP, DeadLetterWriter, lines


def entry(i: int) -> bytes:
    return lines("p", [orjson.dumps({"data": f'{{"i":{i}}}', "timestamp": 1, "type": "aws.evidently.custom"})],
                 "ValidationException", "bad", 1, 1_790_000_000.0, 1_790_000_001.0)


def read_all(path) -> list[int]:
    """Event numbers over the rotated files, oldest first."""
    files = [path.with_name(f"{path.name}.{k}") for k in range(KEEP, 0, -1)] + [path]
    out = []
    for f in files:
        if f.exists():
            out += [orjson.loads(orjson.loads(line)["event"]["data"])["i"] for line in f.read_bytes().splitlines()]
    return out


def test_a_line_holds_the_event_as_sent_and_why_it_was_refused():
    [line] = entry(7).splitlines()
    record = orjson.loads(line)
    assert record["event"] == {"data": '{"i":7}', "timestamp": 1, "type": "aws.evidently.custom"}
    assert (record["project"], record["errorCode"], record["errorMessage"], record["attempts"]) == \
        ("p", "ValidationException", "bad", 1)
    assert record["first_attempt_at"] == "2026-09-21T14:13:20Z"


async def test_past_max_bytes_the_file_rotates_newest_first_and_keeps_at_most_keep(tmp_path):
    path = tmp_path / "dl.ndjson"
    writer = DeadLetterWriter(str(path), max_bytes=len(entry(10)) * 3)  # three lines per file
    for i in range(10, 40):  # lines of one size
        await writer.write(entry(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl.ndjson"] + [f"dl.ndjson.{k}" for k in range(1, KEEP + 1)]
    assert read_all(path) == list(range(40 - 3 * (KEEP + 1), 40))  # the oldest files were dropped, in order
    assert [orjson.loads(orjson.loads(x)["event"]["data"])["i"]
            for x in (tmp_path / "dl.ndjson.1").read_bytes().splitlines()] == [34, 35, 36]


async def test_writes_racing_rotations_lose_and_interleave_no_line(tmp_path):
    path = tmp_path / "dl.ndjson"
    writer = DeadLetterWriter(str(path), max_bytes=len(entry(0)) * 50)
    await asyncio.gather(*(writer.write(entry(i)) for i in range(200)))
    assert sorted(read_all(path)) == list(range(200))  # 200 lines over 4 files: none dropped


async def test_the_dead_letter_file_and_its_rotations_are_readable_by_the_owner_only(tmp_path):
    # Dead letters hold whole events: other users of the machine must not read them,
    # whatever the umask (issue 21, item 7).
    path = tmp_path / "dl.ndjson"
    writer = DeadLetterWriter(str(path), max_bytes=len(entry(1)) * 2)
    previous = os.umask(0o022)
    try:
        for i in range(5):
            await writer.write(entry(i))
    finally:
        os.umask(previous)
    files = [path] + [path.with_name(f"dl.ndjson.{k}") for k in (1, 2)]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o600"}
