from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from forwarder.clock import Clock
from forwarder.config import RetryConfig
from forwarder.delivery.rate import RateLimiter
from forwarder.delivery.retry import CallResult, RetryReason, no_answer
from forwarder.delivery.admission import MAX_PROBE_INTERVAL, OUTAGE_AFTER
from forwarder.delivery.sender import Sender
from tests.fakes import DeadLetters, Ledger, Scripted, VirtualTime
from tests import support
from tests.support import events

FAST = RetryConfig(max_elapsed=0.5, initial_backoff=0.001, max_backoff=0.01)
OK = CallResult(200)
DOWN = CallResult(503, "ServiceUnavailableException", "down")


class Rig:
    """A sender on virtual time with its buffer, dead-letter file and metrics."""

    def __init__(self, vt: VirtualTime, answer, retry=FAST, concurrency=4, rate=100_000.0, dead_failures=0,
                 seed=1, transport=None, log=None) -> None:
        self.vt = vt
        self.transport = transport or Scripted(answer, vt.time)
        self.ledger = Ledger(vt.wall)
        self.dead = DeadLetters(dead_failures)
        observer = support.observer(log)
        self.registry = observer.metrics.registry
        self.limiter = RateLimiter(rate, rate, clock=vt.time)
        self.sender = Sender(self.transport, self.ledger, self.dead, self.limiter, observer, retry, concurrency,
                             Clock(vt.time, vt.wall, random.Random(seed)))
        self.crashes: list[BaseException] = []

    def metric(self, name, labels=None):
        value = self.registry.get_sample_value(name, labels or {})
        assert value is not None, f"no series {name}{labels or ''}"
        return value

    async def run(self, batches, timeout=600.0):
        await self.sender.start(self.crashes.append)
        for b in batches:
            await self.sender.send(b)
        assert await self.sender.drain(timeout), "the sender did not resolve every batch in time"
        assert await self.sender.close() == []
        assert self.crashes == []


async def test_partial_failure_resends_only_throttled_events_and_dead_letters_invalid_ones(virtual_time):
    evs = support.events(5)

    def answer(n, project, sent):
        if n == 0:
            return CallResult(200, failed=((1, "ThrottlingException", "slow down"),
                                           (3, "ValidationException", "data too big")))
        return OK

    rig = Rig(virtual_time, answer)
    await rig.run([rig.ledger.batch("p", evs)])
    assert rig.transport.calls[1][1] == [evs[1]]
    assert rig.dead.events() == [evs[3]]
    assert rig.dead.entries[0]["errorCode"] == "ValidationException"
    assert rig.dead.entries[0]["errorMessage"] == "data too big"
    assert set(rig.dead.entries[0]) == {"project", "event", "eventId", "errorCode", "errorMessage", "attempts",
                                        "first_attempt_at", "last_attempt_at"}
    assert rig.ledger.acked == Counter(evs)
    assert rig.metric("forwarder_throttled_total") == 1.0
    assert rig.metric("forwarder_events_sent_total") == 4.0
    assert rig.metric("forwarder_events_failed_total", {"code": "ValidationException"}) == 1.0


async def test_one_refused_event_in_a_batch_that_fails_as_a_whole_is_isolated_by_bisection(virtual_time):
    evs = support.events(50)
    poison = evs[37]

    def answer(n, project, sent):
        return CallResult(400, "ValidationException", "event 37 is malformed") if poison in sent else OK

    rig = Rig(virtual_time, answer)
    await rig.run([rig.ledger.batch("p", evs)])
    assert rig.dead.events() == [poison]
    assert rig.dead.entries[0]["errorMessage"] == "event 37 is malformed"
    assert rig.transport.delivered == Counter(e for e in evs if e != poison)
    assert len(rig.transport.calls) <= 2 * 6 + 1  # bisection, not one call per event
    assert rig.ledger.acked == Counter(evs)


async def test_throttling_slows_the_send_rate_down(virtual_time):
    def answer(n, project, sent):
        return CallResult(429, "ThrottlingException", "Rate exceeded") if n < 3 else OK

    rig = Rig(virtual_time, answer, rate=50.0)
    await rig.run([rig.ledger.batch("p", support.events(1))])
    assert rig.limiter.rate < 50.0
    assert rig.metric("forwarder_throttled_total") == 3.0
    assert rig.metric("forwarder_retries_total", {"reason": "throttled"}) == 3.0


async def test_a_project_answering_404_opens_its_circuit_without_stalling_another(virtual_time):
    def answer(n, project, sent):
        return CallResult(404, "ResourceNotFoundException", "no such project") if project == "A" else OK

    rig = Rig(virtual_time, answer, retry=RetryConfig(max_elapsed=30.0, initial_backoff=0.1, max_backoff=20.0),
              concurrency=2)
    a, b = support.events(10, "a"), support.events(200, "b")
    batches = [rig.ledger.batch("A", a)] + [rig.ledger.batch("B", b[i:i + 50]) for i in range(0, 200, 50)]
    await rig.run(batches)
    first_refusal = min(t for p, _, t in rig.transport.calls if p == "A")
    b_done = max(t for p, _, t in rig.transport.calls if p == "B")
    assert b_done < first_refusal + 1.0  # B never waited for A's circuit (open for 1 s first)
    a_calls = [t for p, _, t in rig.transport.calls if p == "A"]
    # Probes 1, 2, 4, 8 s apart: a backing-off circuit, not a hot loop; the next (at 31 s) is past max_elapsed.
    assert [round(y - x) for x, y in zip(a_calls, a_calls[1:])] == [1, 2, 4, 8]
    assert sorted(rig.dead.events()) == sorted(a)
    assert {e["errorCode"] for e in rig.dead.entries} == {"ResourceNotFoundException"}
    assert rig.ledger.acked == Counter(a + b)


async def test_a_circuit_is_closed_once_its_project_has_nothing_left_to_send(virtual_time):
    # Another project delivers: A's denial is about A, so its events end at max_elapsed.
    rig = Rig(virtual_time, lambda n, p, s: CallResult(403, "AccessDeniedException", "denied") if p == "A" else OK,
              retry=RetryConfig(max_elapsed=5.0, initial_backoff=0.1, max_backoff=2.0))
    await rig.run([rig.ledger.batch("B", support.events(1)), rig.ledger.batch("A", support.events(3))])
    assert len(rig.dead.entries) == 3
    assert rig.metric("forwarder_circuit_open", {"project": "A"}) == 0  # the alert must not fire forever


async def test_events_that_keep_failing_are_dead_lettered_at_max_elapsed_with_the_last_error(virtual_time):
    rig = Rig(virtual_time, lambda n, p, s: CallResult(500, "InternalServerException", "boom"),
              retry=RetryConfig(20.0, 0.01, 5.0))
    started = virtual_time.time()
    await rig.run([rig.ledger.batch("p", support.events(3))])
    assert virtual_time.time() - started >= 20.0
    assert [e["errorCode"] for e in rig.dead.entries] == ["InternalServerException"] * 3
    assert rig.dead.entries[0]["attempts"] >= 2
    # a 500 may have stored the events: every copy after the first counts as a possible duplicate
    assert rig.metric("forwarder_duplicates_total") == 3 * (rig.dead.entries[0]["attempts"] - 1)


async def test_close_returns_batches_that_could_not_be_delivered(virtual_time):
    gate = asyncio.Event()

    class Stuck:
        async def put_events(self, project, evs):
            await gate.wait()
            return OK

    rig = Rig(virtual_time, None, concurrency=1, transport=Stuck())
    await rig.sender.start(rig.crashes.append)
    await rig.sender.send(rig.ledger.batch("p", support.events(2)))
    await rig.sender.send(rig.ledger.batch("q", support.events(3)))
    assert not await rig.sender.drain(0.05)
    left = await rig.sender.close()
    assert sorted(len(b.events) for b in left) == [2, 3]
    assert not rig.ledger.acked


async def test_a_worker_that_crashes_on_a_bookkeeping_bug_is_reported(virtual_time):
    rig = Rig(virtual_time, lambda *a: OK, concurrency=1)
    bug = RuntimeError("the buffer lost its mind")

    async def broken_ack(receipt):
        raise bug

    rig.ledger.ack = broken_ack
    await rig.sender.start(rig.crashes.append)
    await rig.sender.send(rig.ledger.batch("p", support.events(1)))
    while rig.sender.alive:
        await asyncio.sleep(0.01)
    assert rig.crashes == [bug]
    await rig.sender.close()


@pytest.mark.parametrize("answer", [
    no_answer(RetryReason.PROTOCOL, "an HTML page", maybe_delivered=True),
    no_answer(RetryReason.CONNECTION, "closed mid-answer", maybe_delivered=True),
])
async def test_an_answer_that_confirms_nothing_is_retried_as_a_possible_duplicate(virtual_time, answer):
    rig = Rig(virtual_time, lambda n, p, s: answer if n == 0 else OK)
    evs = support.events(10)
    await rig.run([rig.ledger.batch("p", evs)])
    assert [len(sent) for _, sent, _ in rig.transport.calls] == [10, 10]
    assert rig.ledger.acked == Counter(evs)
    assert rig.metric("forwarder_events_sent_total") == 10  # once, after the confirmed call
    assert rig.metric("forwarder_duplicates_total") == 10
    assert rig.metric("forwarder_retries_total", {"reason": answer.unanswered.value}) == 10


async def test_a_failed_dead_letter_write_neither_resends_delivered_events_nor_loses_the_refused_one(virtual_time):
    evs = support.events(4)

    def answer(n, project, sent):
        return CallResult(200, failed=((2, "ValidationException", "bad"),)) if n == 0 else OK

    rig = Rig(virtual_time, answer, dead_failures=2)
    await rig.run([rig.ledger.batch("p", evs)])
    assert len(rig.transport.calls) == 1  # the refused event is not sent again, only written again
    assert rig.transport.delivered == Counter(evs[:2] + evs[3:])
    assert rig.dead.events() == [evs[2]]
    assert rig.ledger.acked == Counter(evs)
    assert rig.metric("forwarder_dead_letter_write_errors_total") == 2


async def test_an_outage_sends_one_probe_at_a_time_and_teaches_the_rate_limiter_nothing(virtual_time):
    vt = virtual_time
    up_at = 60.0

    def answer(n, project, sent):
        return OK if vt.time() >= up_at else DOWN

    rig = Rig(vt, answer, retry=RetryConfig(max_elapsed=600.0, initial_backoff=0.1, max_backoff=20.0),
              concurrency=4, rate=200.0)
    rate_before = rig.limiter.rate
    batches = [rig.ledger.batch("p", support.events(50, f"b{i}-")) for i in range(40)]
    await rig.run(batches)
    down_calls = [t for _, _, t in rig.transport.calls if t < up_at]
    # Once the outage is recognized, calls are probes spaced by the probe backoff (capped at 1 s).
    probes = down_calls[OUTAGE_AFTER + 3:]  # the calls in flight when it began may still go out
    assert all(y - x >= 0.1 - 1e-9 for x, y in zip(probes, probes[1:]))
    assert len(down_calls) <= OUTAGE_AFTER + 4 + up_at / MAX_PROBE_INTERVAL + 5
    assert rig.limiter.rate >= rate_before  # 503s are not throttles
    assert not rig.dead.entries and rig.ledger.acked == Counter(e for b in batches for e in b.events)
    assert rig.metric("forwarder_outage") == 0
    assert rig.metric("forwarder_outage_seconds_total") > 55
    assert rig.metric("forwarder_outage_probes_total") >= 10


async def test_the_end_of_an_outage_resumes_backed_off_retries_at_once(virtual_time):
    vt = virtual_time
    up_at = 30.0
    rig = Rig(vt, lambda n, p, s: OK if vt.time() >= up_at else DOWN,
              retry=RetryConfig(max_elapsed=600.0, initial_backoff=0.5, max_backoff=60.0), rate=1000.0)
    batches = [rig.ledger.batch("p", support.events(5, f"b{i}-")) for i in range(20)]
    await rig.run(batches)
    # Every batch went out right after the probe that found the service back,
    # not at the end of its own (up to 60 s) backoff.
    assert max(t for _, _, t in rig.transport.calls) < up_at + MAX_PROBE_INTERVAL + 1.0


class Failing(DeadLetters):
    """A dead-letter file whose writes fail until ``until`` on the virtual clock, recording each try."""

    def __init__(self, clock, until: float) -> None:
        super().__init__()
        self.clock = clock
        self.until = until
        self.tries: list[float] = []

    async def write(self, data: bytes) -> None:
        self.tries.append(self.clock())
        if self.clock() < self.until:
            raise OSError(28, "No space left on device")
        await super().write(data)


async def test_a_failing_dead_letter_write_is_tried_again_after_a_growing_wait_capped_at_max_backoff(virtual_time):
    vt = virtual_time
    rig = Rig(vt, lambda n, p, s: CallResult(400, "ValidationException", "bad"),
              retry=RetryConfig(max_elapsed=600.0, initial_backoff=0.1, max_backoff=5.0))
    rig.dead = rig.sender._effects._dead_letters = Failing(vt.time, until=60.0)
    evs = support.events(1)
    await rig.run([rig.ledger.batch("p", evs)])
    gaps = [round(y - x, 6) for x, y in zip(rig.dead.tries, rig.dead.tries[1:])]
    assert gaps[:7] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]  # doubling, then capped
    assert set(gaps[7:]) == {5.0}
    assert len(rig.dead.tries) <= 6 + 60 / 5.0 + 2  # a full disk costs a write every few seconds, not 37 a second
    assert rig.dead.events() == evs and rig.ledger.acked == Counter(evs)
    assert len(rig.transport.calls) == 1  # written again, never sent again


async def test_every_extra_copy_of_a_batch_that_may_have_been_stored_counts_as_possible_duplicates(virtual_time):
    timeout = no_answer(RetryReason.TIMEOUT, "no answer", maybe_delivered=True)
    script = [timeout, timeout, DOWN, OK]  # the 503 refused its copy at the door: not a copy stored
    rig = Rig(virtual_time, lambda n, p, s: script[n])
    evs = support.events(10)
    await rig.run([rig.ledger.batch("p", evs)])
    assert len(rig.transport.calls) == 4
    assert rig.metric("forwarder_duplicates_total") == 20  # copies 2 and 4 each may repeat copy 1
    assert rig.ledger.acked == Counter(evs)


async def test_a_probe_call_that_raises_in_an_outage_gives_its_slot_back_and_delivery_recovers(virtual_time):
    vt = virtual_time
    retry = RetryConfig(max_elapsed=300.0, initial_backoff=0.1, max_backoff=20.0)

    class RaisingProbe(Scripted):
        async def put_events(self, project, evs):
            if len(self.calls) == OUTAGE_AFTER:  # the first probe after three 503s
                self.calls.append((project, list(evs), vt.time()))
                raise RuntimeError("a bug in the call path")
            return await super().put_events(project, evs)

    rig = Rig(vt, None, retry=retry, transport=RaisingProbe(lambda n, p, s: DOWN if n < OUTAGE_AFTER else OK, vt.time))
    evs = support.events(5)
    await rig.run([rig.ledger.batch("p", evs)], timeout=60.0)
    raised_at = rig.transport.calls[OUTAGE_AFTER][2]
    assert len(rig.transport.calls) == OUTAGE_AFTER + 2
    # The batch's next backoff step (at most 0.1 * 2**3 s after its fourth attempt), not max_backoff.
    step = retry.initial_backoff * 2 ** OUTAGE_AFTER
    assert rig.transport.calls[-1][2] <= raised_at + step + MAX_PROBE_INTERVAL
    assert rig.ledger.acked == Counter(evs) and not rig.dead.entries
    endpoint = rig.sender.admission.endpoint
    assert not endpoint.down and not endpoint.probing
    assert rig.metric("forwarder_internal_errors_total", {"kind": "send_failed"}) == 1


async def test_a_project_probe_that_raises_lets_the_next_batch_probe_the_circuit(virtual_time):
    vt = virtual_time

    class RaisingProbe(Scripted):
        async def put_events(self, project, evs):
            if len(self.calls) == 1:  # the circuit's first probe
                self.calls.append((project, list(evs), vt.time()))
                raise RuntimeError("a bug in the call path")
            return await super().put_events(project, evs)

    refused = CallResult(403, "AccessDeniedException", "denied")
    rig = Rig(vt, None, retry=RetryConfig(max_elapsed=60.0, initial_backoff=0.1, max_backoff=2.0),
              transport=RaisingProbe(lambda n, p, s: refused if n == 0 else OK, vt.time))
    evs = support.events(3)
    await rig.run([rig.ledger.batch("A", evs)], timeout=60.0)
    assert rig.ledger.acked == Counter(evs) and not rig.dead.entries  # delivered, not held until it expired
    assert rig.transport.calls[-1][2] < 10.0
    assert not rig.sender.admission.circuits.probing("A")


async def test_a_new_initial_backoff_reaches_the_outage_breakers_probes(virtual_time):
    vt = virtual_time
    up_at = 10.0
    rig = Rig(vt, lambda n, p, s: OK if vt.time() >= up_at else DOWN, concurrency=1,
              retry=RetryConfig(max_elapsed=600.0, initial_backoff=0.001, max_backoff=0.01))
    await rig.sender.reconfigure(RetryConfig(max_elapsed=600.0, initial_backoff=0.8, max_backoff=0.01))
    await rig.run([rig.ledger.batch("p", support.events(1))])
    times = [t for _, _, t in rig.transport.calls]
    # The retries' own waits stay under max_backoff (0.01 s): the first probe waits the new initial backoff.
    assert times[OUTAGE_AFTER] - times[OUTAGE_AFTER - 1] >= 0.8 - 1e-9
    assert all(y - x >= 0.8 - 1e-9 for x, y in zip(times[OUTAGE_AFTER - 1:], times[OUTAGE_AFTER:]))


OUTCOMES = st.sampled_from(["ok", "partial", "throttle", "server", "refused", "timeout", "slow", "html",
                            "bad_request", "not_found", "raise"])


class Chaos:
    """A transport following a script of call outcomes, then answering 200 (a healthy upstream)."""

    def __init__(self, script, rng, clock) -> None:
        self.script = script
        self.rng = rng
        self.clock = clock
        self.calls: list[tuple[str, list[bytes], float]] = []
        self.delivered: Counter[bytes] = Counter()

    async def put_events(self, project, evs):
        n = len(self.calls)
        self.calls.append((project, list(evs), self.clock()))
        kind = self.script[n] if n < len(self.script) else "ok"
        if kind == "raise":
            raise RuntimeError("a bug in the call path")
        if kind == "slow":  # the client's own deadline ends it; a shutdown may cancel it first
            await asyncio.sleep(5.0)
            kind = "timeout"
        result = self._answer(kind, len(evs))
        if result.status == 200 or result.maybe_delivered:
            failed = {i for i, _, _ in result.failed}
            self.delivered.update(e for i, e in enumerate(evs) if i not in failed)
        await asyncio.sleep(0)
        return result

    def _answer(self, kind, size):
        if kind == "partial":
            failed = tuple((i, self.rng.choice(["ThrottlingException", "ValidationException",
                                                "InternalServerException"]), "entry failed")
                           for i in range(size) if self.rng.random() < 0.3)
            return CallResult(200, failed=failed)
        return {
            "ok": OK, "throttle": CallResult(429, "ThrottlingException"),
            "server": CallResult(500, "InternalServerException"), "refused": DOWN,
            "timeout": no_answer(RetryReason.TIMEOUT, "", maybe_delivered=True),
            "html": no_answer(RetryReason.PROTOCOL, "<html>", maybe_delivered=True),
            "bad_request": CallResult(400, "ValidationException", "bad"),
            "not_found": CallResult(404, "ResourceNotFoundException"),
        }[kind]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(OUTCOMES, min_size=1, max_size=30),
       sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
       seed=st.integers(0, 1000), dead_failures=st.integers(0, 3),
       stop_at=st.one_of(st.none(), st.floats(0.0, 30.0)))
@example(script=["refused"] * OUTAGE_AFTER + ["raise"], sizes=[5], seed=0, dead_failures=0, stop_at=None)
@example(script=["not_found", "raise"], sizes=[5, 5], seed=0, dead_failures=0, stop_at=None)
@example(script=["refused"] * OUTAGE_AFTER + ["slow"], sizes=[5, 5], seed=0, dead_failures=0, stop_at=2.0)
def test_whatever_calls_do_every_event_ends_exactly_once_delivered_dead_lettered_or_still_scheduled(
        script, sizes, seed, dead_failures, stop_at):
    """Answers, failed entries, exceptions, timeouts, a shutdown cancelling calls: each event is acknowledged
    (delivered or dead-lettered) or handed back by close(), exactly once; nothing is stuck behind a leaked slot."""

    async def scenario():
        vt = VirtualTime(asyncio.get_running_loop())
        try:
            transport = Chaos(script, random.Random(seed), vt.time)
            rig = Rig(vt, None, retry=RetryConfig(20.0, 0.01, 1.0), dead_failures=dead_failures, seed=seed,
                      transport=transport)
            batches = [rig.ledger.batch(f"p{i % 2}", support.events(n, f"b{i}-")) for i, n in enumerate(sizes)]
            await rig.sender.start(rig.crashes.append)
            for b in batches:
                await rig.sender.send(b)
            # Never stuck: with the upstream healthy after the script, everything resolves within the deadline.
            drained = await rig.sender.drain(300.0 if stop_at is None else stop_at)
            assert drained or stop_at is not None, "a batch is stuck"
            left = await rig.sender.close()  # a shutdown: cancels the calls in flight
            return rig, batches, left
        finally:
            vt.restore()

    rig, batches, left = asyncio.run(scenario())
    every = [e for b in batches for e in b.events]
    assert rig.crashes == []
    assert rig.ledger.acked + Counter(e for b in left for e in b.events) == Counter(every)  # each exactly once
    dead = Counter(rig.dead.events())
    assert all(c == 1 for c in dead.values())
    assert set(rig.ledger.acked) - set(dead) <= set(rig.transport.delivered)  # acknowledged: Evidently took it
    assert all(len(evs) <= 50 for _, evs, _ in rig.transport.calls)
    assert not rig.sender.admission.endpoint.probing  # no slot leaked, whatever the calls did
    assert not any(rig.sender.admission.circuits.probing(p) for p in ("p0", "p1"))


# --- refusals about the forwarder, not its events (issue 22) ---------------------

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
