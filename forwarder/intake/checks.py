"""What a request must satisfy before its events are buffered: pure checks of
its path, headers, body coding and events.

A web page can make a browser send a "simple" cross-origin POST (text/plain,
form types, or a Blob with no type) without any CORS preflight, and a DNS
rebinding page can even make it same-origin. So the intake takes only JSON and
NDJSON bodies (what the AWS SDKs and the CLI send: ``application/json``),
refuses any request that carries a browser's ``Origin`` header, and on a
loopback listener answers only ``Host`` names that mean this machine.
"""

from __future__ import annotations

import zlib

import orjson

from forwarder.config import is_loopback_host
from forwarder.evidently.events import WIRE_FAST_PATH_MIN_BYTES, EventError, encode_all, encode_wire_body, ndjson_events, request_events
from forwarder.evidently.protocol import ProtocolError, project_from_raw_path

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines"})
ACCEPTED_TYPES = ", ".join(sorted(JSON_TYPES | NDJSON_TYPES))
ENCODINGS = "gzip, deflate, identity"
CACHE_SIZE = 256  # distinct header values remembered per check (a bound, not an LRU)
PROJECT_CACHE_SIZE = 1024  # validated request paths kept: most requests repeat a few paths


class Refusal(ProtocolError):
    """A request the intake refuses whole (protocol.ProtocolError), with the events_rejected reason its
    events are counted under, ``count`` times."""

    def __init__(self, status: int, error_type: str, message: str, reason: str, count: int = 1,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, error_type, message, headers)
        self.reason = reason
        self.count = count


class ProjectPaths:
    """Raw PutProjectEvents paths -> their validated project, remembered (a bound, not an LRU:
    valid paths come back at once)."""

    def __init__(self) -> None:
        self.known: dict[str, str] = {}

    def project(self, raw_path: str) -> str:
        try:
            project = project_from_raw_path(raw_path)
        except ProtocolError as e:
            raise Refusal(e.status, e.error_type, e.message, "validation") from None
        if len(self.known) >= PROJECT_CACHE_SIZE:
            self.known.clear()
        self.known[raw_path] = project
        return project


def read_events(body: bytes, ndjson: bool, now: float, most: int) -> tuple[int, list[bytes], list[tuple[int, str]]]:
    """A decoded body -> (event count, the accepted events encoded for the wire, (index, message) of
    the refused); raises Refusal when the request is refused whole."""
    if not ndjson and len(body) >= WIRE_FAST_PATH_MIN_BYTES:
        encoded = encode_wire_body(body, now)
        if encoded is not None:
            _at_most(most, len(encoded))
            return len(encoded), encoded, []
    try:
        events = ndjson_events(body) if ndjson else request_events(orjson.loads(body))
    except orjson.JSONDecodeError as e:
        raise Refusal(400, "ValidationException", f"the request body is not valid JSON: {e}", "validation") from None
    except EventError as e:
        raise Refusal(400, "ValidationException", str(e), "validation") from None
    _at_most(most, len(events))
    encoded, errors = encode_all(events, now)
    return len(events), encoded, errors


def refuse_all(n: int, errors: list[tuple[int, str]], message: str) -> list[tuple[int, str]]:
    """Every one of ``n`` events refused: those in ``errors`` with their own message, the others with ``message``."""
    failed = dict(errors)
    return [(i, failed.get(i, message)) for i in range(n)]


def _at_most(most: int, n: int) -> None:
    if n > most:
        raise Refusal(400, "ValidationException",
                      f"events must hold at most {most} events (intake.max_events_per_request), got {n}",
                      "validation", count=n)


class ContentTypes:
    """``Content-Type`` -> "json" or "ndjson", or a 415 refusal.

    ``known`` maps the accepted values seen so far, so that the intake's hot
    path is one dict lookup and ``kind`` runs only for a new value.
    """

    def __init__(self) -> None:
        self.known: dict[str | None, str] = {}

    def kind(self, value: str | None) -> str:
        kind = media_kind(value)
        if kind == "refused":
            shown = "none" if value is None else repr(value[:100])
            raise Refusal(415, "UnsupportedMediaTypeException",
                          f"Content-Type {shown} is not accepted; send one of {ACCEPTED_TYPES} "
                          "(e.g. curl -H 'Content-Type: application/json')", "unsupported_media_type")
        if len(self.known) >= CACHE_SIZE:
            self.known.clear()
        self.known[value] = kind
        return kind


def media_kind(value: str | None) -> str:
    """"json", "ndjson" or "refused" for a ``Content-Type`` header value (parameters ignored)."""
    media = (value or "").split(";", 1)[0].strip().lower()
    if media in JSON_TYPES:
        return "json"
    if media in NDJSON_TYPES:
        return "ndjson"
    return "refused"


def browser_refusal(origin: str) -> Refusal:
    """The refusal of a request carrying ``Origin``: a web page made a browser send it."""
    return Refusal(403, "AccessDeniedException",
                   f"requests from web pages are refused (this one carries Origin: {origin[:100]!r}); "
                   "the intake is for applications and SDKs", "forbidden")


class HostCheck:
    """The ``Host`` values a loopback listener answers: this machine's names, and the configured host."""

    def __init__(self, configured_host: str) -> None:
        self._configured = configured_host.lower().rstrip(".")
        self._good: set[str] = set()

    def check(self, value: str | None) -> None:
        if value is None or value in self._good:  # no Host: HTTP/1.0, never a browser
            return
        if not self._local(value):
            raise Refusal(403, "AccessDeniedException",
                          f"Host {value[:100]!r} does not name this machine; a loopback intake answers only "
                          "localhost, loopback addresses and intake.host (DNS rebinding defence)", "forbidden")
        if len(self._good) < CACHE_SIZE:
            self._good.add(value)

    def _local(self, value: str) -> bool:
        host = host_name(value)
        return is_loopback_host(host) or host.endswith(".localhost") or host == self._configured


def host_name(value: str) -> str:
    """The name or address in a ``Host`` header value, without port, brackets or final dot, lower-case."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8080
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body without its ``Content-Encoding``, at most ``limit`` bytes decoded; raises Refusal."""
    if encoding is None:
        return body
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise Refusal(415, "UnsupportedMediaTypeException",
                      f"Content-Encoding {encoding[:50]!r} is not supported; use one of {ENCODINGS}",
                      "unsupported_media_type")
    # gzip and zlib streams are told apart by their header (wbits 32+); a
    # "deflate" body without the zlib header (some clients) is raw deflate.
    raw = coding == "deflate" and not _zlib_header(body)
    try:
        return _inflate(body, -zlib.MAX_WBITS if raw else 32 + zlib.MAX_WBITS, limit)
    except zlib.error as e:
        raise Refusal(400, "BadRequestException", f"the {coding} request body is corrupt: {e}",
                      "bad_encoding") from None


def _zlib_header(body: bytes) -> bool:
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    out: list[bytes] = []
    size = 0
    data = body
    while data:  # gzip allows several members one after another
        inflater = zlib.decompressobj(wbits)
        chunk = inflater.decompress(data, limit + 1 - size)
        size += len(chunk)
        out.append(chunk)
        if size > limit:
            raise Refusal(413, "PayloadTooLargeException",
                          f"the request body decodes to more than intake.max_body_bytes ({limit})",
                          "body_too_large")
        if not inflater.eof:
            raise zlib.error("the stream ends early")
        data = inflater.unused_data
        if wbits < 0 or not data.strip(b"\x00"):  # raw deflate has no members; trailing padding is fine
            break
    return b"".join(out)
