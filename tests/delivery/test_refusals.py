"""Refusals that are about the forwarder, not its events (issue 22): delivery blocked by the
forwarder's own identity holds events; a missing project ends after its grace; every failure
line names its cause. On virtual time, through the sender's test rig."""

from __future__ import annotations

import pytest

from forwarder.config import RetryConfig
from forwarder.delivery.retry import CallResult, RetryReason, no_answer
from tests.delivery.test_sender import OK, Rig
from tests.support import events


class Lines:
    """A structlog stand-in keeping (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **fields: self.lines.append((level, event, fields))

    def named(self, event):
        return [(level, fields) for level, e, fields in self.lines if e == event]


@pytest.mark.parametrize("code,reason", [("InvalidSignatureException", "signature_refused"),
                                         ("UnrecognizedClientException", "credentials_refused"),
                                         ("NoCredentials", "no_credentials"),
                                         ("AccessDeniedException", "access_denied")])
async def test_refusals_of_the_forwarders_own_identity_hold_the_events_past_max_elapsed_and_say_delivery_blocked(
        virtual_time, code, reason):
    message = "Credential should be scoped to a valid region"
    fixed_at = 30.0  # the operator fixes the credentials after six times retry.max_elapsed
    blocked_seen = []

    def answer(n, project, sent):
        blocked_seen.append(rig.metric("forwarder_delivery_blocked", {"reason": reason}))
        return OK if virtual_time.time() >= fixed_at else CallResult(403, code, message)

    log = Lines()
    rig = Rig(virtual_time, answer, retry=RetryConfig(max_elapsed=5.0, initial_backoff=0.1, max_backoff=2.0),
              log=log)
    await rig.run([rig.ledger.batch("A", events(3)), rig.ledger.batch("B", events(2))])
    assert rig.dead.entries == [] and rig.ledger.depth == 0
    assert sum(rig.transport.delivered.values()) == 5
    assert max(blocked_seen) == 1 and rig.metric("forwarder_delivery_blocked", {"reason": reason}) == 0
    [(level, fields)] = log.named("delivery_blocked")[:1]  # once a minute at most: the run lasts 30 s
    assert level == "error" and fields["error"] == f"delivery blocked: {code}: {message}"
    assert log.named("delivery_unblocked")


async def test_a_missing_project_is_dead_lettered_after_its_grace_while_others_keep_delivering(virtual_time):
    message = "Project gone does not exist"
    dead_at = []

    def answer(n, project, sent):
        return CallResult(404, "ResourceNotFoundException", message) if project == "gone" else OK

    log = Lines()
    rig = Rig(virtual_time, answer, log=log,
              retry=RetryConfig(max_elapsed=600.0, initial_backoff=0.1, max_backoff=20.0, not_found_grace=10.0))
    write = rig.dead.write

    async def timed_write(data):
        dead_at.append(virtual_time.time())
        await write(data)
    rig.dead.write = timed_write
    started = virtual_time.time()
    await rig.run([rig.ledger.batch("here", events(2)), rig.ledger.batch("gone", events(3, "g")),
                   rig.ledger.batch("here", events(2, "h"))])
    assert [e["errorCode"] for e in rig.dead.entries] == ["ResourceNotFoundException"] * 3
    assert dead_at == [pytest.approx(started + 10.0, abs=0.01)]  # at the grace, not at its next probe
    assert all(t <= started + 10.0 for p, _, t in rig.transport.calls if p == "gone")  # none past the grace
    assert sum(rig.transport.delivered.values()) == 4
    [(level, fields)] = log.named("dead_lettered")
    assert fields["grace"] == 10.0 and "retry.not_found_grace" in fields["reason"]
    assert fields["error"] == f"ResourceNotFoundException: {message}"
    assert rig.metric("forwarder_project_events_dead_lettered_total", {"project": "gone"}) == 3
    assert rig.metric("forwarder_project_events_delivered_total", {"project": "here"}) == 4


async def test_retry_and_outage_lines_carry_the_error_that_caused_them(virtual_time):
    tls = "ClientConnectorCertificateError: TLS certificate verification failed for central:8443: self-signed"
    answer = lambda n, p, s: no_answer(RetryReason.CONNECTION, tls, False) if n < 5 else OK  # noqa: E731
    log = Lines()
    rig = Rig(virtual_time, answer, retry=RetryConfig(60.0, 0.01, 0.1), concurrency=1, log=log)
    await rig.run([rig.ledger.batch("p", events(1))])
    [(_, retry)] = log.named("retry_scheduled")[:1]
    assert retry["error"] == f"connection: {tls}"
    [(level, started)] = log.named("outage_started")
    assert level == "warning" and started["last_error"] == f"connection: {tls}"
    [(_, ended)] = log.named("outage_ended")
    assert ended["last_error"] == f"connection: {tls}"
