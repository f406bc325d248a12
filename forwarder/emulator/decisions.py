"""What the emulator answers to one PutProjectEvents request, as pure functions.

Authentication: by default only the form of SigV4 is checked (the emulator
holds no secrets); with credentials (``--credentials KEY:SECRET``) every
signature is verified by the intake's verifier, ``forwarder.evidently.sigv4``.

The rules follow botocore's Evidently model (``PutProjectEventsRequest``): a
violation refuses the whole request with 400 ``ValidationException`` naming the
field, as the service does. Where the model is silent the emulator assumes a
rule and says so (README, "The emulator"): timestamps before 1970 are refused,
and so is a body over ``MAX_BODY_BYTES``.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Mapping
from typing import Any

import orjson

from forwarder.evidently.protocol import EVENT_TYPES, MAX_EVENTS_PER_CALL, ProtocolError, uuid_prefix
from forwarder.evidently.sigv4 import INVALID, Denial, Verifier

VALIDATION = "ValidationException"
THROTTLING = "ThrottlingException"
# AWS documents no request size for PutProjectEvents: this is an assumption, the
# intake's default intake.max_body_bytes, answered as the intake answers it.
MAX_BODY_BYTES = 1_048_576
TOO_LARGE = "PayloadTooLargeException"
_EVENT_TYPES = frozenset(EVENT_TYPES)
_NUMBER_TYPES = (int, float)  # compared with type(), so bool is not a number

ERROR_MESSAGES = {
    VALIDATION: "Event failed validation",
    THROTTLING: "Rate exceeded for event",
}


# --- authentication --------------------------------------------------------

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/\s,]+)/\d{8}/[a-z0-9-]+/evidently/aws4_request,"
    r" ?SignedHeaders=[a-z0-9;-]+, ?Signature=[0-9a-f]{64}"
)
_AMZ_DATE_RE = re.compile(r"\d{8}T\d{6}Z")


def access_key_from_headers(headers: Mapping[str, str]) -> str:
    """The caller's access key id, after the checks the service makes on the form of SigV4.

    The signature itself is verified only with credentials (``verify_signature``).
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


def verify_signature(verifier: Verifier, method: str, raw_target: str, headers: Any, body: bytes) -> None:
    """Refuse (403) a request whose SigV4 signature does not verify against the configured secrets."""
    result = verifier.verify(method, raw_target, headers, body)
    if isinstance(result, Denial):
        raise ProtocolError(403, result.error_type, _as_the_service_says(result, verifier.region))


def _as_the_service_says(denial: Denial, region: str) -> str:
    """The verifier's message, with the service's wording where it names the intake's settings."""
    if denial.reason == "unknown_key":
        return "The security token included in the request is invalid: its access key id is not one of --credentials"
    if denial.reason == "wrong_scope" and "evidently.region" in denial.message:
        return f"Credential should be scoped to a valid region: this emulator verifies '{region}' (--region)"
    if denial.error_type == INVALID and denial.reason == "bad_signature" and "SignedHeaders" not in denial.message:
        return ("The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.")
    return denial.message


# --- the body --------------------------------------------------------------


def body_too_large(size: int | None) -> ProtocolError:
    """The answer to a body over MAX_BODY_BYTES (``size`` None: it had no Content-Length)."""
    told = f"is {size} bytes" if size is not None else "exceeds the limit"
    return ProtocolError(413, TOO_LARGE, f"the request body {told}; at most {MAX_BODY_BYTES} bytes are accepted")


def invalid(message: str) -> ProtocolError:
    return ProtocolError(400, VALIDATION, message)


def _is_json_object(data: str) -> bool:
    if not data.lstrip().startswith("{"):
        return False
    try:
        return type(orjson.loads(data)) is dict
    except orjson.JSONDecodeError:
        return False


def _event_error(i: int, event: Any) -> str | None:
    if type(event) is not dict:
        return f"events[{i}] must be an object"
    data = event.get("data")
    if type(data) is not str or not _is_json_object(data):
        return f"events[{i}].data must be a string holding a JSON object"
    timestamp = event.get("timestamp")
    if type(timestamp) not in _NUMBER_TYPES:
        return f"events[{i}].timestamp must be a number of epoch seconds"
    if timestamp < 0:  # the model is silent; an assumption (README, "The emulator")
        return f"events[{i}].timestamp must not be before 1970 (0 epoch seconds), got {timestamp!r}"
    if event.get("type") not in _EVENT_TYPES:
        return f"events[{i}].type must be one of {', '.join(EVENT_TYPES)}"
    return None


def parse_events(body: bytes) -> list[dict[str, Any]]:
    """The events of a PutProjectEvents body, or a ValidationException naming the field."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid("request body must be a JSON object") from None
    if type(doc) is not dict:
        raise invalid("request body must be a JSON object")
    events = doc.get("events")
    if type(events) is not list:
        raise invalid("events is required and must be a list")
    if len(events) > MAX_EVENTS_PER_CALL:
        raise invalid(f"events must hold at most {MAX_EVENTS_PER_CALL} events, got {len(events)}")
    for i, event in enumerate(events):
        problem = _event_error(i, event)
        if problem is not None:
            raise invalid(problem)
    return events


# --- faults on accepted requests -------------------------------------------


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


class EventIds:
    """Event ids in the model's ``Uuid`` shape: one random UUID's first 24 characters and a counter.

    Far cheaper than a uuid4 per event at 50k events/s, and still unique: the
    counter's 12 hex digits last 2**48 events.
    """

    def __init__(self) -> None:
        self._prefix = uuid_prefix()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"
