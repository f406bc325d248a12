"""The local Evidently emulator: wire protocol through a real boto3 client, faults, control API."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from urllib.parse import quote

import aiohttp
import boto3
import botocore.config
import orjson
import pytest
from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from forwarder.app import Forwarder
from forwarder.config import from_dict
from forwarder.emulator.faults import FaultConfig
from forwarder.emulator.server import Emulator
from forwarder.emulator.cli import add_cli_arguments, credentials_from_args, faults_from_args
from forwarder.emulator.decisions import MAX_BODY_BYTES
from forwarder.emulator.harness import ForwarderProcess, delivered
from tests import support

ARN = "arn:aws:evidently:us-east-1:123456789012:project/shop"
SIGNED = {
    "Authorization": (
        "AWS4-HMAC-SHA256 Credential=AKIDRAW/20240101/us-east-1/evidently/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64
    ),
    "X-Amz-Date": "20240101T000000Z",
}
_SESSION = boto3.Session()  # shares the loaded service model across tests


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make_emulator():
    started: list[Emulator] = []

    async def make(faults: FaultConfig | None = None, clock=None) -> Emulator:
        emulator = Emulator(faults, clock=clock) if clock else Emulator(faults)
        await emulator.start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        await emulator.close()


@pytest.fixture
async def emulator(make_emulator):
    return await make_emulator(FaultConfig(seed=7))


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def client(emulator: Emulator, access_key: str = "k", validate: bool = True):
    return _SESSION.client(
        "evidently",
        region_name="us-east-1",
        endpoint_url=emulator.url,
        aws_access_key_id=access_key,
        aws_secret_access_key="s",
        config=botocore.config.Config(
            inject_host_prefix=False,
            retries={"total_max_attempts": 1},
            parameter_validation=validate,
        ),
    )


async def put(evidently, project: str, batch: list[dict]) -> dict:
    return await asyncio.to_thread(evidently.put_project_events, project=project, events=batch)


async def put_error(evidently, project: str, batch: list[dict]) -> ClientError:
    with pytest.raises(ClientError) as caught:
        await put(evidently, project, batch)
    return caught.value


async def post_raw(http, emulator: Emulator, body, headers=SIGNED, project: str = "shop"):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(f"{emulator.url}/events/projects/{project}", data=data, headers=headers) as resp:
        return resp.status, resp.headers.get("x-amzn-ErrorType"), await resp.json()


async def get_json(http, emulator: Emulator, path: str):
    async with http.get(emulator.url + path) as resp:
        return resp.status, await resp.json()


async def post_json(http, emulator: Emulator, path: str, body):
    async with http.post(emulator.url + path, data=orjson.dumps(body)) as resp:
        return resp.status, await resp.json()


# --- accepted calls ---


async def test_a_boto3_call_gets_event_ids_and_the_events_are_recorded(emulator):
    answer = await put(client(emulator, "AKIDONE"), "shop", support.event_dicts(3))

    assert answer["failedEventCount"] == 0
    assert [set(r) for r in answer["eventResults"]] == [{"eventId"}] * 3
    assert len({r["eventId"] for r in answer["eventResults"]}) == 3
    assert [(e.project, json.loads(e.data)["i"], e.type, e.access_key) for e in emulator.accepted] == [
        ("shop", i, "aws.evidently.custom", "AKIDONE") for i in range(3)
    ]
    assert emulator.accepted[0].timestamp == 1700000000


async def test_an_arn_project_percent_encoded_by_boto3_is_recorded_as_the_arn(emulator, http):
    await put(client(emulator), ARN, support.event_dicts(1))

    _, body = await get_json(http, emulator, f"/_emulator/events?project={ARN}")
    assert [e["project"] for e in body["events"]] == [ARN]


async def test_events_listing_filters_by_project_and_keeps_arrival_order_and_batch(emulator, http):
    evidently = client(emulator)
    await put(evidently, "a", support.event_dicts(2))
    await put(evidently, "b", support.event_dicts(1))
    await put(evidently, "a", support.event_dicts(1, start=5))

    _, body = await get_json(http, emulator, "/_emulator/events?project=a")
    assert [(json.loads(e["data"])["i"], e["batch"]) for e in body["events"]] == [(0, 1), (1, 1), (5, 3)]
    _, everything = await get_json(http, emulator, "/_emulator/events")
    assert len(everything["events"]) == 4


async def test_an_empty_batch_is_accepted_with_no_results(emulator):
    answer = await put(client(emulator), "shop", [])

    assert answer["eventResults"] == [] and answer["failedEventCount"] == 0


# --- validation ---


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"not json", "request body"),
        ([1], "request body"),
        ({}, "events is required"),
        ({"events": {"data": "{}"}}, "events is required"),
        ({"events": support.event_dicts(51)}, "at most 50 events, got 51"),
        ({"events": [*support.event_dicts(3), "x"]}, "events[3] must be an object"),
        ({"events": [{"timestamp": 1, "type": "aws.evidently.custom"}]}, "events[0].data"),
        ({"events": [{"data": {"a": 1}, "timestamp": 1, "type": "aws.evidently.custom"}]}, "events[0].data"),
        ({"events": [*support.event_dicts(3), {"data": "[1]", "timestamp": 1, "type": "aws.evidently.custom"}]},
         "events[3].data must be a string holding a JSON object"),
        ({"events": [{"data": "{oops", "timestamp": 1, "type": "aws.evidently.custom"}]}, "events[0].data"),
        ({"events": [{"data": "{}", "timestamp": True, "type": "aws.evidently.custom"}]}, "events[0].timestamp"),
        ({"events": [{"data": "{}", "timestamp": "1", "type": "aws.evidently.custom"}]}, "events[0].timestamp"),
        ({"events": [*support.event_dicts(2), {"data": "{}", "timestamp": -1, "type": "aws.evidently.custom"}]},
         "events[2].timestamp must not be before 1970"),
        ({"events": [{"data": "{}", "type": "aws.evidently.custom"}]}, "events[0].timestamp"),
        ({"events": [{"data": "{}", "timestamp": 1.5, "type": "custom"}]}, "events[0].type"),
        ({"events": [{"data": "{}", "timestamp": 1}]}, "events[0].type"),
    ],
)
async def test_an_invalid_body_gets_400_validation_naming_the_field(emulator, http, body, named):
    status, error_type, answer = await post_raw(http, emulator, body)

    assert (status, error_type) == (400, "ValidationException")
    assert named in answer["message"]
    assert emulator.accepted == []


@pytest.mark.parametrize(
    ("project", "named"),
    [("bad%20name", "project"), ("a/b", "one path segment"), ("x" * 2049, "at most 2048")],
)
async def test_an_invalid_project_gets_400_validation(emulator, http, project, named):
    status, error_type, answer = await post_raw(http, emulator, {"events": support.event_dicts(1)}, project=project)

    assert (status, error_type) == (400, "ValidationException")
    assert named in answer["message"]


async def test_boto3_parses_validation_errors_as_validation_exception_naming_the_field(emulator):
    evidently = client(emulator, validate=False)
    as_list = [{"data": "[1, 2]", "timestamp": 1, "type": "aws.evidently.custom"}]
    bad_type = [*support.event_dicts(2), {"data": "{}", "timestamp": 1, "type": "aws.evidently.other"}]

    list_error = await put_error(evidently, "shop", as_list)
    type_error = await put_error(evidently, "shop", bad_type)
    too_many = await put_error(evidently, "shop", support.event_dicts(51))

    assert list_error.response["Error"]["Code"] == "ValidationException"
    assert "events[0].data" in list_error.response["Error"]["Message"]
    assert "events[2].type" in type_error.response["Error"]["Message"]
    assert too_many.response["ResponseMetadata"]["HTTPStatusCode"] == 400


# --- what the model leaves open, every answer's request id ---


def padded_body(size: int) -> bytes:
    """A valid one-event PutProjectEvents body of exactly ``size`` bytes."""
    def body(pad: int) -> bytes:
        return orjson.dumps({"events": [{"data": json.dumps({"p": "x" * pad}), "timestamp": 1,
                                         "type": "aws.evidently.custom"}]})
    built = body(size - len(body(0)))
    assert len(built) == size
    return built


async def test_a_body_at_the_size_limit_is_accepted_and_one_byte_more_gets_413(emulator, http):
    at_limit = await post_raw(http, emulator, padded_body(MAX_BODY_BYTES))
    over = await post_raw(http, emulator, padded_body(MAX_BODY_BYTES + 1))

    assert at_limit[0] == 200
    assert over[:2] == (413, "PayloadTooLargeException")
    assert f"at most {MAX_BODY_BYTES} bytes" in over[2]["message"]
    assert len(emulator.accepted) == 1
    assert emulator.stats_dict()["requests_by_status"] == {"200": 1, "413": 1}


async def test_a_chunked_body_over_the_size_limit_gets_413_without_a_content_length(emulator, http):
    body = padded_body(MAX_BODY_BYTES + 1)

    async def chunks():
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    async with http.post(f"{emulator.url}/events/projects/shop", data=chunks(), headers=SIGNED) as resp:
        assert "Content-Length" not in resp.request_info.headers
        status, error_type = resp.status, resp.headers.get("x-amzn-ErrorType")

    assert (status, error_type) == (413, "PayloadTooLargeException")
    assert emulator.accepted == []


async def test_event_ids_match_the_uuid_shape_of_the_api_model(emulator):
    shape = _SESSION._session.get_service_model("evidently").shape_for("Uuid")
    pattern = re.compile(shape.metadata["pattern"])

    answer = await put(client(emulator), "shop", support.event_dicts(50))

    ids = [r["eventId"] for r in answer["eventResults"]]
    assert all(pattern.fullmatch(i) and len(i) == shape.metadata["max"] for i in ids), ids[:3]
    assert len(set(ids)) == 50


async def test_boto3_reads_the_request_id_of_an_accepted_call(emulator):
    answer = await put(client(emulator), "shop", support.event_dicts(1))

    assert re.fullmatch(r"[0-9a-f-]{36}", answer["ResponseMetadata"]["RequestId"])


async def test_every_answer_carries_a_request_id_and_errors_are_aws_style(make_emulator, http):
    emulator = await make_emulator(FaultConfig(quota=1))
    put_url = f"{emulator.url}/events/projects/shop"
    valid = orjson.dumps({"events": support.event_dicts(1)})
    calls = [
        ("POST", put_url, valid, SIGNED, 200),
        ("POST", put_url, valid, SIGNED, 429),
        ("POST", put_url, b"{}", {}, 403),
        ("GET", f"{emulator.url}/_emulator/events", None, {}, 200),
        ("GET", f"{emulator.url}/_emulator/stats", None, {}, 200),
        ("GET", f"{emulator.url}/_emulator/config", None, {}, 200),
        ("POST", f"{emulator.url}/_emulator/config", b"[1]", {}, 400),
        ("POST", f"{emulator.url}/_emulator/reset", None, {}, 200),
        ("GET", f"{emulator.url}/healthz", None, {}, 200),
        ("GET", f"{emulator.url}/nowhere", None, {}, 404),
        ("GET", put_url, None, {}, 405),
    ]
    request_ids = []
    for method, url, body, headers, expected in calls:
        async with http.request(method, url, data=body, headers=headers) as resp:
            assert resp.status == expected, (method, url, await resp.text())
            request_ids.append(resp.headers.get("x-amzn-RequestId"))
            if resp.status >= 400:
                assert resp.headers.get("x-amzn-ErrorType"), (method, url)
                assert "message" in await resp.json(), (method, url)

    assert all(rid and re.fullmatch(r"[0-9a-f-]{36}", rid) for rid in request_ids), request_ids
    assert len(set(request_ids)) == len(calls)


@pytest.mark.e2e
async def test_forwarder_run_never_imports_the_emulator_or_the_test_harness(tmp_path, procs, http):
    """A real ``forwarder run`` up to ready and a clean stop, with every import it made logged."""
    fwd = procs(ForwarderProcess(tmp_path, {"evidently": {"endpoint_url": "http://127.0.0.1:9"}},
                                 env={"PYTHONPROFILEIMPORTTIME": "1"}))
    await fwd.ready(http)
    fwd.terminate()
    assert await fwd.wait(30) == 0

    imported = {line.rsplit("|", 1)[1].strip() for line in fwd.logs().splitlines()
                if line.startswith("import time:") and "|" in line}
    ours = {name for name in imported if name.startswith("forwarder")}
    assert {"forwarder.app", "forwarder.intake.http", "forwarder.delivery.sender"} <= ours  # the log is the daemon's
    assert [n for n in ours if n.startswith("forwarder.emulator")] == []


# --- authentication ---


@pytest.mark.parametrize(
    ("headers", "error_type"),
    [
        ({}, "MissingAuthenticationTokenException"),
        ({**SIGNED, "Authorization": "Bearer abc"}, "IncompleteSignatureException"),
        ({**SIGNED, "Authorization": SIGNED["Authorization"].replace("/evidently/", "/s3/")},
         "IncompleteSignatureException"),
        ({**SIGNED, "Authorization": SIGNED["Authorization"][:-1]}, "IncompleteSignatureException"),
        ({"Authorization": SIGNED["Authorization"]}, "IncompleteSignatureException"),
    ],
)
async def test_missing_or_malformed_authorization_gets_403(emulator, http, headers, error_type):
    status, got_type, _ = await post_raw(http, emulator, {"events": support.event_dicts(1)}, headers=headers)

    assert (status, got_type) == (403, error_type)
    assert emulator.accepted == []


async def test_the_raw_signed_request_records_the_access_key_from_the_credential(emulator, http):
    status, _, _ = await post_raw(http, emulator, {"events": support.event_dicts(1)})

    assert status == 200
    assert emulator.accepted[0].access_key == "AKIDRAW"


# --- SigV4 verification (--credentials) ---


def signed_headers(url: str, body: bytes, key: str = "AKIDGOOD", secret: str = "good-secret",
                   region: str = "us-east-1") -> dict[str, str]:
    """The headers botocore's SigV4 signer gives a POST of ``body`` to ``url`` (aiohttp adds Host and the length)."""
    _, headers = support.sign(url, body, key, secret, region)
    return {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}


@pytest.fixture
async def verifying():
    emulator = Emulator(FaultConfig(), credentials={"AKIDGOOD": "good-secret", "AKIDOTHER": "other-secret"})
    await emulator.start()
    yield emulator
    await emulator.close()


async def test_with_credentials_a_correctly_signed_boto3_call_is_accepted_under_its_key(verifying):
    evidently = _SESSION.client(
        "evidently", region_name="us-east-1", endpoint_url=verifying.url, aws_access_key_id="AKIDOTHER",
        aws_secret_access_key="other-secret",
        config=botocore.config.Config(inject_host_prefix=False, retries={"total_max_attempts": 1}))

    answer = await put(evidently, ARN, support.event_dicts(2))

    assert answer["failedEventCount"] == 0
    assert [(e.project, e.access_key) for e in verifying.accepted] == [(ARN, "AKIDOTHER")] * 2


@pytest.mark.parametrize(("signer", "error_type", "named"), [
    ({"secret": "wrong-secret"}, "InvalidSignatureException", "does not match the signature you provided"),
    ({"key": "AKIDUNKNOWN"}, "UnrecognizedClientException", "not one of --credentials"),
    ({"region": "eu-west-1"}, "InvalidSignatureException", "this emulator verifies 'us-east-1' (--region)"),
])
async def test_with_credentials_a_bad_signature_gets_403_naming_what_is_wrong(verifying, http, signer, error_type,
                                                                               named):
    url = f"{verifying.url}/events/projects/shop"
    body = orjson.dumps({"events": support.event_dicts(1)})

    status, got_type, answer = await post_raw(http, verifying, body, signed_headers(url, body, **signer))

    assert (status, got_type) == (403, error_type)
    assert named in answer["message"]
    assert verifying.accepted == []


async def test_with_credentials_a_body_changed_after_signing_is_refused(verifying, http):
    url = f"{verifying.url}/events/projects/shop"
    headers = signed_headers(url, orjson.dumps({"events": support.event_dicts(1)}))

    changed = orjson.dumps({"events": support.event_dicts(1, start=1)})
    status, got_type, _ = await post_raw(http, verifying, changed, headers)
    good = await post_raw(http, verifying, orjson.dumps({"events": support.event_dicts(1)}), headers)

    assert (status, got_type) == (403, "InvalidSignatureException")
    assert good[0] == 200
    assert [json.loads(e.data)["i"] for e in verifying.accepted] == [0]


async def test_with_credentials_a_signature_from_an_hour_ago_has_expired(http):
    emulator = Emulator(credentials={"AKIDGOOD": "good-secret"}, wall_clock=lambda: time.time() + 3600)
    await emulator.start()
    try:
        url = f"{emulator.url}/events/projects/shop"
        body = orjson.dumps({"events": support.event_dicts(1)})
        status, got_type, answer = await post_raw(http, emulator, body, signed_headers(url, body))
    finally:
        await emulator.close()

    assert (status, got_type) == (403, "InvalidSignatureException")
    assert "Signature expired" in answer["message"]


async def test_the_forwarders_own_calls_verify_against_a_strict_emulator(tmp_path, verifying, http):
    config = from_dict({"intake": {"port": 0}, "batch": {"flush_interval": 0.05},
                        "evidently": {"endpoint_url": verifying.url},
                        "dead_letter": {"path": str(tmp_path / "dl.ndjson")}}, {})
    fwd = Forwarder(config, credentials=("AKIDGOOD", "good-secret"), registry=CollectorRegistry(),
                    process_metrics=False)
    await fwd.start()
    try:
        url = f"http://127.0.0.1:{fwd.intake.port}/events/projects/{quote(ARN, safe='')}"
        async with http.post(url, json={"events": [{"data": {"i": i}} for i in range(120)]}) as resp:
            assert resp.status == 200, await resp.text()
        arrived = await delivered(http, verifying.url, 120, timeout=10)
    finally:
        await fwd.shutdown()

    assert sorted(json.loads(e["data"])["i"] for e in arrived) == list(range(120))
    assert {(e["project"], e["access_key"]) for e in arrived} == {(ARN, "AKIDGOOD")}
    assert verifying.stats_dict()["requests_by_status"] == {"200": 3}  # 50 + 50 + 20, none refused


# --- request quota ---


async def test_quota_answers_429_throttling_above_the_rate_and_refills_with_time(make_emulator):
    clock = FakeClock()
    emulator = await make_emulator(FaultConfig(quota=2), clock=clock)
    evidently = client(emulator)

    await put(evidently, "shop", support.event_dicts(1))
    await put(evidently, "shop", support.event_dicts(1))
    with pytest.raises(evidently.exceptions.ThrottlingException):
        await put(evidently, "shop", support.event_dicts(1))
    clock.now += 0.5  # one token at 2/s
    await put(evidently, "shop", support.event_dicts(1))
    with pytest.raises(evidently.exceptions.ThrottlingException):
        await put(evidently, "shop", support.event_dicts(1))

    stats = emulator.stats_dict()
    assert stats["throttled_requests"] == 2
    assert stats["requests_by_status"] == {"200": 3, "429": 2}
    assert stats["access_keys"]["k"] == {"accepted_events": 3, "requests": 5, "throttled": 2}


async def test_quota_is_shared_by_all_access_keys_and_burst_sets_the_bucket_size(make_emulator):
    clock = FakeClock()
    emulator = await make_emulator(FaultConfig(quota=1, quota_burst=3), clock=clock)
    first, second = client(emulator, "AKID1"), client(emulator, "AKID2")

    for evidently in (first, second, first):
        await put(evidently, "shop", support.event_dicts(1))
    error = await put_error(second, "shop", support.event_dicts(1))

    assert error.response["Error"]["Code"] == "ThrottlingException"
    assert "Rate exceeded" in error.response["Error"]["Message"]
    assert emulator.stats_dict()["access_keys"]["AKID2"]["throttled"] == 1


# --- per-event faults ---


async def test_per_event_throttling_shows_in_results_and_the_failed_count(make_emulator):
    emulator = await make_emulator(FaultConfig(throttle_event_rate=0.5, seed=3))

    answer = await put(client(emulator), "shop", support.event_dicts(50))

    failed = [r for r in answer["eventResults"] if "errorCode" in r]
    assert 0 < len(failed) < 50
    assert {r["errorCode"] for r in failed} == {"ThrottlingException"}
    assert answer["failedEventCount"] == len(failed)
    assert len(emulator.accepted) == 50 - len(failed)
    assert emulator.stats_dict()["events_failed_by_code"] == {"ThrottlingException": len(failed)}


async def test_invalid_events_are_the_same_events_on_every_attempt(make_emulator):
    emulator = await make_emulator(FaultConfig(invalid_event_rate=0.3))
    evidently = client(emulator)
    batch = support.event_dicts(50)

    def invalid(answer):
        return [i for i, r in enumerate(answer["eventResults"]) if r.get("errorCode") == "ValidationException"]

    first = invalid(await put(evidently, "shop", batch))
    second = invalid(await put(evidently, "shop", batch))

    assert 0 < len(first) < 50
    assert first == second
    assert all(json.loads(e.data)["i"] not in first for e in emulator.accepted)


async def test_a_reject_marker_fails_the_whole_request_naming_the_event(make_emulator):
    emulator = await make_emulator(FaultConfig(reject_marker="POISON"))
    evidently = client(emulator)
    batch = [*support.event_dicts(2), *support.event_dicts(1, start=2, note="POISON here")]

    error = await put_error(evidently, "shop", batch)
    await put(evidently, "shop", support.event_dicts(2))

    assert error.response["Error"]["Code"] == "ValidationException"
    assert "events[2]" in error.response["Error"]["Message"]
    assert len(emulator.accepted) == 2


async def test_error_rate_one_answers_500_internal_server_error(make_emulator):
    emulator = await make_emulator(FaultConfig(error_rate=1.0))

    error = await put_error(client(emulator), "shop", support.event_dicts(1))

    assert error.response["Error"]["Code"] == "InternalServerException"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert emulator.accepted == []


# --- projects, down mode ---


async def test_missing_and_denied_projects_get_404_and_403(make_emulator):
    emulator = await make_emulator(FaultConfig(missing_projects=("gone",), denied_projects=(ARN,)))
    evidently = client(emulator)

    with pytest.raises(evidently.exceptions.ResourceNotFoundException):
        await put(evidently, "gone", support.event_dicts(1))
    with pytest.raises(evidently.exceptions.AccessDeniedException):
        await put(evidently, ARN, support.event_dicts(1))
    await put(evidently, "shop", support.event_dicts(1))

    assert [e.project for e in emulator.accepted] == ["shop"]


async def test_down_mode_answers_503_until_switched_back_up_over_http(emulator, http):
    evidently = client(emulator)

    status, config = await post_json(http, emulator, "/_emulator/config", {"down": True})
    error = await put_error(evidently, "shop", support.event_dicts(1))
    _, health = await get_json(http, emulator, "/healthz")
    await post_json(http, emulator, "/_emulator/config", {"down": False})
    await put(evidently, "shop", support.event_dicts(1))

    assert status == 200 and config["down"] is True
    assert error.response["Error"]["Code"] == "ServiceUnavailableException"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert health == {"status": "ok"}
    assert len(emulator.accepted) == 1


# --- stats, reset, control API ---


async def test_stats_count_requests_batches_keys_and_duplicates(emulator, http):
    evidently = client(emulator, "AKIDSTATS")
    await put(evidently, "shop", support.event_dicts(3))
    await put(evidently, "shop", support.event_dicts(1))  # event 0 again: a duplicate
    await put(evidently, ARN, support.event_dicts(1, start=9))
    await post_raw(http, emulator, b"{}")

    _, stats = await get_json(http, emulator, "/_emulator/stats")

    assert stats["requests_total"] == 4
    assert stats["requests_by_status"] == {"200": 3, "400": 1}
    assert stats["events_accepted"] == 5
    assert stats["batch_sizes"] == {"1": 2, "3": 1}
    assert stats["events_by_project"] == {"shop": 4, ARN: 1}
    assert stats["access_keys"]["AKIDSTATS"] == {"accepted_events": 5, "requests": 3, "throttled": 0}
    assert stats["duplicates"] == 1


async def test_reset_clears_records_and_counters(emulator, http):
    await put(client(emulator), "shop", support.event_dicts(2))

    status, _ = await post_json(http, emulator, "/_emulator/reset", {})
    _, stats = await get_json(http, emulator, "/_emulator/stats")
    _, listing = await get_json(http, emulator, "/_emulator/events")

    assert status == 200
    assert listing == {"events": []}
    assert stats["requests_total"] == 0 and stats["events_accepted"] == 0 and stats["access_keys"] == {}


async def test_without_recording_only_counters_are_kept(make_emulator):
    emulator = await make_emulator(FaultConfig(record=False))

    await put(client(emulator), "shop", support.event_dicts(4))
    await put(client(emulator), "shop", support.event_dicts(4))

    assert emulator.accepted == []
    assert emulator.stats_dict()["events_accepted"] == 8
    assert emulator.stats_dict()["duplicates"] == 0


async def test_config_round_trips_and_applies_at_once(emulator, http):
    status, config = await post_json(
        http, emulator, "/_emulator/config", {"invalid_event_rate": 1, "missing_projects": ["x"]}
    )
    _, fetched = await get_json(http, emulator, "/_emulator/config")
    answer = await put(client(emulator), "shop", support.event_dicts(2))

    assert status == 200 and config == fetched
    assert fetched["invalid_event_rate"] == 1.0 and fetched["missing_projects"] == ["x"]
    assert answer["failedEventCount"] == 2


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"quota": 1, "bogus": 2}, "bogus"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"down": "yes"}, "down"),
        ({"missing_projects": "shop"}, "missing_projects"),
        ({"quota_burst": 0.5}, "quota_burst"),
        ([1], "JSON object"),
    ],
)
async def test_the_control_api_rejects_a_bad_field_naming_it(emulator, http, body, named):
    async with http.post(emulator.url + "/_emulator/config", data=orjson.dumps(body)) as resp:
        status, error_type, answer = resp.status, resp.headers.get("x-amzn-ErrorType"), await resp.json()

    assert (status, error_type) == (400, "ValidationException")
    assert named in answer["message"]
    assert emulator.faults == FaultConfig(seed=7)


def test_configure_rejects_unknown_fields_in_process():
    with pytest.raises(ValueError, match="nope"):
        Emulator().configure(nope=1)


# --- CLI ---


def test_cli_flags_build_the_fault_config():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args([
        "--port", "0", "--quota", "5", "--quota-burst", "10", "--throttle-event-rate", "0.1",
        "--invalid-event-rate", "0.2", "--reject-marker", "BAD", "--error-rate", "0.3",
        "--latency", "0.01", "--down", "--missing-project", "a", "--missing-project", "b",
        "--denied-project", "c", "--seed", "4", "--no-record",
    ])

    assert (args.host, args.port) == ("127.0.0.1", 0)
    assert faults_from_args(args) == FaultConfig(
        quota=5, quota_burst=10, throttle_event_rate=0.1, invalid_event_rate=0.2, reject_marker="BAD",
        error_rate=0.3, latency=0.01, down=True, missing_projects=("a", "b"), denied_projects=("c",),
        seed=4, record=False,
    )
    assert faults_from_args(parser.parse_args([])) == FaultConfig()


def test_cli_credentials_are_key_secret_pairs_and_none_means_format_checks_only():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)

    args = parser.parse_args(["--credentials", "AKID1:s/e+c", "--credentials", "AKID2:x:y", "--region", "eu-west-1"])

    assert credentials_from_args(args) == {"AKID1": "s/e+c", "AKID2": "x:y"}
    assert args.region == "eu-west-1"
    assert credentials_from_args(parser.parse_args([])) is None
    for bad in ("AKID1", ":secret", "AKID1:"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--credentials", bad])


def test_cli_rejects_a_rate_above_one():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)

    with pytest.raises(SystemExit):
        parser.parse_args(["--error-rate", "2"])


async def test_run_emulator_announces_its_url_serves_and_exits_cleanly_on_sigterm(http):
    code = (
        "from forwarder.emulator.faults import FaultConfig; from forwarder.emulator.cli import run_emulator;"
        "run_emulator('127.0.0.1', 0, FaultConfig())"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        url = line.split()[-1]
        async with http.get(url + "/healthz") as resp:
            health = resp.status
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert line.startswith("emulator listening on http://127.0.0.1:")
    assert health == 200
    assert returncode == 0
