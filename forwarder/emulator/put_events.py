"""The emulated PutProjectEvents: one request checked, faults applied, its events counted, recorded and answered."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from forwarder.evidently.protocol import ProtocolError, project_from_raw_path, protocol_error_response
from forwarder.evidently.sigv4 import Verifier

from forwarder.emulator.decisions import (
    ERROR_MESSAGES,
    THROTTLING,
    EventIds,
    access_key_from_headers,
    event_error_codes,
    invalid,
    parse_events,
    rejected_index,
    verify_signature,
)
from forwarder.emulator.faults import FaultState
from forwarder.emulator.records import KeyStats, Recording, Stats


class PutProjectEvents:
    """The operation and what it keeps: counters and, while ``record`` is on, the events accepted.

    With a ``verifier`` every SigV4 signature is verified; without, only its form.
    """

    def __init__(self, faults: FaultState, verifier: Verifier | None) -> None:
        self.faults = faults
        self.stats = Stats()
        self.recording = Recording()
        self._verifier = verifier
        self._ids = EventIds()

    def reset(self) -> None:
        """Forget accepted events and counters (faults stay)."""
        self.recording.clear()
        self.stats = Stats()

    def answer(self, method: str, raw_path: str, headers: Any, body: bytes | ProtocolError) -> web.Response:
        """The answer to one request; ``body`` is the ProtocolError when it was refused at the door."""
        stats = self.stats
        stats.requests_total += 1
        batch = stats.requests_total
        state = self.faults
        faults = state.config
        if isinstance(body, ProtocolError):  # refused at the door, before anything else
            return self._refuse(body)
        try:
            access_key = access_key_from_headers(headers)
            if self._verifier is not None:
                verify_signature(self._verifier, method, raw_path, headers, body)
        except ProtocolError as err:
            return self._refuse(err)
        key_stats = stats.key(access_key)
        key_stats.requests += 1
        if faults.down:
            return self._refuse(ProtocolError(503, "ServiceUnavailableException", "Service is unavailable"))
        if state.over_quota():
            stats.throttled_requests += 1
            key_stats.throttled += 1
            return self._refuse(ProtocolError(429, THROTTLING, "Rate exceeded"))
        if state.injects_error():
            return self._refuse(ProtocolError(500, "InternalServerException", "Internal server error (injected)"))
        try:
            project = project_from_raw_path(raw_path)
            if project in state.missing:
                raise ProtocolError(404, "ResourceNotFoundException", f"Project {project} does not exist")
            if project in state.denied:
                raise ProtocolError(403, "AccessDeniedException", f"Access to project {project} is denied")
            events = parse_events(body)
            index = rejected_index(events, faults.reject_marker)
            if index is not None:
                raise invalid(f"events[{index}].data was rejected by the service")
        except ProtocolError as err:
            return self._refuse(err)
        return self._accept(project, events, access_key, key_stats, batch)

    def _refuse(self, err: ProtocolError) -> web.Response:
        self.stats.requests_by_status[err.status] += 1
        return protocol_error_response(err)

    def _accept(
        self, project: str, events: list[dict[str, Any]], access_key: str, key_stats: KeyStats, batch: int
    ) -> web.Response:
        faults = self.faults.config
        stats = self.stats
        codes = event_error_codes(events, faults.invalid_event_rate, faults.throttle_event_rate, self.faults.rng)
        next_id = self._ids.next
        if codes is None:
            kept = events
            results = [{"eventId": next_id()} for _ in events]
        else:
            kept, results = [], []
            for event, code in zip(events, codes):
                if code is None:
                    kept.append(event)
                    results.append({"eventId": next_id()})
                else:
                    stats.events_failed_by_code[code] += 1
                    results.append({"errorCode": code, "errorMessage": ERROR_MESSAGES[code]})
        if faults.record:
            stats.duplicates += self.recording.add(project, kept, access_key, batch)
        n_kept = len(kept)
        stats.requests_by_status[200] += 1
        stats.batch_sizes[len(events)] += 1
        stats.events_accepted += n_kept
        stats.events_by_project[project] += n_kept
        key_stats.accepted_events += n_kept
        body = {"eventResults": results, "failedEventCount": len(events) - n_kept}
        return web.Response(body=orjson.dumps(body), content_type="application/json")
