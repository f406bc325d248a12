"""What an operator sees when something is wrong, with real processes (issue 22).

For each mistake a new user makes (a sidecar that does not trust the central
tier's CA, a sidecar signing for the wrong region, no AWS credentials, a project
that does not exist), a WARNING or ERROR line names the underlying cause within
10 s, and ``forwarder status`` shows the same state. With everything right,
``forwarder status`` counts what the emulator received, the delivery-age
histogram is exported, and an eventId from an intake answer can be traced to
the debug line of the batch that delivered it.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import orjson
import pytest

from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, forwarder_command, free_port, wait_for
from tests.tools import make_ca_and_server_pair

pytestmark = pytest.mark.e2e

WITHIN = 10.0  # seconds from the first event to the line naming the cause
REGION = "eu-west-1"  # what the central tier verifies signatures against
SIDECAR_KEY, SIDECAR_SECRET = "AKIDSIDECAR", "sidecar-secret"


async def start_central(procs, session, tmp_path: Path, emulator: EmulatorProcess) -> ForwarderProcess:
    """A central tier: TLS with a certificate of its own CA, SigV4 against the sidecar's key, to the emulator."""
    creds = tmp_path / "central-credentials"
    creds.write_text(f"[sidecars]\naws_access_key_id = {SIDECAR_KEY}\naws_secret_access_key = {SIDECAR_SECRET}\n")
    make_ca_and_server_pair(tmp_path)
    central = procs(ForwarderProcess(tmp_path, {
        "intake": {"port": free_port(), "auth": "sigv4", "credentials_file": str(creds),
                   "tls_cert_file": str(tmp_path / "server.crt"), "tls_key_file": str(tmp_path / "server.key")},
        "evidently": {"endpoint_url": emulator.url, "region": REGION},
        "batch": {"flush_interval": 0.1},
    }, name="central", tls=ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))))
    await central.ready(session)
    return central


def sidecar_process(tmp_path: Path, central: ForwarderProcess, **evidently: object) -> ForwarderProcess:
    """A sidecar delivering to the central tier, trusting its CA and signing with the sidecar's key."""
    return ForwarderProcess(tmp_path, {
        "evidently": {"endpoint_url": central.url, "region": REGION, **evidently},
        "batch": {"flush_interval": 0.1},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.5},
    }, env={"AWS_ACCESS_KEY_ID": SIDECAR_KEY, "AWS_SECRET_ACCESS_KEY": SIDECAR_SECRET,
            "AWS_CA_BUNDLE": str(tmp_path / "ca.crt")}, name="sidecar")


def log_records(proc: ForwarderProcess) -> list[dict]:
    out = []
    for line in proc.logs().splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return out


async def a_line_says(proc: ForwarderProcess, text: str, levels=("warning", "error")) -> dict:
    """The first log line of one of ``levels`` whose text contains ``text``, waited for at most WITHIN seconds."""
    found: list[dict] = []

    async def said() -> bool:
        proc.check_alive()
        found[:] = [r for r in log_records(proc) if r.get("level") in levels and text in orjson.dumps(r).decode()]
        return bool(found)
    await wait_for(said, WITHIN, f"a {'/'.join(levels)} line of {proc.name} saying {text!r}", interval=0.1)
    return found[0]


async def forwarder_status(proc: ForwarderProcess, *args: str) -> tuple[int, str]:
    """``forwarder status --url <proc>``: (exit code, output)."""
    child = await asyncio.create_subprocess_exec(*forwarder_command("status", "--url", proc.url, *args),
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(child.communicate(), 30)
    return child.returncode or 0, out.decode()


async def post(session, proc: ForwarderProcess, project: str, n: int, start: int = 0) -> dict:
    status, body = await proc.post(session, project, [{"data": {"i": i}} for i in range(start, start + n)])
    assert status == 200, body
    return body


@pytest.fixture
async def emulator(tmp_path, procs, session) -> EmulatorProcess:
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    return emu


async def test_a_sidecar_that_does_not_trust_the_central_tiers_ca_says_so_and_status_shows_it(
        tmp_path, procs, session, emulator):
    central = await start_central(procs, session, tmp_path, emulator)
    other = tmp_path / "other-ca"
    other.mkdir()
    make_ca_and_server_pair(other)  # a CA that did not sign the central tier's certificate
    sidecar = sidecar_process(tmp_path, central)
    sidecar.env["AWS_CA_BUNDLE"] = str(other / "ca.crt")
    procs(sidecar)
    await sidecar.ready(session)
    await post(session, sidecar, "checkout", 5)

    line = await a_line_says(sidecar, "certificate verify failed")
    port = central.url.rsplit(":", 1)[1]
    assert f"TLS certificate verification failed for 127.0.0.1:{port}" in line["error"]
    assert "AWS_CA_BUNDLE" in line["error"]
    await a_line_says(sidecar, "certificate verify failed", levels=("warning",))  # the outage line too

    async def outage_shown() -> bool:
        code, out = await forwarder_status(sidecar)
        return code == 1 and "OUTAGE" in out and "certificate verify failed" in out
    await wait_for(outage_shown, WITHIN, "forwarder status to show the outage and its TLS error")
    assert sidecar.dead_letters() == []


async def test_a_sidecar_signing_for_the_wrong_region_shows_the_central_tiers_message_and_holds_its_events(
        tmp_path, procs, session, emulator):
    central = await start_central(procs, session, tmp_path, emulator)
    sidecar = procs(sidecar_process(tmp_path, central, region="us-west-2"))  # the central tier verifies eu-west-1
    await sidecar.ready(session)
    await post(session, sidecar, "checkout", 5)

    message = "Credential should be scoped to a valid region"
    circuit = await a_line_says(sidecar, message, levels=("warning",))
    assert circuit["event"] == "circuit_opened" and circuit["error"].startswith("InvalidSignatureException: ")
    blocked = await a_line_says(sidecar, "delivery blocked: InvalidSignatureException: " + message,
                                levels=("error",))
    assert REGION in blocked["error"]
    code, out = await forwarder_status(sidecar)
    assert code == 1 and "BLOCKED" in out and message in out and "us-west-2" in out
    assert await sidecar.metric(session, "forwarder_delivery_blocked", 'reason="signature_refused"') == 1
    assert sidecar.dead_letters() == [] and await sidecar.metric(session, "forwarder_queue_depth") == 5


async def test_a_daemon_without_credentials_says_so_at_start_and_delivers_once_they_appear(
        tmp_path, procs, session, emulator):
    credentials = tmp_path / "aws-credentials"
    fwd = ForwarderProcess(tmp_path, {
        "evidently": {"endpoint_url": emulator.url},
        "batch": {"flush_interval": 0.05},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.5},
    }, env={"HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_CONFIG_FILE": str(tmp_path / "aws-config"), "AWS_EC2_METADATA_DISABLED": "true"})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        fwd.env.pop(name, None)  # no credentials anywhere in the standard chain
    procs(fwd)
    await fwd.ready(session)
    line = await a_line_says(fwd, "no AWS credentials found", levels=("error",))
    assert line["event"] == "credentials_missing" and "AWS_ACCESS_KEY_ID" in line["fix"]
    await post(session, fwd, "demo", 3)
    code, out = await forwarder_status(fwd)
    assert code == 1 and "BLOCKED" in out and "credentials NONE FOUND" in out
    assert await fwd.metric(session, "forwarder_delivery_blocked", 'reason="no_credentials"') == 1

    credentials.write_text("[default]\naws_access_key_id = late\naws_secret_access_key = late\n")

    async def delivered() -> bool:
        return await emulator.accepted(session) == 3
    await wait_for(delivered, 60, "the held events delivered once credentials appeared", interval=0.2)
    assert await fwd.metric(session, "forwarder_delivery_blocked", 'reason="no_credentials"') == 0
    assert any(r["event"] == "credentials_found" for r in log_records(fwd))
    assert fwd.dead_letters() == []


async def test_a_missing_project_is_dead_lettered_within_its_grace_while_the_real_one_keeps_delivering(
        tmp_path, procs, session):
    emulator = procs(EmulatorProcess(tmp_path, "--missing-project", "gone"))
    await emulator.ready(session)
    grace = 3.0
    fwd = procs(ForwarderProcess(tmp_path, {
        "evidently": {"endpoint_url": emulator.url},
        "batch": {"flush_interval": 0.05},
        "retry": {"initial_backoff": 0.05, "max_backoff": 20.0, "not_found_grace": grace},
    }))
    await fwd.ready(session)
    loop = asyncio.get_running_loop()
    started = loop.time()
    given = {r["eventId"] for r in (await post(session, fwd, "gone", 4))["eventResults"]}
    await post(session, fwd, "real", 4)

    line = await a_line_says(fwd, "ResourceNotFoundException: Project gone does not exist", levels=("warning",))
    assert line["event"] == "circuit_opened"
    code, out = await forwarder_status(fwd)
    assert "gone" in out and "ResourceNotFoundException" in out and f"grace {grace:g} s" in out

    async def dead_lettered() -> bool:
        return len(fwd.dead_letters()) == 4 and any(r["event"] == "dead_lettered" for r in log_records(fwd))
    await wait_for(dead_lettered, grace + 5, "the missing project's events dead-lettered (file and log line)",
                   interval=0.1)
    assert loop.time() - started < grace + 5
    [letter] = [r for r in log_records(fwd) if r["event"] == "dead_lettered"]
    assert letter["grace"] == grace and "retry.not_found_grace" in letter["reason"]
    assert {e["eventId"] for e in fwd.dead_letters()} == set(letter["event_ids"]) == given  # the ids the app got
    for i in range(4, 8):  # the real project keeps delivering
        await post(session, fwd, "real", 1, start=i)

    async def real_delivered() -> bool:
        return len(await emulator.events(session, "real")) == 8
    await wait_for(real_delivered, WITHIN, "the real project's 8 events at the emulator")
    assert {e["project"] for e in fwd.dead_letters()} == {"gone"}


async def test_with_everything_right_status_counts_what_the_emulator_received_and_event_ids_can_be_traced(
        tmp_path, procs, session, emulator):
    fwd = procs(ForwarderProcess(tmp_path, {
        "evidently": {"endpoint_url": emulator.url},
        "batch": {"flush_interval": 0.05},
        "log": {"level": "debug"},
    }))
    await fwd.ready(session)
    answers = [await post(session, fwd, project, n, start=k * 10)
               for k, (project, n) in enumerate([("a", 7), ("b", 3), ("a", 5), ("c", 1)])]
    await fwd.wait_drained(session, 20)

    code, out = await forwarder_status(fwd, "--json")
    assert code == 1 or code == 0
    doc = orjson.loads(out)
    delivered = {row["project"]: row["delivered"] for row in doc["projects"]}
    at_emulator = {p: len(await emulator.events(session, p)) for p in ("a", "b", "c")}
    assert delivered == at_emulator == {"a": 12, "b": 3, "c": 1}
    assert doc["state"] == "ok" and doc["evidently"]["region_source"] == "default"
    assert await fwd.metric(session, "forwarder_delivery_age_seconds_count") >= 3
    code, table = await forwarder_status(fwd)
    assert code == 0 and "PROJECT" in table and "DELIVERED" in table

    batches = [r for r in log_records(fwd) if r["event"] == "batch_delivered"]
    assert sum(r["events"] for r in batches) == 16
    event_id = answers[2]["eventResults"][4]["eventId"]  # the last event of the second request to "a"
    assert any(event_id in (r["first_event_id"], r["last_event_id"]) or
               r["first_event_id"] <= event_id <= r["last_event_id"] for r in batches if r["project"] == "a")
