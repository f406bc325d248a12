"""The emulator's faults: what can be injected, how each field is checked, the account quota, what is in force."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_NUMBER_TYPES = (int, float)  # compared with type(), so bool is not a number


@dataclass(frozen=True)
class FaultConfig:
    """Faults to inject; see ``normalize_fault_fields`` for each field's rules."""

    quota: float = 0.0  # PutProjectEvents requests/s for the whole account; 0 = unlimited
    quota_burst: float | None = None  # token bucket capacity; None = one second's worth
    throttle_event_rate: float = 0.0  # random fraction of events failed as throttled
    invalid_event_rate: float = 0.0  # stable fraction of events failed as invalid
    reject_marker: str = ""  # data containing it fails the whole request with 400
    error_rate: float = 0.0  # fraction of requests answered 500
    latency: float = 0.0  # seconds added before each PutProjectEvents answer
    down: bool = False  # PutProjectEvents answers 503
    missing_projects: tuple[str, ...] = ()
    denied_projects: tuple[str, ...] = ()
    seed: int | None = None
    record: bool = True  # False keeps counters only (benchmarks)


FAULT_FIELDS = tuple(f.name for f in dataclasses.fields(FaultConfig))


def _number(name: str, value: Any, low: float, high: float | None = None) -> float:
    bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
    if type(value) not in _NUMBER_TYPES or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _names(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(type(v) is str for v in value):
        raise ValueError(f"{name} must be a list of project names, got {value!r}")
    return tuple(value)


def _normalize_one(name: str, value: Any) -> Any:
    if name in ("throttle_event_rate", "invalid_event_rate", "error_rate"):
        return _number(name, value, 0.0, 1.0)
    if name in ("quota", "latency"):
        return _number(name, value, 0.0)
    if name == "quota_burst":
        # Below one token a bucket could never admit a request.
        return None if value is None else _number(name, value, 1.0)
    if name in ("down", "record"):
        return _flag(name, value)
    if name in ("missing_projects", "denied_projects"):
        return _names(name, value)
    if name == "reject_marker":
        if type(value) is not str:
            raise ValueError(f"reject_marker must be a string, got {value!r}")
        return value
    if name == "seed":
        if value is not None and type(value) is not int:
            raise ValueError(f"seed must be an integer or null, got {value!r}")
        return value
    raise ValueError(f"unknown fault field {name!r}; known: {', '.join(FAULT_FIELDS)}")


def normalize_fault_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Checked, normalized fault fields; ValueError naming the first bad one."""
    return {name: _normalize_one(name, value) for name, value in fields.items()}


def bucket_capacity(faults: FaultConfig) -> float:
    """Token bucket size: the burst if set, else one second's worth, never below one."""
    burst = faults.quota if faults.quota_burst is None else faults.quota_burst
    return max(1.0, burst)


class TokenBucket:
    """The account's request quota: ``capacity`` tokens refilled at ``rate``/s."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.last = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class FaultState:
    """The faults in force and what they keep between requests: the random source and the quota's bucket."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.config = FaultConfig()
        self.rng = random.Random()
        self.missing: frozenset[str] = frozenset()
        self.denied: frozenset[str] = frozenset()
        self._clock = clock
        self._bucket: TokenBucket | None = None

    def configure(self, fields: Mapping[str, Any]) -> None:
        """Change faults at once; ValueError names a bad field, and then nothing changes."""
        changes = normalize_fault_fields(fields)
        self.config = config = dataclasses.replace(self.config, **changes)
        if "seed" in changes:
            self.rng = random.Random(config.seed)
        if "quota" in changes or "quota_burst" in changes:
            # A new quota starts with a full bucket, as after a quota increase.
            self._bucket = TokenBucket(config.quota, bucket_capacity(config), self._clock()) if config.quota else None
        self.missing = frozenset(config.missing_projects)
        self.denied = frozenset(config.denied_projects)

    def over_quota(self) -> bool:
        """True when this request exceeds the account's quota; one within it takes a token."""
        return self._bucket is not None and not self._bucket.take(self._clock())

    def injects_error(self) -> bool:
        """True when this request is to be answered 500 (``error_rate``)."""
        rate = self.config.error_rate
        return bool(rate) and self.rng.random() < rate
