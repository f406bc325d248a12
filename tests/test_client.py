"""The aiobotocore client against the in-process emulator: every outcome becomes a CallResult."""

from __future__ import annotations

import orjson
import pytest

from forwarder.client import EvidentlyClient, ModelMissing, check_model, encode_body
from forwarder.config import EvidentlyConfig
from tests.harness import free_port


def events(n):
    return [orjson.dumps({"data": orjson.dumps({"i": i}).decode(), "timestamp": 1_790_000_000.5,
                          "type": "aws.evidently.custom"}) for i in range(n)]


@pytest.fixture
async def client(emulator):
    c = EvidentlyClient(EvidentlyConfig(endpoint_url=emulator.url, request_timeout=2.0), credentials=("k", "s"))
    await c.start()
    yield c
    await c.close()
    await c.close()  # idempotent


def test_a_missing_evidently_model_fails_with_the_package_to_install():
    class Session:
        def get_available_services(self):
            return ["s3"]

    with pytest.raises(ModelMissing, match="pip install botocore-a-la-carte-evidently"):
        check_model(Session())


def test_the_body_is_the_encoded_events_joined_as_sent():
    assert orjson.loads(encode_body(events(2))) == {"events": [orjson.loads(e) for e in events(2)]}


async def test_pre_encoded_events_arrive_signed_and_unchanged(client, emulator):
    result = await client.put_events("arn:aws:evidently:us-east-1:1:project/p", events(3))
    assert result.status == 200 and result.failed == ()
    assert [(e.project, e.data, e.timestamp) for e in emulator.accepted] == [
        ("arn:aws:evidently:us-east-1:1:project/p", f'{{"i":{i}}}', 1_790_000_000.5) for i in range(3)]
    assert {e.access_key for e in emulator.accepted} == {"k"}  # SigV4 with our credentials


async def test_failed_entries_of_a_200_come_back_with_index_and_code(client, emulator):
    emulator.configure(invalid_event_rate=1.0)
    result = await client.put_events("p", events(2))
    assert result.status == 200
    assert [(i, code) for i, code, _ in result.failed] == [(0, "ValidationException"), (1, "ValidationException")]


@pytest.mark.parametrize("faults, status, code", [
    ({"quota": 0.5, "quota_burst": 1.0}, 429, "ThrottlingException"),
    ({"down": True}, 503, "ServiceUnavailableException"),
    ({"missing_projects": ["p"]}, 404, "ResourceNotFoundException"),
    ({"denied_projects": ["p"]}, 403, "AccessDeniedException"),
    ({"reject_marker": '"i"'}, 400, "ValidationException"),
])
async def test_whole_request_errors_keep_status_and_code(client, emulator, faults, status, code):
    emulator.configure(**faults)
    if "quota" in faults:
        await client.put_events("p", events(1))  # spends the only token
    result = await client.put_events("p", events(1))
    assert (result.status, result.code) == (status, code)


async def test_an_unreachable_endpoint_is_a_connection_failure_not_an_exception():
    c = EvidentlyClient(EvidentlyConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", request_timeout=1.0),
                        credentials=("k", "s"))
    await c.start()
    try:
        result = await c.put_events("p", events(1))
    finally:
        await c.close()
    assert result.status == 0 and result.code == "connection"
