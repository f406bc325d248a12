"""intake.auth end to end: real ``forwarder run`` processes, boto3, the AWS SDK for JavaScript, curl-style tokens.

Each refused request is checked for its AWS answer and for leaving nothing
behind: no event received, none buffered, none at the emulator.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import boto3
import botocore
import botocore.config
import botocore.exceptions
import pytest

from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, wait_for
from tests.tools import require_tool

pytestmark = pytest.mark.e2e

REGION = "eu-west-1"
APP_KEY, APP_SECRET = "AKIDAPP", "app-secret/+x"
NEXT_KEY, NEXT_SECRET = "AKIDNEXT", "next-secret"
TOKEN_OLD, TOKEN_NEW = "old-token-0123456789abcdef", "new-token-fedcba9876543210"
ARN = f"arn:aws:evidently:{REGION}:123456789012:project/shop.checkout"
EVENT = {"data": json.dumps({"k": 1}), "timestamp": 1_790_000_000, "type": "aws.evidently.custom"}
JS_DIR = Path(__file__).resolve().parents[1] / "js"


def credentials(*pairs: tuple[str, str]) -> str:
    return "".join(f"[p{i}]\naws_access_key_id = {k}\naws_secret_access_key = {s}\n" for i, (k, s) in enumerate(pairs))


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


async def start_forwarder(procs, session, tmp_path: Path, emulator: EmulatorProcess,
                          **intake: Any) -> ForwarderProcess:
    fwd = procs(ForwarderProcess(tmp_path, {
        "intake": intake,
        "evidently": {"endpoint_url": emulator.url, "region": REGION},
        "batch": {"flush_interval": 0.05},
    }))
    await fwd.ready(session)
    return fwd


@pytest.fixture
async def sigv4_intake(tmp_path, procs, session, emulator_process) -> ForwarderProcess:
    creds = secret_file(tmp_path / "credentials", credentials((APP_KEY, APP_SECRET)))
    return await start_forwarder(procs, session, tmp_path, emulator_process, auth="sigv4",
                                 credentials_file=str(creds))


def boto(url: str, key: str = APP_KEY, secret: str = APP_SECRET, **config: Any):
    return boto3.client("evidently", region_name=REGION, endpoint_url=url, aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=botocore.config.Config(inject_host_prefix=False, retries={"total_max_attempts": 1},
                                                      **config))


async def put(client, project: str = "shop") -> dict:
    return await asyncio.to_thread(client.put_project_events, project=project, events=[EVENT])


async def refused(client, project: str = "shop") -> tuple[int, str, str]:
    with pytest.raises(botocore.exceptions.ClientError) as err:
        await put(client, project)
    response = err.value.response
    assert response["ResponseMetadata"]["HTTPHeaders"].get("x-amzn-requestid")
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"], response["Error"]["Message"]


async def assert_nothing_taken(fwd: ForwarderProcess, emulator: EmulatorProcess, session) -> None:
    assert await fwd.metric(session, "forwarder_events_received_total") == 0
    assert await fwd.metric(session, "forwarder_queue_depth") == 0
    assert (await emulator.stats(session))["events_accepted"] == 0


async def refusal_count(fwd: ForwarderProcess, session, reason: str) -> float:
    return await fwd.metric(session, "forwarder_intake_auth_refusals_total", f'reason="{reason}"')


async def wait_logged(fwd: ForwarderProcess, event: str, count: int) -> None:
    async def logged() -> bool:
        return fwd.logs().count(f'"event": "{event}"') >= count
    await wait_for(logged, 10.0, f"{count} {event} log lines")


# --- boto3 --------------------------------------------------------------------

async def test_boto3_with_the_right_keys_gets_200s_for_a_name_and_an_arn(sigv4_intake, emulator_process, session):
    client = boto(sigv4_intake.url)
    for project in ("shop", ARN):
        answer = await put(client, project)
        assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200 and answer["failedEventCount"] == 0

    async def both_delivered() -> bool:
        return (await emulator_process.stats(session))["events_accepted"] == 2
    await wait_for(both_delivered, 10.0, "both events at the emulator")
    assert {e["project"] for e in await emulator_process.events(session)} == {"shop", ARN}


def _alter_body(request, **_: Any) -> None:
    # After signing, before sending: one digit of the event changes, the length does not.
    request.body = request.body.replace(b"1790000000", b"1790000001")


@pytest.mark.parametrize("case, status, error_type, text, reason", [
    ("wrong secret", 403, "InvalidSignatureException", "signature we calculated does not match", "bad_signature"),
    ("unknown key", 403, "UnrecognizedClientException", "security token included in the request is invalid",
     "unknown_key"),
    ("no signature", 403, "MissingAuthenticationTokenException", "Missing Authentication Token", "missing"),
    ("10 minutes old", 403, "InvalidSignatureException", "Signature expired", "expired"),
    ("body altered after signing", 403, "InvalidSignatureException", "signature we calculated does not match",
     "bad_signature"),
])
async def test_boto3_refused_requests_get_their_aws_error_and_nothing_is_buffered(
        sigv4_intake, emulator_process, session, case, status, error_type, text, reason):
    url = sigv4_intake.url
    client = {
        "wrong secret": lambda: boto(url, secret="not-the-secret"),
        "unknown key": lambda: boto(url, key="AKIDSTRANGER"),
        "no signature": lambda: boto(url, signature_version=botocore.UNSIGNED),
        "10 minutes old": lambda: boto(url),
        "body altered after signing": lambda: boto(url),
    }[case]()
    if case == "body altered after signing":
        client.meta.events.register("before-send.evidently.PutProjectEvents", _alter_body)
    if case == "10 minutes old":
        ten_minutes_ago = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(
            minutes=10)
        with mock.patch("botocore.auth.get_current_datetime", return_value=ten_minutes_ago):
            answer = await refused(client)
    else:
        answer = await refused(client)
    assert answer[:2] == (status, error_type)
    assert text in answer[2]
    assert await refusal_count(sigv4_intake, session, reason) == 1
    await assert_nothing_taken(sigv4_intake, emulator_process, session)


async def test_a_signed_request_replayed_within_five_minutes_is_accepted_again(sigv4_intake, emulator_process,
                                                                              session):
    # As at AWS: SigV4 has no nonce. The docs say so (README, "Authentication").
    captured: dict[str, Any] = {}

    def capture(request, **_: Any) -> None:
        captured.update(url=request.url, headers=dict(request.headers), body=request.body)

    client = boto(sigv4_intake.url)
    client.meta.events.register("before-send.evidently.PutProjectEvents", capture)
    await put(client)
    headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in captured["headers"].items()}
    async with session.post(captured["url"], data=captured["body"], headers=headers) as r:
        assert r.status == 200, await r.text()

    async def twice() -> bool:
        return (await emulator_process.stats(session))["events_accepted"] == 2
    await wait_for(twice, 10.0, "the event and its replay at the emulator")


async def test_health_readiness_and_metrics_stay_unauthenticated(sigv4_intake, session):
    for path in ("/healthz", "/readyz", "/metrics"):
        async with session.get(sigv4_intake.url + path) as r:
            assert r.status == 200, path


async def test_sighup_rotates_the_access_keys_without_a_restart(tmp_path, sigv4_intake, session):
    creds = tmp_path / "credentials"
    creds.write_text(credentials((APP_KEY, APP_SECRET), (NEXT_KEY, NEXT_SECRET)))
    sigv4_intake.signal(signal.SIGHUP)
    await wait_logged(sigv4_intake, "auth_reloaded", 1)
    assert (await put(boto(sigv4_intake.url, NEXT_KEY, NEXT_SECRET)))["failedEventCount"] == 0
    assert (await put(boto(sigv4_intake.url)))["failedEventCount"] == 0

    creds.write_text(credentials((NEXT_KEY, NEXT_SECRET)))
    sigv4_intake.signal(signal.SIGHUP)
    await wait_logged(sigv4_intake, "auth_reloaded", 2)
    assert (await refused(boto(sigv4_intake.url)))[:2] == (403, "UnrecognizedClientException")
    assert (await put(boto(sigv4_intake.url, NEXT_KEY, NEXT_SECRET)))["failedEventCount"] == 0

    creds.write_text("[broken\n")
    sigv4_intake.signal(signal.SIGHUP)
    await wait_logged(sigv4_intake, "reload_failed", 1)
    assert (await put(boto(sigv4_intake.url, NEXT_KEY, NEXT_SECRET)))["failedEventCount"] == 0


# --- the AWS SDK for JavaScript -------------------------------------------------

def js_sdk() -> str:
    """node, with tests/js/node_modules installed from its lock file (npm ci) if missing."""
    node = require_tool("node")
    if not (JS_DIR / "node_modules" / "@aws-sdk" / "client-evidently").is_dir():
        npm = require_tool("npm")
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=JS_DIR, capture_output=True,
                                text=True, timeout=300, check=False)
        if result.returncode != 0:
            message = f"npm ci in {JS_DIR} failed: {result.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return node


async def test_the_aws_js_sdk_is_accepted_with_the_right_keys_and_refused_otherwise(sigv4_intake, session):
    node = js_sdk()
    base = {"endpoint": sigv4_intake.url, "region": REGION, "accessKeyId": APP_KEY, "secretAccessKey": APP_SECRET,
            "project": "shop", "events": [EVENT]}
    calls = [base, {**base, "project": ARN}, {**base, "secretAccessKey": "not-the-secret"},
             {**base, "accessKeyId": "AKIDSTRANGER"}, {**base, "clockOffsetMs": -600_000}]
    proc = await asyncio.create_subprocess_exec(node, str(JS_DIR / "put_events.mjs"), stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(calls).encode()), 60)
    assert proc.returncode == 0, err.decode()
    results = json.loads(out)
    assert [(r["status"], r.get("errorType")) for r in results] == [
        (200, None), (200, None), (403, "InvalidSignatureException"), (403, "UnrecognizedClientException"),
        (403, "InvalidSignatureException")]
    assert results[4]["message"].startswith("Signature expired")
    assert await sigv4_intake.metric(session, "forwarder_events_received_total") == 2


# --- tokens -------------------------------------------------------------------

async def test_token_intake_answers_missing_wrong_and_rotated_out_tokens(tmp_path, procs, session,
                                                                         emulator_process):
    tokens = secret_file(tmp_path / "tokens", f"# current\n{TOKEN_OLD}\n")
    fwd = await start_forwarder(procs, session, tmp_path, emulator_process, auth="token", token_file=str(tokens))
    url = f"{fwd.url}/events/projects/shop"

    async def post(token: str | None) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with session.post(url, json={"events": [EVENT]}, headers=headers) as r:
            return r.status, await r.json(content_type=None), r.headers

    status, body, headers = await post(None)
    assert (status, headers["x-amzn-ErrorType"]) == (401, "MissingAuthenticationTokenException")
    assert headers["WWW-Authenticate"].startswith("Bearer") and "Bearer <token>" in body["message"]
    status, body, headers = await post(TOKEN_NEW)
    assert (status, headers["x-amzn-ErrorType"]) == (403, "AccessDeniedException") and "token_file" in body["message"]
    await assert_nothing_taken(fwd, emulator_process, session)
    assert (await post(TOKEN_OLD))[0] == 200

    tokens.write_text(f"{TOKEN_OLD}\n{TOKEN_NEW}\n")  # rotation, step 1: both
    fwd.signal(signal.SIGHUP)
    await wait_logged(fwd, "auth_reloaded", 1)
    assert [(await post(t))[0] for t in (TOKEN_OLD, TOKEN_NEW)] == [200, 200]
    tokens.write_text(f"{TOKEN_NEW}\n")  # step 2: the old one rotated out
    fwd.signal(signal.SIGHUP)
    await wait_logged(fwd, "auth_reloaded", 2)
    assert [(await post(t))[0] for t in (TOKEN_OLD, TOKEN_NEW)] == [403, 200]
    assert await refusal_count(fwd, session, "wrong_token") == 2
    assert await refusal_count(fwd, session, "missing") == 1


# --- start-up -----------------------------------------------------------------

async def test_the_daemon_refuses_to_start_open_on_a_non_loopback_address(tmp_path, procs, emulator_process):
    fwd = procs(ForwarderProcess(tmp_path, {"intake": {"host": "0.0.0.0"},
                                            "evidently": {"endpoint_url": emulator_process.url}}))
    assert await fwd.wait(20) == 2
    (line,) = fwd.logs().strip().splitlines()
    assert line.startswith("forwarder: configuration error: intake.host = '0.0.0.0' is not a loopback address")
    assert "intake.auth" in line and "intake.allow_unauthenticated = true" in line


async def test_the_daemon_refuses_to_start_without_its_credentials_file(tmp_path, procs, emulator_process):
    fwd = procs(ForwarderProcess(tmp_path, {"intake": {"auth": "sigv4", "credentials_file": str(tmp_path / "nope")},
                                            "evidently": {"endpoint_url": emulator_process.url}}))
    assert await fwd.wait(20) == 2
    assert f"forwarder: cannot start: intake.credentials_file {tmp_path / 'nope'} cannot be read" in fwd.logs()
