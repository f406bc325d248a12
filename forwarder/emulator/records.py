"""What the emulator keeps: accepted events (when recording) and counters, served by its control API."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class AcceptedEvent:
    project: str
    data: str
    timestamp: float
    type: str
    batch: int  # sequence number of the request that carried it
    received_at: float  # wall-clock epoch seconds, comparable with timestamp
    access_key: str


class Recording:
    """The accepted events in order, and which of them arrived before (a resend the service took twice)."""

    def __init__(self) -> None:
        self.events: list[AcceptedEvent] = []
        self._seen: set[int] = set()  # hashes of the events recorded

    def add(self, project: str, events: list[dict[str, Any]], access_key: str, batch: int) -> int:
        """Record ``events``, accepted by request number ``batch``; returns how many are duplicates."""
        now = time.time()
        seen, append = self._seen, self.events.append
        duplicates = 0
        for event in events:
            data, timestamp, type_ = event["data"], event["timestamp"], event["type"]
            digest = hash((project, data, timestamp, type_))
            if digest in seen:
                duplicates += 1
            else:
                seen.add(digest)
            append(AcceptedEvent(project, data, timestamp, type_, batch, now, access_key))
        return duplicates

    def clear(self) -> None:
        self.events.clear()
        self._seen.clear()


@dataclass(slots=True)
class KeyStats:
    accepted_events: int = 0
    requests: int = 0
    throttled: int = 0


@dataclass
class Stats:
    requests_total: int = 0
    requests_by_status: Counter = field(default_factory=Counter)
    events_accepted: int = 0
    events_failed_by_code: Counter = field(default_factory=Counter)
    throttled_requests: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    events_by_project: Counter = field(default_factory=Counter)
    access_keys: dict[str, KeyStats] = field(default_factory=dict)
    duplicates: int = 0

    def key(self, access_key: str) -> KeyStats:
        stats = self.access_keys.get(access_key)
        if stats is None:
            stats = self.access_keys[access_key] = KeyStats()
        return stats

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "requests_by_status": {str(k): v for k, v in sorted(self.requests_by_status.items())},
            "events_accepted": self.events_accepted,
            "events_failed_by_code": dict(self.events_failed_by_code),
            "throttled_requests": self.throttled_requests,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "events_by_project": dict(self.events_by_project),
            "access_keys": {k: dataclasses.asdict(v) for k, v in self.access_keys.items()},
            "duplicates": self.duplicates,
        }
