"""What the emulator keeps: accepted events (when recording) and counters, served by its control API."""

from __future__ import annotations

import dataclasses
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
