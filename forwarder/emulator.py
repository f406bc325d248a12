"""A local Evidently PutProjectEvents server with injectable faults.

moto and LocalStack do not implement Evidently, so tests, benchmarks and users'
integration tests run against this. It answers exactly as the service does
(rest-json, ``x-amzn-ErrorType``), so a real botocore client raises the right
exceptions, and it records what it accepted for inspection over
``/_emulator/*``. Decisions (auth, body validation, per-event faults, quota)
are pure functions or small classes; the ``Emulator`` only wires them to HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import itertools
import random
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from forwarder.protocol import (
    EVENT_TYPES,
    MAX_EVENTS_PER_CALL,
    PUT_PATH_PREFIX,
    ProtocolError,
    project_from_raw_path,
    protocol_error_response,
)

VALIDATION = "ValidationException"
THROTTLING = "ThrottlingException"
_EVENT_TYPES = frozenset(EVENT_TYPES)
_NUMBER_TYPES = (int, float)  # compared with type(), so bool is not a number
# Large enough that aiohttp never answers 413 to a batch the service would take.
_MAX_BODY_BYTES = 16 * 1024 * 1024


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


# --- fault configuration ---------------------------------------------------

_FAULT_FIELDS = tuple(f.name for f in dataclasses.fields(FaultConfig))


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
    raise ValueError(f"unknown fault field {name!r}; known: {', '.join(_FAULT_FIELDS)}")


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


# --- request decisions (pure) ----------------------------------------------

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/\s,]+)/\d{8}/[a-z0-9-]+/evidently/aws4_request,"
    r" ?SignedHeaders=[a-z0-9;-]+, ?Signature=[0-9a-f]{64}"
)
_AMZ_DATE_RE = re.compile(r"\d{8}T\d{6}Z")


def access_key_from_headers(headers: Mapping[str, str]) -> str:
    """The caller's access key id, after the checks the service makes on SigV4.

    The signature itself is not verified: the emulator holds no secrets.
    """
    authorization = headers.get("Authorization")
    if authorization is None:
        raise ProtocolError(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    match = _AUTH_RE.fullmatch(authorization)
    if match is None:
        raise ProtocolError(
            403, "IncompleteSignatureException",
            "Authorization header must be 'AWS4-HMAC-SHA256 Credential=<akid>/<yyyymmdd>/"
            "<region>/evidently/aws4_request, SignedHeaders=<headers>, Signature=<64 hex>'",
        )
    if _AMZ_DATE_RE.fullmatch(headers.get("X-Amz-Date", "")) is None:
        raise ProtocolError(
            403, "IncompleteSignatureException",
            "Authorization requires an X-Amz-Date header like 20240101T000000Z",
        )
    return match.group(1)


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(400, VALIDATION, message)


def _is_json_object(data: str) -> bool:
    if not data.lstrip().startswith("{"):
        return False
    try:
        return type(orjson.loads(data)) is dict
    except orjson.JSONDecodeError:
        return False


def parse_events(body: bytes) -> list[dict[str, Any]]:
    """The events of a PutProjectEvents body, or a ValidationException naming the field."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _invalid("request body must be a JSON object") from None
    if type(doc) is not dict:
        raise _invalid("request body must be a JSON object")
    events = doc.get("events")
    if type(events) is not list:
        raise _invalid("events is required and must be a list")
    if len(events) > MAX_EVENTS_PER_CALL:
        raise _invalid(f"events must hold at most {MAX_EVENTS_PER_CALL} events, got {len(events)}")
    for i, event in enumerate(events):
        if type(event) is not dict:
            raise _invalid(f"events[{i}] must be an object")
        data = event.get("data")
        if type(data) is not str or not _is_json_object(data):
            raise _invalid(f"events[{i}].data must be a string holding a JSON object")
        if type(event.get("timestamp")) not in _NUMBER_TYPES:
            raise _invalid(f"events[{i}].timestamp must be a number of epoch seconds")
        if event.get("type") not in _EVENT_TYPES:
            raise _invalid(f"events[{i}].type must be one of {', '.join(EVENT_TYPES)}")
    return events


def rejected_index(events: list[dict[str, Any]], marker: str) -> int | None:
    """Index of the first event whose data holds ``marker``; None if none or marker is empty."""
    if marker:
        for i, event in enumerate(events):
            if marker in event["data"]:
                return i
    return None


def stable_fraction(data: str) -> float:
    """A number in [0, 1) fixed by ``data``, so an invalid event stays invalid on resend."""
    digest = hashlib.blake2b(data.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def event_error_codes(
    events: list[dict[str, Any]], invalid_rate: float, throttle_rate: float, rng: random.Random
) -> list[str | None] | None:
    """Per event, the error code to answer or None to accept; None when all are accepted."""
    if not invalid_rate and not throttle_rate:
        return None
    codes: list[str | None] = []
    for event in events:
        if invalid_rate and stable_fraction(event["data"]) < invalid_rate:
            codes.append(VALIDATION)
        elif throttle_rate and rng.random() < throttle_rate:
            codes.append(THROTTLING)
        else:
            codes.append(None)
    return codes


_ERROR_MESSAGES = {
    VALIDATION: "Event failed validation",
    THROTTLING: "Rate exceeded for event",
}


# --- the server ------------------------------------------------------------


class Emulator:
    """An Evidently PutProjectEvents endpoint with faults, counters and a control API."""

    def __init__(self, faults: FaultConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.faults = FaultConfig()
        self._clock = clock
        self._rng = random.Random()
        self._bucket: TokenBucket | None = None
        self._missing: frozenset[str] = frozenset()
        self._denied: frozenset[str] = frozenset()
        self.configure(**dataclasses.asdict(faults or FaultConfig()))
        self.accepted: list[AcceptedEvent] = []
        self.stats = Stats()
        self._seen: set[int] = set()  # hashes of accepted events, only while recording
        # Event ids: one random UUID prefix per emulator and a counter, far cheaper
        # than a uuid4 per event at 50k events/s, and still unique.
        self._id_prefix = str(uuid.uuid4())[:24]
        self._id_counter = itertools.count()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.url = ""
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.router.add_post(PUT_PATH_PREFIX + "{project:.*}", self._put_project_events)
        app.router.add_get("/_emulator/events", self._get_events)
        app.router.add_get("/_emulator/stats", self._get_stats)
        app.router.add_get("/_emulator/config", self._get_config)
        app.router.add_post("/_emulator/config", self._post_config)
        app.router.add_post("/_emulator/reset", self._post_reset)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port) and return the bound port."""
        # In-flight requests are only emulator latency sleeps: not worth waiting for.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        self.port = runner.addresses[0][1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        self.url = f"http://{shown}:{self.port}"
        return self.port

    async def close(self) -> None:
        """Stop listening; safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def configure(self, **fields: Any) -> None:
        """Change faults at once, as ``POST /_emulator/config``; ValueError names a bad field."""
        changes = normalize_fault_fields(fields)
        self.faults = dataclasses.replace(self.faults, **changes)
        if "seed" in changes:
            self._rng = random.Random(self.faults.seed)
        if "quota" in changes or "quota_burst" in changes:
            # A new quota starts with a full bucket, as after a quota increase.
            quota = self.faults.quota
            self._bucket = TokenBucket(quota, bucket_capacity(self.faults), self._clock()) if quota else None
        self._missing = frozenset(self.faults.missing_projects)
        self._denied = frozenset(self.faults.denied_projects)

    def reset(self) -> None:
        """Forget accepted events and counters (faults stay)."""
        self.accepted.clear()
        self._seen.clear()
        self.stats = Stats()

    def stats_dict(self) -> dict[str, Any]:
        return self.stats.as_dict()

    # --- PutProjectEvents ---

    async def _put_project_events(self, request: web.Request) -> web.Response:
        body = await request.read()
        response = self._answer(request.headers, request.raw_path, body)
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        return response

    def _answer(self, headers: Mapping[str, str], raw_path: str, body: bytes) -> web.Response:
        stats = self.stats
        stats.requests_total += 1
        batch = stats.requests_total
        faults = self.faults
        try:
            access_key = access_key_from_headers(headers)
        except ProtocolError as err:
            return self._refuse(err)
        key_stats = stats.key(access_key)
        key_stats.requests += 1
        if faults.down:
            return self._refuse(ProtocolError(503, "ServiceUnavailableException", "Service is unavailable"))
        if self._bucket is not None and not self._bucket.take(self._clock()):
            stats.throttled_requests += 1
            key_stats.throttled += 1
            return self._refuse(ProtocolError(429, THROTTLING, "Rate exceeded"))
        if faults.error_rate and self._rng.random() < faults.error_rate:
            return self._refuse(ProtocolError(500, "InternalServerException", "Internal server error (injected)"))
        try:
            project = project_from_raw_path(raw_path)
            if project in self._missing:
                raise ProtocolError(404, "ResourceNotFoundException", f"Project {project} does not exist")
            if project in self._denied:
                raise ProtocolError(403, "AccessDeniedException", f"Access to project {project} is denied")
            events = parse_events(body)
            index = rejected_index(events, faults.reject_marker)
            if index is not None:
                raise _invalid(f"events[{index}].data was rejected by the service")
        except ProtocolError as err:
            return self._refuse(err)
        return self._accept(project, events, access_key, key_stats, batch)

    def _refuse(self, err: ProtocolError) -> web.Response:
        self.stats.requests_by_status[err.status] += 1
        return protocol_error_response(err)

    def _accept(
        self, project: str, events: list[dict[str, Any]], access_key: str, key_stats: KeyStats, batch: int
    ) -> web.Response:
        faults = self.faults
        stats = self.stats
        codes = event_error_codes(events, faults.invalid_event_rate, faults.throttle_event_rate, self._rng)
        prefix, counter = self._id_prefix, self._id_counter
        if codes is None:
            kept = events
            results = [{"eventId": f"{prefix}{next(counter):012x}"} for _ in events]
        else:
            kept, results = [], []
            for event, code in zip(events, codes):
                if code is None:
                    kept.append(event)
                    results.append({"eventId": f"{prefix}{next(counter):012x}"})
                else:
                    stats.events_failed_by_code[code] += 1
                    results.append({"errorCode": code, "errorMessage": _ERROR_MESSAGES[code]})
        if faults.record:
            self._record(project, kept, access_key, batch)
        n_kept = len(kept)
        stats.requests_by_status[200] += 1
        stats.batch_sizes[len(events)] += 1
        stats.events_accepted += n_kept
        stats.events_by_project[project] += n_kept
        key_stats.accepted_events += n_kept
        body = {"eventResults": results, "failedEventCount": len(events) - n_kept}
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/json",
            headers={"x-amzn-RequestId": str(uuid.uuid4())},
        )

    def _record(self, project: str, events: list[dict[str, Any]], access_key: str, batch: int) -> None:
        now = time.time()
        seen, append = self._seen, self.accepted.append
        for event in events:
            data, timestamp, type_ = event["data"], event["timestamp"], event["type"]
            digest = hash((project, data, timestamp, type_))
            if digest in seen:
                self.stats.duplicates += 1
            else:
                seen.add(digest)
            append(AcceptedEvent(project, data, timestamp, type_, batch, now, access_key))

    # --- control API ---

    async def _get_events(self, request: web.Request) -> web.Response:
        project = request.query.get("project")
        events = self.accepted if project is None else [e for e in self.accepted if e.project == project]
        return _json({"events": events})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(self.stats_dict())

    async def _get_config(self, request: web.Request) -> web.Response:
        return _json(self.faults)

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            fields = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            fields = None
        if type(fields) is not dict:
            return _json({"message": "config body must be a JSON object of fault fields"}, status=400)
        try:
            self.configure(**fields)
        except ValueError as err:
            return _json({"message": str(err)}, status=400)
        return _json(self.faults)

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"reset": True})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


# --- CLI -------------------------------------------------------------------


def run_emulator(host: str, port: int, faults: FaultConfig) -> None:
    """Serve until SIGTERM or SIGINT; blocks. Prints the URL once listening."""
    try:
        import uvloop  # optional (the bench extra); the emulator must outpace what it measures

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port, faults))


async def _serve(host: str, port: int, faults: FaultConfig) -> None:
    emulator = Emulator(faults)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await emulator.start(host, port)
        # A parent process waits for this line before sending traffic.
        print(f"emulator listening on {emulator.url}", flush=True)
        await stop.wait()
    finally:
        await emulator.close()


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's flags: where to listen and one flag per fault."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on; 0 picks a free one")
    parser.add_argument("--quota", type=_non_negative, default=0.0, help="account requests/s; 0 = unlimited")
    parser.add_argument("--quota-burst", type=_non_negative, default=None, help="token bucket size; default one second's worth")
    parser.add_argument("--throttle-event-rate", type=_rate, default=0.0, help="random fraction of events failed as ThrottlingException")
    parser.add_argument("--invalid-event-rate", type=_rate, default=0.0, help="stable fraction of events failed as ValidationException")
    parser.add_argument("--reject-marker", default="", help="fail a whole request with 400 when an event's data contains this")
    parser.add_argument("--error-rate", type=_rate, default=0.0, help="fraction of requests answered 500")
    parser.add_argument("--latency", type=_non_negative, default=0.0, help="seconds added before each answer")
    parser.add_argument("--down", action="store_true", help="answer PutProjectEvents with 503")
    parser.add_argument("--missing-project", action="append", default=[], dest="missing_projects", help="answer 404 for this project (repeatable)")
    parser.add_argument("--denied-project", action="append", default=[], dest="denied_projects", help="answer 403 for this project (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="seed for random faults")
    parser.add_argument("--no-record", action="store_false", dest="record", help="keep counters only, not events")


def faults_from_args(args: argparse.Namespace) -> FaultConfig:
    """The FaultConfig for parsed ``add_cli_arguments`` flags; ValueError names a bad one."""
    fields = {
        "quota": args.quota,
        "quota_burst": args.quota_burst,
        "throttle_event_rate": args.throttle_event_rate,
        "invalid_event_rate": args.invalid_event_rate,
        "reject_marker": args.reject_marker,
        "error_rate": args.error_rate,
        "latency": args.latency,
        "down": args.down,
        "missing_projects": tuple(args.missing_projects or ()),
        "denied_projects": tuple(args.denied_projects or ()),
        "seed": args.seed,
        "record": args.record,
    }
    return FaultConfig(**normalize_fault_fields(fields))
