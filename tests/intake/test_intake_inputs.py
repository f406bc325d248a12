"""Every class of bad input gets a clear AWS-style answer, counted, never a 500 (issue 16, items 13-16, 20)."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
import zlib

import botocore.exceptions
import orjson
import pytest
from prometheus_client import CollectorRegistry

from forwarder.app import Forwarder
from forwarder.evidently.events import EventError, encode_all, encode_event, rfc3339_seconds
from tests.support import JSON, boto_client, head_and_body, make_config

PATH = "/events/projects/p"


@pytest.fixture
async def fwd(tmp_path, emulator):
    forwarder = Forwarder(make_config(tmp_path, emulator.url, intake={"max_body_bytes": 65536}),
                          credentials=("k", "s"), registry=CollectorRegistry(), process_metrics=False)
    await forwarder.start()
    forwarder.url = f"http://127.0.0.1:{forwarder.intake.port}"
    yield forwarder
    await forwarder.shutdown()


def rejected(fwd, reason: str) -> float:
    return fwd.metrics.registry.get_sample_value("forwarder_events_rejected_total", {"reason": reason}) or 0.0


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or 5 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def wire_body(events: list[dict]) -> bytes:
    return orjson.dumps({"events": events})


def padded_event(data: str = '{"k":1}', **fields) -> dict:
    return {"data": data, "timestamp": 1_790_000_000, "type": "aws.evidently.custom", **fields}


# --- 16.13: bodies that used to reach a 500 -------------------------------------------------

async def test_invalid_utf8_inside_data_of_a_large_wire_body_is_a_400_not_a_500(fwd, session):
    body = wire_body([padded_event('{"pad":"' + "x" * 1200 + '"}')]).replace(b"xxxx", b"\xff\xfe\xff\xfe", 1)
    assert len(body) >= 1024  # the msgspec fast path's size
    async with session.post(fwd.url + PATH, data=body, headers=JSON) as r:
        assert r.status == 400 and r.headers["x-amzn-ErrorType"] == "ValidationException"
        assert "not valid JSON" in (await r.json())["message"]
    assert rejected(fwd, "validation") == 1 and fwd.buffer.depth == 0


async def test_data_strings_nested_deeper_than_the_parsers_go_get_a_per_event_error(fwd, session):
    deep = '{"a":' * 1500 + "1" + "}" * 1500
    body = wire_body([padded_event(deep), padded_event()])
    async with session.post(fwd.url + PATH, data=body, headers=JSON) as r:
        answer = await r.json()
    assert r.status == 200 and answer["failedEventCount"] == 1
    assert "events[0].data" in answer["eventResults"][0]["errorMessage"] and "eventId" in answer["eventResults"][1]


async def test_data_strings_nested_a_thousand_levels_are_answered_without_an_error(fwd, session):
    deep = '{"a":' * 1000 + "1" + "}" * 1000  # msgspec's limit, within orjson's
    async with session.post(fwd.url + PATH, data=wire_body([padded_event(deep)]), headers=JSON) as r:
        assert r.status == 200 and (await r.json())["failedEventCount"] == 0


async def test_data_objects_nested_deeper_than_the_encoder_goes_get_a_per_event_error(fwd, session):
    deep = {}
    for _ in range(300):
        deep = {"a": deep}
    async with session.post(fwd.url + PATH, json={"events": [{"data": deep}, {"data": {}}]}) as r:
        answer = await r.json()
    assert r.status == 200 and answer["failedEventCount"] == 1
    assert "nests too deeply" in answer["eventResults"][0]["errorMessage"]


async def test_an_event_type_that_is_a_list_gets_a_per_event_error(fwd, session):
    async with session.post(fwd.url + PATH, json={"events": [{"data": {}, "type": [1]}]}) as r:
        answer = await r.json()
    assert r.status == 200 and "events[0].type" in answer["eventResults"][0]["errorMessage"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_corrupt_compressed_bodies_get_a_400_naming_the_encoding(fwd, session, encoding):
    body = gzip.compress(b'{"events":[{"data":{}}]}')[:-6] if encoding == "gzip" else b"x\x9c not deflate"
    async with session.post(fwd.url + PATH, data=body, headers={**JSON, "Content-Encoding": encoding}) as r:
        assert r.status == 400 and r.headers["x-amzn-ErrorType"] == "BadRequestException"
        assert encoding in (await r.json())["message"]
    assert rejected(fwd, "bad_encoding") == 1


@pytest.mark.parametrize("compress", [gzip.compress, zlib.compress, lambda b: zlib.compress(b)[2:-4]],
                         ids=["gzip", "deflate", "raw-deflate"])
async def test_compressed_bodies_are_decoded(fwd, emulator, session, compress):
    encoding = "gzip" if compress is gzip.compress else "deflate"
    body = compress(orjson.dumps({"events": [{"data": {"n": i}} for i in range(3)]}))
    async with session.post(fwd.url + PATH, data=body, headers={**JSON, "Content-Encoding": encoding}) as r:
        assert r.status == 200 and (await r.json())["failedEventCount"] == 0
    assert fwd.metrics.events_received.value == 3


async def test_a_compressed_body_that_decodes_beyond_max_body_bytes_gets_413(fwd, session):
    bomb = gzip.compress(b'{"events":[{"data":{"pad":"' + b"x" * 10_000_000 + b'"}}]}')
    assert len(bomb) < 65536  # under intake.max_body_bytes as sent
    async with session.post(fwd.url + PATH, data=bomb, headers={**JSON, "Content-Encoding": "gzip"}) as r:
        assert r.status == 413 and "intake.max_body_bytes (65536)" in (await r.json())["message"]
    assert fwd.buffer.depth == 0


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress"])
async def test_unsupported_content_encodings_get_415_naming_the_supported_ones(fwd, session, encoding):
    async with session.post(fwd.url + PATH, data=b"{}", headers={**JSON, "Content-Encoding": encoding}) as r:
        assert r.status == 415 and r.headers["x-amzn-ErrorType"] == "UnsupportedMediaTypeException"
        assert "gzip, deflate, identity" in (await r.json())["message"]


@pytest.mark.parametrize("request_bytes", [
    b"HELLO\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /events/projects/p HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n",
], ids=["garbage", "version", "chunk-size", "header-line"])
async def test_malformed_http_gets_an_aws_style_400_and_is_counted(fwd, request_bytes):
    status, headers, body = head_and_body(await raw_exchange(fwd.intake.port, request_bytes))
    assert status == 400 and headers["x-amzn-errortype"] == "BadRequestException"
    assert headers["content-type"].startswith("application/json") and "x-amzn-requestid" in headers
    assert json.loads(body)["message"].startswith("malformed HTTP request")
    assert rejected(fwd, "malformed_http") == 1


async def test_a_header_beyond_aiohttps_field_limit_gets_an_aws_style_431(fwd):
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n"
    status, headers, _ = head_and_body(await raw_exchange(fwd.intake.port, request))
    assert status == 431 and headers["x-amzn-errortype"] == "RequestHeaderFieldsTooLargeException"
    assert rejected(fwd, "headers_too_large") == 1


# --- 16.14: one timestamp rule, RFC 3339 only ---------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("2026-01-01T00:00:00Z", 1_767_225_600.0),
    ("2026-01-01t01:30:00+01:30", 1_767_225_600.0),
    ("2025-12-31T19:00:00-05:00", 1_767_225_600.0),
    ("2026-01-01T00:00:00.25Z", 1_767_225_600.25),
    ("2016-12-31T23:59:60Z", 1_483_228_800.0),  # a leap second
    ("1970-01-01T00:00:00Z", 0.0),
])
def test_rfc3339_date_times_are_read_with_their_offset(text, seconds):
    assert rfc3339_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "2026-W01-1T00:00:00Z",  # ISO week date
    "20260101T000000Z",  # ISO basic format
    "2026-01-01T00:00:00",  # no offset
    "2026-01-01 00:00:00Z",  # space separator
    "2026-01-01",  # a date
    "2026-02-30T00:00:00Z",  # no such day
    "2026-01-01T00:00:00+24:00",  # no such offset
    "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",  # full-width digits
])
def test_anything_but_an_rfc3339_date_time_is_not_read(text):
    assert rfc3339_seconds(text) is None


@pytest.mark.parametrize("timestamp", ["1969-12-31T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
                                       -86400, 1e11])
def test_string_and_numeric_timestamps_share_one_range(timestamp):
    _, errors = encode_all([{"data": {}, "timestamp": timestamp}], 0.0)
    assert len(errors) == 1 and "1e11" in errors[0][1] and "1970-01-01T00:00:00Z" in errors[0][1]


@pytest.mark.parametrize("size", ["small", "fast-path"])
async def test_out_of_range_and_non_rfc3339_strings_are_refused_per_event_over_http(fwd, session, size):
    pad = "x" * (600 if size == "fast-path" else 0)
    events = [padded_event('{"pad":"' + pad + '"}', timestamp=ts)
              for ts in ("1969-12-31T00:00:00Z", "20260101T000000Z", "2026-01-01T00:00:00Z")]
    body = wire_body(events)
    assert (len(body) >= 1024) == (size == "fast-path")
    async with session.post(fwd.url + PATH, data=body, headers=JSON) as r:
        answer = await r.json()
    assert answer["failedEventCount"] == 2
    assert [("eventId" in e) for e in answer["eventResults"]] == [False, False, True]


def test_an_event_error_names_the_field():
    with pytest.raises(EventError, match=r"events\[0\]\.timestamp"):
        encode_event({"data": {}, "timestamp": "2026-W01-1T00:00:00Z"}, 0, 0.0)


# --- 16.15: absolute-form request targets -----------------------------------------------------------

async def test_an_absolute_form_target_gets_a_400_saying_so(fwd):
    request = (b"POST http://evil/events/projects/demo HTTP/1.1\r\nHost: localhost\r\n"
               b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    status, headers, body = head_and_body(await raw_exchange(fwd.intake.port, request))
    message = json.loads(body)["message"]
    assert status == 400 and "absolute-form" in message and "http://evil/events/projects/demo" in message
    assert "s/projects/demo" not in message.replace("http://evil/events/projects/demo", "")


# --- 16.16: a request id on every answer --------------------------------------------------------

async def test_every_answer_carries_a_uuid_shaped_request_id(fwd, session):
    answers = []
    async with session.post(fwd.url + PATH, json={"events": [{"data": {}}]}) as r:
        answers.append(r.headers.get("x-amzn-RequestId"))
    async with session.post(fwd.url + PATH, data=b"nope", headers=JSON) as r:
        answers.append(r.headers.get("x-amzn-RequestId"))
    for path in ("/healthz", "/readyz", "/metrics", "/nowhere"):
        async with session.get(fwd.url + path) as r:
            answers.append(r.headers.get("x-amzn-RequestId"))
    _, headers, _ = head_and_body(await raw_exchange(fwd.intake.port, b"HELLO\r\n\r\n"))
    answers.append(headers.get("x-amzn-requestid"))
    assert None not in answers and len(set(answers)) == len(answers) == 7
    assert all(str(uuid.UUID(a)) == a for a in answers)


async def test_boto3_sees_the_request_id_of_accepted_and_refused_calls(fwd):
    client = boto_client(fwd.url)
    answer = await asyncio.to_thread(client.put_project_events, project="p", events=[
        {"data": json.dumps({"k": 1}), "timestamp": 1_790_000_000, "type": "aws.evidently.custom"}])
    assert answer["ResponseMetadata"]["RequestId"]
    with pytest.raises(botocore.exceptions.ClientError) as err:
        await asyncio.to_thread(client.put_project_events, project="bad name!", events=[])
    assert err.value.response["ResponseMetadata"]["RequestId"]


# --- 16.20: web pages cannot post ---------------------------------------------------------------

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/octet-stream"])
async def test_non_json_content_types_get_415_naming_the_accepted_ones(fwd, session, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with session.post(fwd.url + PATH, data=b'{"events":[{"data":{}}]}', headers=headers,
                            skip_auto_headers=["Content-Type"]) as r:
        assert r.status == 415 and r.headers["x-amzn-ErrorType"] == "UnsupportedMediaTypeException"
        assert "application/json" in (await r.json())["message"]
    assert fwd.buffer.depth == 0 and rejected(fwd, "unsupported_media_type") == 1


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8",
                                          "application/x-ndjson"])
async def test_json_and_ndjson_content_types_are_accepted(fwd, session, content_type):
    body = b'{"data":{"n":1}}\n{"data":{"n":2}}\n' if "ndjson" in content_type else \
        b'{"events":[{"data":{"n":1}},{"data":{"n":2}}]}'
    async with session.post(fwd.url + PATH, data=body, headers={"Content-Type": content_type}) as r:
        assert r.status == 200 and (await r.json())["failedEventCount"] == 0
    assert fwd.metrics.events_received.value == 2


async def test_a_request_a_browser_sends_with_an_origin_is_refused_and_nothing_is_buffered(fwd, session):
    async with session.post(fwd.url + PATH, json={"events": [{"data": {}}]},
                            headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403 and r.headers["x-amzn-ErrorType"] == "AccessDeniedException"
        assert "Origin" in (await r.json())["message"]
    assert fwd.buffer.depth == 0 and rejected(fwd, "forbidden") == 1


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example:{port}", 403), ("rebind.attacker.test", 403), ("10.0.0.1:{port}", 403),
    ("localhost:{port}", 200), ("127.0.0.1:{port}", 200), ("127.8.9.10", 200), ("[::1]:{port}", 200),
    ("app.localhost", 200), ("LOCALHOST.", 200),
])
async def test_a_loopback_listener_answers_only_host_names_of_this_machine(fwd, session, host, status):
    headers = {"Host": host.format(port=fwd.intake.port)}
    async with session.get(fwd.url + "/healthz", headers=headers) as r:
        assert r.status == status
        if status == 403:
            assert "DNS rebinding" in (await r.json())["message"]


async def test_every_refusal_kind_is_counted_under_its_reason(fwd, session):
    async with session.post(fwd.url + PATH, data=b"{}", headers={"Content-Type": "text/plain"}):
        pass
    async with session.post(fwd.url + PATH, json={}, headers={"Origin": "null"}):
        pass
    async with session.get(fwd.url + "/healthz", headers={"Host": "evil"}):
        pass
    async with session.get(fwd.url + "/nowhere"):
        pass
    await raw_exchange(fwd.intake.port, b"HELLO\r\n\r\n")
    assert [rejected(fwd, r) for r in ("unsupported_media_type", "forbidden", "unknown_operation",
                                       "malformed_http")] == [1, 2, 1, 1]

