"""The status document: what the forwarder is doing and why it is stuck, for a person.

``GET /status`` serves it as JSON (on the intake's probe routes and on the
metrics listener); ``forwarder status`` renders it as a table (``--watch``
refreshes it, like ``vector top``). It is assembled at request time from the
stages' read-only state; nothing here changes them. Projects are bounded like
the metrics' ``project`` label: beyond ``MAX_PROJECT_LABELS`` they are summed
into one row named "other".
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from forwarder import __version__
from forwarder.observability import MAX_PROJECT_LABELS, cause

if TYPE_CHECKING:
    from forwarder.app import Forwarder

OTHER = "other"


def iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="seconds")


def document(fwd: Forwarder, now: float | None = None) -> dict[str, Any]:
    """The status of one running forwarder (``now``: wall clock, for tests)."""
    now = time.time() if now is None else now
    config = fwd.config
    sender, admission, limiter = fwd.sender, fwd.sender.admission, fwd.limiter
    monotonic = time.monotonic()
    blocked = admission.blocked_state
    outage = admission.endpoint.down_since
    return {
        "version": __version__,
        "uptime": round(now - fwd.started_at, 1),
        "state": _state(fwd),
        "evidently": {
            "region": config.evidently.region,
            "region_source": config.evidently.region_source,
            "endpoint": fwd.client.endpoint if fwd.client is not None else config.evidently.endpoint_url,
            "credentials": _credentials(fwd),
        },
        "blocked": None if blocked is None else {
            "reason": blocked.reason, "error": f"delivery blocked: {cause(blocked.code, blocked.message)}",
            "since": iso(now - (monotonic - blocked.since)),
        },
        "buffer": {
            "type": config.buffer.type,
            "events": fwd.buffer.depth, "max_events": config.buffer.max_events,
            "bytes": fwd.buffer.nbytes, "max_bytes": config.buffer.max_bytes,
            "full": fwd.buffer.full,
            "oldest_event_age": _oldest_age(fwd, now),
        },
        "sending": {
            "allowed_rate": round(limiter.rate, 2), "max_rate": limiter.max_rate,
            "measured_rate": round(limiter.measured, 2),
            "controller": config.evidently.rate_controller,
            "phase": "slow_start" if limiter.slow_start else "controlled",
            "calls_in_flight": sender.inflight,
            "last_error": admission.last_error or None,
            "last_error_at": iso(admission.last_error_at),
        },
        "outage": None if outage is None else {
            "since": iso(now - (monotonic - outage)), "seconds": round(monotonic - outage, 1),
            "probes": admission.endpoint.probes, "last_error": admission.last_error or None,
        },
        "dead_letter": {
            "path": config.dead_letter.path,
            "events": sum(t.dead_lettered for t in fwd.observer.projects.values()),
            "bytes": _size(config.dead_letter.path),
        },
        "projects": projects(fwd, now, monotonic),
    }


def _state(fwd: Forwarder) -> str:
    """One word first: what an operator should look at."""
    if not fwd.alive():
        return "failed"
    if not fwd.intake.accepting:
        return "draining"
    if fwd.sender.admission.blocked_state is not None or (fwd.credentials is not None
                                                          and fwd.credentials.method is None):
        return "blocked"
    if fwd.sender.admission.endpoint.down:
        return "outage"
    if fwd.buffer.full:
        return "buffer_full"
    return "ok"


def _credentials(fwd: Forwarder) -> dict[str, Any]:
    if fwd.credentials is None:
        return {"found": True, "method": "given"}  # a transport or credentials handed in (tests, dev)
    return {"found": fwd.credentials.method is not None, "method": fwd.credentials.method}


def _oldest_age(fwd: Forwarder, now: float) -> float:
    times = [t for t in (fwd.buffer.oldest_unread(), fwd.flush_loop.batcher.oldest(), fwd.sender.oldest())
             if t is not None]
    return round(max(0.0, now - min(times)), 3) if times else 0.0


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def projects(fwd: Forwarder, now: float, monotonic: float) -> list[dict[str, Any]]:
    """One row per project, at most MAX_PROJECT_LABELS, the rest summed into "other"."""
    admission = fwd.sender.admission
    open_batches = fwd.flush_loop.batcher.open_by_project()
    waiting, taken = fwd.sender.events_by_project()
    circuits = admission.circuits.state()
    tallies = fwd.observer.projects
    # Projects with a metrics label (they have a tally) first: their counts are their own.
    labelled = sorted(set(tallies) - {OTHER})
    names = labelled + sorted((set(open_batches) | set(waiting) | set(taken) | set(circuits)) - set(labelled) - {OTHER})
    shown, rest = names[:MAX_PROJECT_LABELS], names[MAX_PROJECT_LABELS:]
    rows = []
    for name in shown:
        row = _row(name, open_batches.get(name, 0) + waiting.get(name, 0), taken.get(name, 0), tallies.get(name))
        circuit = circuits.get(name)
        if circuit is not None:
            code, message, since, open_until, _ = circuit
            row["circuit"] = "open" if open_until > monotonic else "probing"
            row["reason"] = cause(code, message)
            row["circuit_since"] = iso(now - (monotonic - since))
            missing = admission.refusals.missing_since(name)
            if missing is not None:
                grace = admission.retry.not_found_grace
                row["not_found_grace"] = grace
                row["dead_lettered_in"] = round(max(0.0, missing + grace - monotonic), 1)
        rows.append(row)
    if rest or OTHER in tallies:
        other = _row(OTHER, sum(open_batches.get(n, 0) + waiting.get(n, 0) for n in rest),
                     sum(taken.get(n, 0) for n in rest), tallies.get(OTHER))
        other["projects"] = len(rest)
        other["circuits_open"] = sum(1 for n in rest if n in circuits)
        rows.append(other)
    return rows


def _row(name: str, queued: int, in_flight: int, tally: Any) -> dict[str, Any]:
    return {
        "project": name, "queued": queued, "in_flight": in_flight,
        "delivered": tally.delivered if tally else 0, "dead_lettered": tally.dead_lettered if tally else 0,
        "last_delivery": iso(tally.last_delivery) if tally else None,
        "last_dead_letter": (tally.last_dead_letter or None) if tally else None,
        "circuit": "closed", "reason": None,
    }
