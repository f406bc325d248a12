"""The aiobotocore client against the in-process emulator: every outcome becomes a CallResult."""

from __future__ import annotations

import asyncio
import re
import ssl
from contextlib import asynccontextmanager

import orjson
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from forwarder.delivery.client import EvidentlyClient, ModelMissing, check_model, encode_body, read_answer
from forwarder.config import EvidentlyConfig
from forwarder.delivery.retry import CallResult, RetryReason
from forwarder.emulator.harness import free_port
from tests import support
from tests.fakes import local_server


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
    assert orjson.loads(encode_body(support.events(2))) == {"events": [orjson.loads(e) for e in support.events(2)]}


async def test_pre_encoded_events_arrive_signed_and_unchanged(client, emulator):
    result = await client.put_events("arn:aws:evidently:us-east-1:1:project/p", support.events(3))
    assert result.status == 200 and result.failed == ()
    assert [(e.project, e.data, e.timestamp) for e in emulator.accepted] == [
        ("arn:aws:evidently:us-east-1:1:project/p", f'{{"id":"e{i}"}}', 1_790_000_000.5) for i in range(3)]
    assert {e.access_key for e in emulator.accepted} == {"k"}  # SigV4 with our credentials


async def test_failed_entries_of_a_200_come_back_with_index_and_code(client, emulator):
    emulator.configure(invalid_event_rate=1.0)
    result = await client.put_events("p", support.events(2))
    assert result.status == 200
    assert [(i, code) for i, code, _ in result.failed] == [(0, "ValidationException"), (1, "ValidationException")]


@pytest.mark.parametrize("faults, status, code", [
    ({"quota": 0.5, "quota_burst": 1.0}, 429, "ThrottlingException"),
    ({"down": True}, 503, "ServiceUnavailableException"),
    ({"missing_projects": ["p"]}, 404, "ResourceNotFoundException"),
    ({"denied_projects": ["p"]}, 403, "AccessDeniedException"),
    ({"reject_marker": '"id"'}, 400, "ValidationException"),
])
async def test_whole_request_errors_keep_status_and_code(client, emulator, faults, status, code):
    emulator.configure(**faults)
    if "quota" in faults:
        await client.put_events("p", support.events(1))  # spends the only token
    result = await client.put_events("p", support.events(1))
    assert (result.status, result.code) == (status, code)


async def test_an_unreachable_endpoint_is_a_connection_failure_not_an_exception():
    c = EvidentlyClient(EvidentlyConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", request_timeout=1.0),
                        credentials=("k", "s"))
    await c.start()
    try:
        result = await c.put_events("p", support.events(1))
    finally:
        await c.close()
    assert (result.unanswered, result.maybe_delivered) == (RetryReason.CONNECTION, False)  # nothing was sent


def test_a_200_whose_results_confirm_every_event_is_read_entry_by_entry():
    assert read_answer(b'{"eventResults":[{"eventId":"a"},{"eventId":"b"}],"failedEventCount":0}', 2) == \
        CallResult(200)
    assert read_answer(
        b'{"eventResults":[{"eventId":"a"},{"errorCode":"ThrottlingException","errorMessage":"slow"}],'
        b'"failedEventCount":1}', 2) == CallResult(200, failed=((1, "ThrottlingException", "slow"),))
    # failedEventCount is optional: eventResults decide
    assert read_answer(b'{ "eventResults" : [ {"eventId": "a"} ] }', 1) == CallResult(200)


UNCONFIRMING_200S = {
    "html page": b"<html><body>Please log in to the proxy</body></html>",
    "truncated json": b'{"eventResults":[{"eventId":"a"},{"eventId"',
    "empty body": b"",
    "empty object": b"{}",
    "null results": b'{"eventResults":null,"failedEventCount":0}',
    "one result for ten events": b'{"eventResults":[{"eventId":"a"}],"failedEventCount":0}',
    "failed count without codes": (b'{"eventResults":[' + b",".join([b'{"eventId":"a"}'] * 10)
                                   + b'],"failedEventCount":10}'),
    "null error codes": b'{"eventResults":[' + b",".join([b'{"errorCode":null}'] * 10) + b'],"failedEventCount":10}',
    "extra result with an error": (b'{"eventResults":[' + b",".join([b'{"eventId":"a"}'] * 10)
                                   + b',{"errorCode":"ValidationException"}],"failedEventCount":1}'),
}


@pytest.mark.parametrize("body", UNCONFIRMING_200S.values(), ids=UNCONFIRMING_200S.keys())
def test_a_200_that_does_not_confirm_the_batch_is_a_protocol_error_that_may_have_been_stored(body):
    result = read_answer(body, 10)
    assert (result.unanswered, result.maybe_delivered) == (RetryReason.PROTOCOL, True)
    assert result.message


@pytest.mark.parametrize("body", UNCONFIRMING_200S.values(), ids=UNCONFIRMING_200S.keys())
async def test_the_client_reports_an_unconfirming_200_from_a_real_server_as_a_protocol_error(body):
    async with recording_server(body) as (url, seen):
        c = EvidentlyClient(EvidentlyConfig(endpoint_url=url, request_timeout=2.0), credentials=("k", "s"))
        await c.start()
        try:
            result = await c.put_events("p", support.events(10))
        finally:
            await c.close()
    assert result.unanswered is RetryReason.PROTOCOL and len(seen) == 1


async def test_a_connection_closed_in_the_middle_of_the_answer_may_have_delivered_the_events():
    async def half_answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")  # the request's head; its body follows
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                     b'{"eventResults":[{"eventId":')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(half_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    c = EvidentlyClient(EvidentlyConfig(endpoint_url=f"http://127.0.0.1:{port}", request_timeout=2.0),
                        credentials=("k", "s"))
    await c.start()
    try:
        result = await c.put_events("p", support.events(10))
    finally:
        await c.close()
        server.close()
        await server.wait_closed()
    assert (result.unanswered, result.maybe_delivered) == (RetryReason.CONNECTION, True)


@asynccontextmanager
async def recording_server(answer: bytes = b'{"eventResults":[{"eventId":"x"}],"failedEventCount":0}'):
    """A 127.0.0.1 server that keeps each request (as a proxy, it sees absolute URLs)."""
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.method, str(request.url), dict(request.headers), await request.read()))
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with local_server(app) as url:
        yield url, seen


async def test_the_request_as_sent_carries_a_valid_sigv4_signature():
    async with recording_server(b'{"eventResults":[{"eventId":"x"},{"eventId":"y"}],"failedEventCount":0}') as (
            url, seen):
        c = EvidentlyClient(EvidentlyConfig(endpoint_url=url, region="eu-west-1"), credentials=("AKID", "SECRET"))
        await c.start()
        try:
            assert (await c.put_events("arn:aws:evidently:eu-west-1:1:project/p", support.events(2))).status == 200
        finally:
            await c.close()
    method, sent_url, headers, body = seen[0]
    assert body == encode_body(support.events(2))
    auth = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=AKID/(\d{8})/eu-west-1/evidently/aws4_request, "
                        r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})", headers["Authorization"])
    assert auth is not None, headers["Authorization"]
    signed = auth.group(2).split(";")
    assert "host" in signed and "x-amz-date" in signed
    # Recompute the signature over exactly the signed headers as they arrived.
    lower = {k.lower(): v for k, v in headers.items()}
    request = AWSRequest(method, sent_url, data=body, headers={h: lower[h] for h in signed if h != "host"})
    request.context["timestamp"] = lower["x-amz-date"]
    signer = SigV4Auth(Credentials("AKID", "SECRET"), "evidently", "eu-west-1")
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    assert auth.group(3) == expected
    assert sent_url.endswith("/events/projects/arn%3Aaws%3Aevidently%3Aeu-west-1%3A1%3Aproject%2Fp")


async def test_calls_go_through_the_proxy_named_by_the_environment(monkeypatch):
    async with recording_server() as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        endpoint = f"http://evidently.example.invalid:{free_port()}"
        c = EvidentlyClient(EvidentlyConfig(endpoint_url=endpoint), credentials=("k", "s"))
        await c.start()
        try:
            assert (await c.put_events("p", support.events(1))).status == 200
        finally:
            await c.close()
    assert [url for _, url, _, _ in seen] == [f"{endpoint}/events/projects/p"]


async def test_connection_and_tls_failures_name_the_host_and_port_and_what_to_do(tmp_path, monkeypatch):
    from aiohttp import web

    from forwarder.delivery.client import describe
    from tests.tools import make_ca_and_server_pair

    port = free_port()
    c = EvidentlyClient(EvidentlyConfig(endpoint_url=f"http://127.0.0.1:{port}", request_timeout=1.0),
                        credentials=("k", "s"))
    await c.start()
    try:
        refused = await c.put_events("p", support.events(1))
    finally:
        await c.close()
    assert f"cannot connect to 127.0.0.1:{port}" in describe(refused)

    _, cert, key = make_ca_and_server_pair(tmp_path)  # a CA the client does not trust
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner = web.AppRunner(web.Application())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    tls_port = runner.addresses[0][1]
    c = EvidentlyClient(EvidentlyConfig(endpoint_url=f"https://127.0.0.1:{tls_port}", request_timeout=1.0),
                        credentials=("k", "s"))
    await c.start()
    try:
        untrusted = await c.put_events("p", support.events(1))
    finally:
        await c.close()
        await runner.cleanup()
    text = describe(untrusted)
    assert f"TLS certificate verification failed for 127.0.0.1:{tls_port}: certificate verify failed" in text
    assert "AWS_CA_BUNDLE" in text and untrusted.unanswered is RetryReason.CONNECTION
