"""Intake authentication, ``intake.auth``: SigV4 against a credentials file, bearer tokens, or client certificates.

The intake calls an authenticator with the request and its raw body, after the
body is read (SigV4 signs its hash) and before anything is decoded or buffered;
it answers None to let the request through, or the refusal to send back. So a
refused request leaves nothing behind but a counter.

Both read their secrets from a file at start (an unreadable or empty file stops
the start) and again, off the event loop, on every reload (SIGHUP), which is
how keys and tokens are rotated without a restart: put the new one beside the
old, SIGHUP, move the clients over, remove the old one, SIGHUP. A file that
cannot be read or parsed on reload keeps the previous set in force and logs
``reload_failed``.

Mutual TLS (``"mtls"``) has no file of its own here: the TLS listener verifies
the client certificate against ``intake.tls_client_ca_file`` in the handshake
(listeners.py), and this checks the verified certificate's identity once per
connection, at its first POST; later requests of the connection cost one
attribute read.
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import os
import re
import stat
import time
from typing import Callable, Generic, TypeVar

from aiohttp import hdrs, web

from forwarder.config import IntakeConfig
from forwarder.observability import Observer
from forwarder.evidently.protocol import error_response
from forwarder.evidently.sigv4 import Denial, Verifier
from forwarder.reading import MiB, FileRefused, OffLoop, read_bounded

T = TypeVar("T", dict[str, str], list[str])

# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_LENGTH = 16  # characters; `openssl rand -hex 32` makes 64
MAX_SECRETS_BYTES = MiB  # a token or credentials file beyond this is refused, never read whole
_CREDENTIAL_KEY_RE = re.compile(r"Credential=([^/,\s]{1,128})/")


class CredentialsError(ValueError):
    """A credentials or token file cannot be read or holds nothing usable; the message names the key."""


def load_credentials(path: str, key: str = "intake.credentials_file") -> dict[str, str]:
    """Access key id -> secret for every profile of an AWS shared-credentials (INI) file."""
    # default_section: [default] is a profile like any other here, not values inherited by every profile.
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    text = _read(path, key)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise CredentialsError(f"{key} {path} is not an AWS shared-credentials file: "
                               f"{str(e).splitlines()[0]}") from None
    secrets: dict[str, str] = {}
    for profile in parser.sections():
        access_key = parser[profile].get("aws_access_key_id", "").strip()
        secret = parser[profile].get("aws_secret_access_key", "").strip()
        if not access_key or not secret:
            raise CredentialsError(f"{key} {path}: profile [{profile}] needs both aws_access_key_id and "
                                   "aws_secret_access_key")
        if secrets.get(access_key, secret) != secret:
            raise CredentialsError(f"{key} {path}: access key id {access_key} appears twice with different secrets")
        secrets[access_key] = secret
    if not secrets:
        raise CredentialsError(f"{key} {path} has no profile; each needs aws_access_key_id and "
                               "aws_secret_access_key")
    return secrets


def load_tokens(path: str, key: str = "intake.token_file") -> list[str]:
    """The file's tokens: one per line, blank lines and ``#`` comments ignored."""
    tokens = []
    for number, line in enumerate(_read(path, key).splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if _TOKEN_RE.fullmatch(token) is None or len(token) < MIN_TOKEN_LENGTH:
            # The token itself is never echoed: it may be a real one with a typo.
            raise CredentialsError(f"{key} {path} line {number}: a token must be at least {MIN_TOKEN_LENGTH} "
                                   "characters of A-Z a-z 0-9 - . _ ~ + / (e.g. `openssl rand -hex 32`)")
        tokens.append(token)
    if not tokens:
        raise CredentialsError(f"{key} {path} has no token (one per line; # starts a comment)")
    return tokens


def _read(path: str, key: str) -> str:
    try:
        return read_bounded(path, MAX_SECRETS_BYTES).decode()
    except FileRefused as e:
        raise CredentialsError(f"{key} {path} {e}") from None
    except OSError as e:
        raise CredentialsError(f"{key} {path} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"{key} {path} is not UTF-8 text") from None


def readable_by_others(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


class SecretsFile(Generic[T]):
    """One file of secrets: parsed at construction, re-read by ``reconfigure()``, each set handed to ``install``."""

    def __init__(self, path: str, key: str, parse: Callable[[str, str], T], install: Callable[[T], None],
                 observer: Observer) -> None:
        self.path, self.key = path, key
        self._parse, self._install, self._observer = parse, install, observer
        self._reads = OffLoop(f"{key} {path}")
        self._apply(self._load(), reload=False)

    async def reconfigure(self, intake: IntakeConfig) -> None:
        """Re-read the file off the event loop (reload); on any error keep the set in force, log reload_failed."""
        try:
            loaded = await self._reads.run(self._load)
        except Exception as e:  # CredentialsError, ReadTimeout, or what nobody foresaw: the old set stays
            self._observer.auth_reload_failed(self.path, str(e) if isinstance(e, (CredentialsError, OSError))
                                              else f"{type(e).__name__}: {e}")
            return
        self._apply(loaded, reload=True)

    def _load(self) -> T:
        loaded = self._parse(self.path, self.key)
        if readable_by_others(self.path):
            self._observer.log.warning("credentials_readable_by_others", key=self.key, path=self.path,
                                       hint="chmod o-r the file")
        return loaded

    def _apply(self, loaded: T, reload: bool) -> None:
        self._install(loaded)
        self._observer.auth_loaded(self.path, len(loaded), reload)  # type: ignore[arg-type]


def _ambiguous(request: web.BaseRequest) -> bool:
    """More than one Authorization header: which one counts would depend on who reads it, so AWS refuses it."""
    return len(request.headers.getall(hdrs.AUTHORIZATION, ())) > 1


AMBIGUOUS = "the request has more than one Authorization header; send exactly one"


def _refuse(observer: Observer, request: web.BaseRequest, scheme: str, status: int, error_type: str, reason: str,
            message: str, headers: dict[str, str] | None = None) -> web.Response:
    key = _CREDENTIAL_KEY_RE.search(request.headers.get("Authorization", "")) if scheme == "sigv4" else None
    observer.auth_refused(reason, scheme, key.group(1) if key else "", request.remote)
    return error_response(status, error_type, message, headers)


class SigV4Authenticator:
    """``intake.auth = "sigv4"``: AWS Signature Version 4 against ``intake.credentials_file``."""

    LIVE_KEYS = ()
    FILE_KEYS = ("intake.credentials_file",)  # re-read on every reload

    def __init__(self, path: str, region: str, observer: Observer, wall: Callable[[], float] = time.time) -> None:
        self._observer = observer
        self._verifier = Verifier({}, region, clock=wall)
        self.file = SecretsFile(path, "intake.credentials_file", load_credentials, self._verifier.replace_secrets,
                                observer)
        self.reconfigure = self.file.reconfigure

    def __call__(self, request: web.BaseRequest, body: bytes) -> web.Response | None:
        if _ambiguous(request):
            return _refuse(self._observer, request, "sigv4", 403, "IncompleteSignatureException", "duplicate_header",
                           AMBIGUOUS)
        result = self._verifier.verify(request.method, request.raw_path, request.headers, body)
        if type(result) is str:
            return None
        assert isinstance(result, Denial)
        return _refuse(self._observer, request, "sigv4", 403, result.error_type, result.reason, result.message)


class TokenAuthenticator:
    """``intake.auth = "token"``: ``Authorization: Bearer <token>`` against ``intake.token_file``."""

    _CHALLENGE = {"WWW-Authenticate": 'Bearer realm="forwarder"'}
    LIVE_KEYS = ()
    FILE_KEYS = ("intake.token_file",)  # re-read on every reload

    def __init__(self, path: str, observer: Observer) -> None:
        self._observer = observer
        self._key = os.urandom(32)  # per process: the digests mean nothing outside it
        self._digests: tuple[bytes, ...] = ()
        self._headers: tuple[bytes, ...] = ()
        self.file = SecretsFile(path, "intake.token_file", load_tokens, self._install, observer)
        self.reconfigure = self.file.reconfigure

    def _install(self, tokens: list[str]) -> None:
        self._digests = tuple(self._digest(t) for t in tokens)
        # The header every client sends, "Bearer <token>", is checked whole first:
        # one hash and no parsing on the common path.
        self._headers = tuple(self._digest(f"Bearer {t}") for t in tokens)

    def _digest(self, value: str) -> bytes:
        # Keyed BLAKE2b: CPython's own code, without the OpenSSL provider lookup
        # hashlib's SHA-256 makes on every call; a per-request cost in a running
        # intake is several times its tight-loop cost (docs/scaling.md, "The
        # price of authentication").
        return hashlib.blake2b(value.encode(), key=self._key, digest_size=32).digest()

    def matches(self, token: str) -> bool:
        """Whether ``token`` is one of the file's, in constant time.

        Digests are compared, not tokens, so neither the length nor a prefix of
        a configured token shows in the timing; and every configured token is
        compared, so neither does which one matched or how many there are before it.
        """
        presented = self._digest(token)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(digest, presented)
        return found

    def __call__(self, request: web.BaseRequest, body: bytes) -> web.Response | None:
        header = request.headers.get(hdrs.AUTHORIZATION)  # istr: no case folding per request
        if header is not None and _ambiguous(request):
            return self._refuse(request, 400, "BadRequestException", "duplicate_header", AMBIGUOUS)
        if header is not None:
            presented = self._digest(header)
            found = False
            for digest in self._headers:  # every one, as in matches()
                found |= hmac.compare_digest(digest, presented)
            if found:
                return None
        return self._parsed(request, header)

    def _parsed(self, request: web.BaseRequest, header: str | None) -> web.Response | None:
        """Any other form of the header (scheme case, spacing) or the refusal."""
        if header is None:
            return self._refuse(request, 401, "MissingAuthenticationTokenException", "missing",
                                'this intake requires "Authorization: Bearer <token>" (intake.auth = "token")',
                                self._CHALLENGE)
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return self._refuse(request, 401, "MissingAuthenticationTokenException", "malformed",
                                'this intake requires "Authorization: Bearer <token>" (intake.auth = "token"), got '
                                f"an Authorization header of scheme {scheme[:40]!r}", self._CHALLENGE)
        if not self.matches(token):
            return self._refuse(request, 403, "AccessDeniedException", "wrong_token",
                                "the bearer token is not one of intake.token_file's tokens (a rotated-out token "
                                "stops working at the SIGHUP that removes it)")
        return None

    def _refuse(self, request: web.BaseRequest, status: int, error_type: str, reason: str, message: str,
                headers: dict[str, str] | None = None) -> web.Response:
        return _refuse(self._observer, request, "token", status, error_type, reason, message, headers)


class Peer:
    """A connection's verified client certificate: its identities and whether one may post."""

    __slots__ = ("identities", "allowed")

    def __init__(self, identities: tuple[str, ...], allowed: bool) -> None:
        self.identities = identities
        self.allowed = allowed

    @property
    def name(self) -> str:
        """The identity to log: the first SAN, else the subject CN ("" without a certificate)."""
        return self.identities[0] if self.identities else ""


def certificate_identities(peercert: dict | None) -> tuple[str, ...]:
    """A verified certificate's identities: SAN URIs, SAN DNS names, then the subject CN, in that order."""
    if not peercert:
        return ()
    san = peercert.get("subjectAltName", ())
    names = [value for kind, value in san if kind == "URI"] + [value for kind, value in san if kind == "DNS"]
    names += [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return tuple(names)


def identity_allowed(identities: tuple[str, ...], allowed: tuple[str, ...]) -> bool:
    """Whether one of ``identities`` is listed; an entry ending in * matches a prefix; () admits any."""
    if not allowed:
        return bool(identities)
    for entry in allowed:
        if entry.endswith("*"):
            prefix = entry[:-1]
            if any(identity.startswith(prefix) for identity in identities):
                return True
        elif entry in identities:
            return True
    return False


class MtlsAuthenticator:
    """``intake.auth = "mtls"``: a client certificate verified in the TLS handshake, its identity listed."""

    # The list applies on reload to connections opened afterwards; the CA bundle
    # is the TLS listener's file (listeners.py, TlsCertificates).
    LIVE_KEYS = ("intake.tls_allowed_identities",)

    def __init__(self, allowed: tuple[str, ...], observer: Observer) -> None:
        self._allowed = allowed
        self._observer = observer

    async def reconfigure(self, intake: IntakeConfig) -> None:
        """Admit the reloaded intake.tls_allowed_identities from the next connection on."""
        self._allowed = intake.tls_allowed_identities
        self._observer.log.info("mtls_identities_reloaded", identities=len(self._allowed))

    def peer(self, request: web.BaseRequest) -> Peer:
        """The connection's Peer, found at its first request and kept on its protocol."""
        protocol = request.protocol
        peer = protocol.peer  # type: ignore[attr-defined]
        if peer is None:
            transport = request.transport
            identities = certificate_identities(transport.get_extra_info("peercert") if transport else None)
            protocol.peer = peer = Peer(identities, identity_allowed(identities, self._allowed))  # type: ignore[attr-defined]
        return peer

    def __call__(self, request: web.BaseRequest, body: bytes) -> web.Response | None:
        peer = self.peer(request)
        if peer.allowed:
            return None
        if not peer.identities:
            reason, message = "no_certificate", ('this intake requires a client certificate (intake.auth = "mtls") '
                                                 "issued by one of intake.tls_client_ca_file's CAs")
        else:
            reason, message = "identity_not_allowed", (
                f"the client certificate's identity {peer.name[:200]!r} is not one of intake.tls_allowed_identities")
        self._observer.auth_refused(reason, "mtls", peer.name, request.remote)
        return error_response(403, "AccessDeniedException", message)


Authenticator = SigV4Authenticator | TokenAuthenticator | MtlsAuthenticator


def make_authenticator(config: IntakeConfig, region: str, observer: Observer,
                       wall: Callable[[], float] = time.time) -> Authenticator | None:
    """The authenticator ``intake.auth`` asks for (None for "none"); raises CredentialsError."""
    if config.auth == "sigv4":
        return SigV4Authenticator(config.credentials_file, region, observer, wall)
    if config.auth == "token":
        return TokenAuthenticator(config.token_file, observer)
    if config.auth == "mtls":
        return MtlsAuthenticator(config.tls_allowed_identities, observer)
    return None
