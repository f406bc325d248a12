"""AWS Signature Version 4 verification: what the intake checks when ``intake.auth = "sigv4"``.

Pure: the request's method, raw target, headers and body in, the caller's access
key id or a ``Denial`` out, against an injected clock. No I/O.

The canonical request is rebuilt from the request as received, as the AWS SDKs
build it before sending (botocore's ``SigV4Auth``, the JS SDK's
``@smithy/signature-v4``): the path as sent (already percent-encoded: an ARN
project's ``:`` and ``/`` arrive as ``%3A`` and ``%2F``) with dot segments and
empty segments removed, then URI-encoded once more (every AWS service but S3
signs the path encoded twice); the query decoded and re-encoded, sorted; the
signed headers' values trimmed with inner whitespace collapsed; and the SHA-256
of the body actually received (a client's ``x-amz-content-sha256`` must match
it). The credential scope must name service ``evidently`` and the region this
forwarder delivers to (``evidently.region``): an app signing for another region
meant another region's projects. The request time must be within
``MAX_SKEW`` of the clock. A signed request replayed within that window
verifies again, as it does at AWS (nonce-free by design).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import quote, unquote

from multidict import istr

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "evidently"
MAX_SKEW = 300.0  # seconds either way, as the issue asks (AWS itself allows 15 minutes)
KEY_CACHE_SIZE = 64  # derived signing keys kept: (secret, day, region, service) tuples
PATH_CACHE_SIZE = 1024  # canonical URIs kept per raw path (encoding one is a few microseconds)
HEADER_CACHE_SIZE = 256  # parsed Authorization headers kept, keyed by all but their signature

_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
# Case-insensitive header names made once: a plain str is case-folded on every lookup.
_AUTHORIZATION, _X_AMZ_DATE, _X_AMZ_CONTENT_SHA256 = map(istr, ("Authorization", "X-Amz-Date",
                                                                 "x-amz-content-sha256"))
_PRESIGNED_PARAMS = ("X-Amz-Signature=", "X-Amz-Algorithm=", "X-Amz-Credential=")

# The AWS error types, as the service names them in x-amzn-ErrorType.
MISSING = "MissingAuthenticationTokenException"
INCOMPLETE = "IncompleteSignatureException"
INVALID = "InvalidSignatureException"
UNRECOGNIZED = "UnrecognizedClientException"


class Headers(Protocol):
    """Case-insensitive request headers (aiohttp's CIMultiDictProxy, multidict's CIMultiDict)."""

    def get(self, key: str, default: None = None) -> str | None: ...

    def getall(self, key: str, default: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a request is refused: its AWS error type, a metric label and a message for the client."""

    error_type: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parts of an ``Authorization: AWS4-HMAC-SHA256 ...`` header but its signature."""

    access_key: str
    day: str  # YYYYMMDD
    region: str
    service: str
    signed_headers: tuple[str, ...]

    @property
    def scope(self) -> str:
        return f"{self.day}/{self.region}/{self.service}/aws4_request"


# --- pure pieces --------------------------------------------------------------

def parse_authorization(value: str) -> tuple[Authorization, str] | Denial:
    """The header's parts and its signature, or an IncompleteSignatureException naming what is wrong."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        shown = algorithm[:40] if algorithm != "Bearer" else "Bearer (a token)"
        return Denial(INCOMPLETE, "malformed",
                      f"Authorization header must use {ALGORITHM} (AWS Signature Version 4), got {shown!r}")
    params: dict[str, str] = {}
    for part in rest.split(","):
        key, _, val = part.strip().partition("=")
        params[key] = val.strip()
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not params.get(k)]
    if missing:
        return Denial(INCOMPLETE, "malformed",
                      "Authorization header requires " + ", ".join(f"'{k}'" for k in missing) + " parameter"
                      + ("s" if len(missing) > 1 else "") + ". Authorization=" + value[:200])
    credential = params["Credential"].split("/")
    if len(credential) != 5 or credential[4] != "aws4_request" or not credential[0]:
        return Denial(INCOMPLETE, "malformed",
                      f"Credential must be <access key id>/<YYYYMMDD>/<region>/<service>/aws4_request, got "
                      f"{params['Credential'][:200]!r}")
    signature = params["Signature"]
    if _SIGNATURE_RE.fullmatch(signature) is None:
        return Denial(INCOMPLETE, "malformed", "Signature must be 64 lowercase hexadecimal digits")
    signed = tuple(params["SignedHeaders"].split(";"))
    if "host" not in signed:
        return Denial(INCOMPLETE, "malformed",
                      f"'Host' must be a 'SignedHeader' in the AWS Authorization, got SignedHeaders="
                      f"{params['SignedHeaders'][:200]}")
    key, day, region, service, _ = credential
    return Authorization(key, day, region, service, signed), signature


def parse_amz_date(value: str) -> float | None:
    """Epoch seconds of an ISO 8601 basic time (``20150830T123600Z``), or None when malformed."""
    if len(value) != 16 or value[8] != "T" or value[15] != "Z" or not (value[:8] + value[9:15]).isdigit():
        return None
    fields = (int(value[0:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]), int(value[11:13]),
              int(value[13:15]))
    if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
        return None
    return float(calendar.timegm(fields + (0, 0, 0)))


def remove_dot_segments(path: str) -> str:
    """The path without ``.``/``..`` and empty segments, as botocore and the JS SDK normalise it."""
    if not path:
        return "/"
    out: list[str] = []
    for segment in path.split("/"):
        if not segment or segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
        else:
            out.append(segment)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and out else ""
    return first + "/".join(out) + last


def canonical_uri(raw_path: str) -> str:
    """The path as sent, normalised and URI-encoded again (so ``%2F`` signs as ``%252F``)."""
    return quote(remove_dot_segments(raw_path), safe="/~")


def canonical_query(raw_query: str) -> str:
    """Each name and value decoded, URI-encoded per SigV4, sorted by name then value."""
    if not raw_query:
        return ""
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def keyed_sha256(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256's inner and outer hash states for ``key`` (RFC 2104), prepared once and copied per message.

    ``hmac.digest`` sets up an OpenSSL MAC context on every call, which in a
    running intake costs several times what copying two prepared SHA-256
    states does (docs/scaling.md, "The price of authentication").
    """
    block = key.ljust(64, b"\0") if len(key) <= 64 else hashlib.sha256(key).digest().ljust(64, b"\0")
    return hashlib.sha256(bytes(b ^ 0x36 for b in block)), hashlib.sha256(bytes(b ^ 0x5C for b in block))


def hmac_sha256_hex(pads: tuple[Any, Any], message: bytes) -> str:
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(message)
    outer.update(inner.digest())
    return outer.hexdigest()


def signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    key = hmac.digest(("AWS4" + secret).encode(), day.encode(), "sha256")
    key = hmac.digest(key, region.encode(), "sha256")
    key = hmac.digest(key, service.encode(), "sha256")
    return hmac.digest(key, b"aws4_request", "sha256")


def _time_text(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


# --- the verifier -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Client:
    """What an Authorization header but its signature determines, resolved once (see Verifier._client)."""

    access_key: str
    day: str
    scope: str
    names: tuple[str, ...]  # the signed headers
    signed: str  # their ;-joined list, as it goes into the canonical request
    pads: tuple[Any, Any]  # the derived signing key, as keyed_sha256 states


class Verifier:
    """Checks SigV4-signed requests against a set of access-key/secret pairs."""

    def __init__(self, secrets: Mapping[str, str], region: str, service: str = SERVICE,
                 clock: Callable[[], float] = time.time, max_skew: float = MAX_SKEW) -> None:
        self.secrets = dict(secrets)
        self.region = region
        self.service = service
        self._clock = clock
        self._max_skew = max_skew
        self._keys: dict[tuple[str, str, str, str], bytes] = {}
        self._paths: dict[str, str] = {}
        self._clients: dict[str, _Client] = {}
        self._last_date = ""
        self._last_when: float | None = None

    def replace_secrets(self, secrets: Mapping[str, str]) -> None:
        """Key rotation: from now on only these pairs verify (derived keys of old secrets age out)."""
        self.secrets = dict(secrets)
        self._clients = {}

    def verify(self, method: str, raw_target: str, headers: Headers, body: bytes) -> str | Denial:
        """The access key id that signed the request, or why it is refused."""
        # The hot path, written flat: measured in a running intake, each call
        # here costs several times what it does in a tight loop (cold caches).
        header = headers.get(_AUTHORIZATION)
        if header is None:
            return _missing(raw_target)
        cut = header.rfind("Signature=")
        signature = header[cut + 10:]
        client = self._clients.get(header[:cut]) if cut > 0 and len(signature) == 64 and signature.isascii() else None
        if client is None:
            client = self._client(header, cut)
            if type(client) is Denial:
                return client
        amz_date = headers.get(_X_AMZ_DATE)
        if amz_date != self._last_date:  # requests of the same second share their X-Amz-Date
            self._last_when = parse_amz_date(amz_date) if amz_date is not None else None
            self._last_date = amz_date  # type: ignore[assignment]
        when = self._last_when
        if when is None:
            return Denial(INCOMPLETE, "malformed",
                          "Authorization header requires an 'X-Amz-Date' header in ISO 8601 basic format "
                          f"(YYYYMMDD'T'HHMMSS'Z'), got {amz_date!r}")
        if not amz_date.startswith(client.day):  # type: ignore[union-attr]
            return _wrong_day(client.day, amz_date)  # type: ignore[arg-type]
        now = self._clock()
        if not now - self._max_skew <= when <= now + self._max_skew:
            return _expired(when, now, self._max_skew, amz_date)  # type: ignore[arg-type]
        payload_hash = hashlib.sha256(body).hexdigest()
        claimed = headers.get(_X_AMZ_CONTENT_SHA256)
        if claimed is not None and claimed != payload_hash:
            return Denial(INVALID, "body_mismatch",
                          "x-amz-content-sha256 does not match the SHA-256 of the body received"
                          + (" (unsigned payloads are not accepted)" if claimed == "UNSIGNED-PAYLOAD" else ""))
        lines = []
        for name in client.names:
            values = headers.getall(name, ())
            if len(values) == 1:  # no comprehension in the common case: it costs a frame on Python 3.11
                lines.append(f"{name}:{' '.join(values[0].split())}\n")
            elif values:
                lines.append(f"{name}:{','.join([' '.join(v.split()) for v in values])}\n")
            else:
                return Denial(INVALID, "bad_signature", f"header {name!r} is in SignedHeaders but not in the request")
        path, _, query = raw_target.partition("?")
        uri = self._paths.get(path) or self._canonical_uri(path)
        canonical = (f"{method}\n{uri}\n{canonical_query(query) if query else ''}\n{''.join(lines)}\n"
                     f"{client.signed}\n{payload_hash}")
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        to_sign = f"{ALGORITHM}\n{amz_date}\n{client.scope}\n{digest}".encode()
        if hmac.compare_digest(hmac_sha256_hex(client.pads, to_sign), signature):
            return client.access_key
        return Denial(INVALID, "bad_signature",
                      "The request signature we calculated does not match the signature you provided. "
                      "Check your AWS Secret Access Key and signing method, and that nothing between the "
                      "client and the forwarder altered the request")

    def _client(self, header: str, cut: int) -> _Client | Denial:
        """Parse and check an Authorization header but its signature, and cache the result.

        A client sends the same header but for its signature on every request
        of a day: its key id, scope and signed headers are checked, and its
        signing key derived, once.
        """
        parsed = parse_authorization(header)
        if isinstance(parsed, Denial):
            return parsed
        auth, _ = parsed
        if auth.service != self.service:
            return Denial(INVALID, "wrong_scope",
                          f"Credential should be scoped to correct service: '{self.service}', not "
                          f"'{auth.service[:64]}'")
        if auth.region != self.region:
            return Denial(INVALID, "wrong_scope",
                          f"Credential should be scoped to a valid region: this forwarder delivers to "
                          f"'{self.region}' (evidently.region), the request is signed for '{auth.region[:64]}'")
        secret = self.secrets.get(auth.access_key)
        if secret is None:
            return Denial(UNRECOGNIZED, "unknown_key",
                          f"The security token included in the request is invalid: access key id "
                          f"{auth.access_key[:128]!r} is not among intake.credentials_file's keys")
        client = _Client(auth.access_key, auth.day, auth.scope, tuple(map(istr, auth.signed_headers)),
                         ";".join(auth.signed_headers),
                         keyed_sha256(self._signing_key(secret, auth.day, auth.region, auth.service)))
        if len(self._clients) >= HEADER_CACHE_SIZE:
            self._clients.clear()  # a bound, not an LRU: live clients come back at once
        self._clients[header[:cut]] = client
        return client

    def _signing_key(self, secret: str, day: str, region: str, service: str) -> bytes:
        # Four HMACs per derivation; a key is good for a whole day and scope.
        cache_key = (secret, day, region, service)
        key = self._keys.get(cache_key)
        if key is None:
            if len(self._keys) >= KEY_CACHE_SIZE:
                self._keys.clear()
            key = self._keys[cache_key] = signing_key(secret, day, region, service)
        return key

    def _canonical_uri(self, path: str) -> str:
        if len(self._paths) >= PATH_CACHE_SIZE:
            self._paths.clear()
        uri = self._paths[path] = canonical_uri(path)
        return uri


def _missing(raw_target: str) -> Denial:
    query = raw_target.partition("?")[2]
    if any(p in query for p in _PRESIGNED_PARAMS):
        return Denial(INCOMPLETE, "presigned",
                      "presigned URLs (X-Amz-Signature in the query string) are not accepted: they do not sign the "
                      "body; sign with an Authorization header")
    return Denial(MISSING, "missing",
                  "Missing Authentication Token: this intake requires AWS Signature Version 4 "
                  "(intake.auth = \"sigv4\"); sign the request with an AWS SDK")


def _wrong_day(day: str, amz_date: str) -> Denial:
    return Denial(INVALID, "wrong_scope",
                  f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                  f"'{day[:16]}' != '{amz_date[:8]}', from '{amz_date}'")


def _expired(when: float, now: float, skew: float, amz_date: str) -> Denial:
    window = f"{skew / 60:g} min."
    if when < now:
        return Denial(INVALID, "expired",
                      f"Signature expired: {amz_date} is now earlier than {_time_text(now - skew)} "
                      f"({_time_text(now)} - {window})")
    return Denial(INVALID, "expired",
                  f"Signature not yet current: {amz_date} is still later than {_time_text(now + skew)} "
                  f"({_time_text(now)} + {window})")
