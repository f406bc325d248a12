"""The only code that talks to AWS: PutProjectEvents through one aiobotocore client.

aiobotocore brings credentials, endpoint rules, request serialisation, SigV4
signing and error parsing; what it would cost on the hot path is turned off
through its documented settings and event hooks (docs/architecture.md, "The
client", has the why and the figures). In short: no parameter validation (the
intake validated every event), the body is the events' bytes joined as they
are, a ``before-call`` handler signs with the client's own signer, sends on a
lean aiohttp session and parses errors with botocore's parser, botocore's
retries are off (one retry layer: ours), and ``inject_host_prefix=False``
whenever ``endpoint_url`` is set, or botocore would call ``dataplane.127.0.0.1``.

A 200 counts only when its ``eventResults`` confirm the batch: one result per
event, each an ``eventId`` or an ``errorCode`` (``read_answer``). Anything else
(a proxy's HTML page, a truncated body) is a protocol error, retried.
"""

from __future__ import annotations

import asyncio
import platform
import ssl
import urllib.request
from typing import Any, Protocol

import aiobotocore
import aiohttp
import botocore
import botocore.exceptions
import botocore.handlers
import msgspec
import yarl
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.awsrequest import AWSResponse, create_request_object
from botocore.httpsession import get_cert_path
from botocore.parsers import create_parser

from forwarder import __version__
from forwarder.config import EvidentlyConfig
from forwarder.delivery.retry import CallResult, RetryReason, no_answer, parse_retry_after
from forwarder.reading import OffLoop
from forwarder.observability import cause

_OPERATION = "evidently.PutProjectEvents"
_BODY_KEY = "forwarder_encoded_body"
_ANSWER_KEY = "ForwarderAnswer"
_USER_AGENT = (f"forwarder/{__version__} aiobotocore/{aiobotocore.__version__} "
               f"botocore/{botocore.__version__} Python/{platform.python_version()}")


class ModelMissing(RuntimeError):
    """The botocore evidently model is not installed."""


class ClientCertError(RuntimeError):
    """evidently.client_cert_file and client_key_file cannot be loaded; the message names the keys."""


class Transport(Protocol):
    async def put_events(self, project: str, events: list[bytes]) -> CallResult: ...


class _Encoded:
    """Pre-encoded events passed through botocore's params to our hooks."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body


def encode_body(events: list[bytes]) -> bytes:
    return b'{"events":[' + b",".join(events) + b"]}"


def _take_body(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    events = params.get("events")
    if isinstance(events, _Encoded):
        context[_BODY_KEY] = events.body
        params["events"] = []


class _Entry(msgspec.Struct, gc=False):
    eventId: str | None = None
    errorCode: str | None = None
    errorMessage: str | None = None


class _Answer(msgspec.Struct, gc=False):
    eventResults: list[_Entry]
    failedEventCount: int | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def read_answer(body: bytes, events: int) -> CallResult:
    """A 200's body as a CallResult: its failed entries, or a protocol error when it confirms nothing."""
    try:
        results = _decode_answer(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return _unconfirmed(f"the 200 answer is not a PutProjectEvents result: {e}; body starts {body[:80]!r}")
    entries = results.eventResults
    if len(entries) != events:
        return _unconfirmed(f"the 200 answer has {len(entries)} eventResults for {events} events")
    failed = []
    for i, entry in enumerate(entries):
        if entry.errorCode:
            failed.append((i, entry.errorCode, entry.errorMessage or ""))
        elif not entry.eventId:
            return _unconfirmed(f"eventResults[{i}] of the 200 answer has neither an eventId nor an errorCode")
    if results.failedEventCount is not None and results.failedEventCount != len(failed):
        return _unconfirmed(f"the 200 answer says failedEventCount {results.failedEventCount} "
                            f"but {len(failed)} eventResults have an errorCode")
    return CallResult(200, failed=tuple(failed))


def _unconfirmed(message: str) -> CallResult:
    # The service answered 200: it may have stored the events.
    return no_answer(RetryReason.PROTOCOL, message, maybe_delivered=True)


# botocore's generic before-parameter-build handlers, which do nothing for
# PutProjectEvents on every call (it has no idempotency token and no checksum
# member). Unregistered from this client's own emitter only. The handlers of
# later stages never run: ``_send`` answers at before-call.
_NOOP_HANDLERS = (
    ("before-parameter-build", botocore.handlers.generate_idempotent_uuid),
    ("before-parameter-build", botocore.handlers._handle_request_validation_mode_member),
)


def check_model(session: AioSession) -> None:
    """Fail with a clear message when botocore has no evidently model."""
    if "evidently" not in session.get_available_services():
        raise ModelMissing(
            "the botocore service model for 'evidently' is not installed (botocore removed it in "
            "1.42.51); install it with: pip install botocore-a-la-carte-evidently"
        )


class EvidentlyClient:
    """PutProjectEvents calls through one aiobotocore client and one pooled HTTP session."""

    # A live stage when it presents a client certificate: the pair is re-read on
    # every reload (SIGHUP, or a change on disk), for new connections.
    LIVE_KEYS = ()
    FILE_KEYS = ("evidently.client_cert_file", "evidently.client_key_file")

    def __init__(self, config: EvidentlyConfig, credentials: tuple[str, str] | None = None) -> None:
        self._config = config
        self._credentials = credentials
        self._exit: Any = None
        self._client: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], str | None] = {}  # (scheme, host) -> proxy URL, see _proxy
        self._parser: Any = None
        self._session: Any = None
        self._cafile: Any = None
        self._tls: ssl.SSLContext | None = None  # replaced whole by reload_client_cert
        self._reads = OffLoop("evidently.client_cert_file/evidently.client_key_file")

    async def start(self) -> None:
        """Create the client; raises ModelMissing before anything else."""
        self._session = session = AioSession()
        check_model(session)
        if self._credentials is not None:
            session.set_credentials(*self._credentials)
        c = self._config
        await self._open_client()
        connect_timeout = min(5.0, c.request_timeout)
        self._cafile = get_cert_path(session.get_config_variable("ca_bundle") or True)
        self.reload_client_cert()
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=c.concurrency),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=c.request_timeout),
        )

    async def _open_client(self) -> None:
        """A botocore client with our hooks, replacing the previous one (credentials that appeared late)."""
        c = self._config
        endpoint = c.endpoint_url or None
        cm = self._session.create_client(
            "evidently",
            region_name=c.region,
            endpoint_url=endpoint,
            config=AioConfig(
                inject_host_prefix=endpoint is None,
                retries={"total_max_attempts": 1},
                parameter_validation=False,
                max_pool_connections=c.concurrency,
                connect_timeout=min(5.0, c.request_timeout),
                read_timeout=c.request_timeout,
                tcp_keepalive=True,
                user_agent=_USER_AGENT,
                client_cert=self._client_cert(),
                # Unsigned for a central tier that knows its clients by their certificates (intake.auth = "mtls").
                signature_version=None if c.sign_requests else botocore.UNSIGNED,
            ),
        )
        client = await cm.__aenter__()
        model = client.meta.service_model
        self._parser = create_parser(model.protocol)
        events = client.meta.events
        events.register(f"before-parameter-build.{_OPERATION}", _take_body)
        events.register(f"before-call.{_OPERATION}", self._send)
        for event, handler in _NOOP_HANDLERS:
            events.unregister(event, handler)
        previous, self._client, self._exit = self._exit, client, cm.__aexit__
        if previous is not None:
            await previous(None, None, None)

    async def credentials_method(self) -> str | None:
        """How the standard chain finds credentials now ("env", "iam-role", ...); None when it finds none."""
        try:
            credentials = await self._session.get_credentials()
        except botocore.exceptions.BotoCoreError:  # e.g. a profile that does not exist: none to sign with
            return None
        return None if credentials is None else (credentials.method or "explicit")

    async def use_new_credentials(self) -> None:
        """Credentials appeared after start-up: sign with them from now on."""
        await self._open_client()

    @property
    def endpoint(self) -> str:
        """The URL calls go to (endpoint_url, or the region's)."""
        return self._client.meta.endpoint_url if self._client is not None else (self._config.endpoint_url or "")

    async def _send(self, model: Any, params: dict[str, Any], request_signer: Any, context: dict[str, Any],
                    **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        """The before-call handler: sign, send and parse one call ourselves (see the module docstring)."""
        body = context.get(_BODY_KEY)
        if body is None:
            return None  # not a call of ours: botocore sends it
        params["body"] = body
        request = create_request_object(params)
        await request_signer.sign(model.name, request)
        # Sent as signed; AWSRequest.prepare() would only copy the headers again
        # and add the Content-Length aiohttp sets anyway (docs/architecture.md, "The client").
        url = yarl.URL(request.url, encoded=True)
        async with self._http.post(url, data=body, headers=dict(request.headers.items()),  # type: ignore[union-attr]
                                   proxy=self._proxy(url), ssl=self._tls) as resp:
            raw = await resp.read()
            status = resp.status
            if status == 200:
                return AWSResponse(request.url, status, {}, None), {_ANSWER_KEY: raw}
            # botocore's own parser makes errors exactly what ClientError expects.
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in resp.raw_headers}
        response = {"status_code": status, "headers": headers, "body": raw, "context": {"operation_name": model.name}}
        return AWSResponse(request.url, status, headers, None), self._parser.parse(response, model.output_shape)

    def _client_cert(self) -> tuple[str, str] | None:
        c = self._config
        return (c.client_cert_file, c.client_key_file) if c.client_cert_file else None

    async def reconfigure(self, evidently: EvidentlyConfig) -> None:
        """Re-read the client certificate pair off the event loop (reload); on an error the pair in use stays."""
        await self._reads.run(self.reload_client_cert)

    def reload_client_cert(self) -> None:
        """(Re-)read evidently.client_cert_file and client_key_file for new connections; raises ClientCertError.

        A new context replaces the old one whole, so a pair that does not load
        leaves the one in use intact; connections already open keep theirs.
        """
        tls = ssl.create_default_context(cafile=self._cafile)
        pair = self._client_cert()
        if pair is not None:
            try:
                tls.load_cert_chain(*pair)
            except (OSError, ssl.SSLError) as e:
                raise ClientCertError(f"evidently.client_cert_file/evidently.client_key_file: cannot load {pair[0]} "
                                      f"and {pair[1]}: {getattr(e, 'reason', None) or e.strerror or e}") from None
        self._tls = tls

    def _proxy(self, url: yarl.URL) -> str | None:
        # HTTPS_PROXY / NO_PROXY as botocore honours them, looked up once per host:
        # aiohttp's trust_env does it per request in a thread (docs/architecture.md, "The client").
        key = (url.scheme, url.host or "")
        if key not in self._proxies:
            bypass = urllib.request.proxy_bypass_environment(key[1])
            self._proxies[key] = None if bypass else urllib.request.getproxies_environment().get(key[0])
        return self._proxies[key]

    async def put_events(self, project: str, events: list[bytes]) -> CallResult:
        """One PutProjectEvents call; every outcome becomes a CallResult, none raises."""
        try:
            # A hard deadline above the session's own timeouts: a call can never hang a worker.
            async with asyncio.timeout(self._config.request_timeout + 5.0):
                parsed = await self._client.put_project_events(
                    project=project, events=_Encoded(encode_body(events)))
        except botocore.exceptions.ClientError as e:
            return _from_client_error(e)
        except botocore.exceptions.NoCredentialsError as e:
            return CallResult(401, "NoCredentials", str(e))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as e:
            # No connection, so nothing was sent.
            return no_answer(RetryReason.CONNECTION, _describe(e), maybe_delivered=False)
        except (botocore.exceptions.ReadTimeoutError, aiohttp.SocketTimeoutError, TimeoutError) as e:
            return no_answer(RetryReason.TIMEOUT, f"{type(e).__name__}: no answer within evidently.request_timeout "
                             f"({self._config.request_timeout:g} s)", maybe_delivered=True)
        except (botocore.exceptions.BotoCoreError, aiohttp.ClientError, OSError) as e:
            # Connected, then the connection broke (reset, closed mid-answer): the
            # request may have been stored, so a resend is a possible duplicate.
            return no_answer(RetryReason.CONNECTION, _describe(e), maybe_delivered=True)
        raw = parsed.get(_ANSWER_KEY)
        if raw is None:  # an answer botocore parsed itself: judge the parsed shape the same way
            raw = msgspec.json.encode({k: v for k, v in parsed.items() if k != "ResponseMetadata"})
        return read_answer(raw, len(events))

    async def close(self) -> None:
        """Close the HTTP session and the client (idempotent)."""
        http, self._http = self._http, None
        if http is not None:
            await http.close()
        exit_, self._exit = self._exit, None
        if exit_ is not None:
            await exit_(None, None, None)


def describe(result: CallResult) -> str:
    """A call's failure as a person reads it: its code or class, then its message ("" for a success)."""
    if result.failed:
        _, code, message = result.failed[0]
        return f"{cause(code, message)} ({len(result.failed)} events of the batch)"
    if result.status == 200:
        return ""
    return cause(result.code or f"HTTP{result.status}", result.message)


def _describe(e: BaseException) -> str:
    """An error that kept a call from being answered, with the host and what to do where it helps."""
    name = type(e).__name__
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        reason = getattr(e.certificate_error, "verify_message", None) or str(e.certificate_error)
        return (f"{name}: TLS certificate verification failed for {e.host}:{e.port}: certificate verify failed: "
                f"{reason}; "
                "trust its CA with AWS_CA_BUNDLE=<PEM file> (or the system store)")[:500]
    if isinstance(e, aiohttp.ClientSSLError):
        return f"{name}: TLS handshake with {e.host}:{e.port} failed: {e.os_error}"[:500]
    if isinstance(e, aiohttp.ClientConnectorError):
        reason = e.os_error.strerror or str(e.os_error)
        return f"{name}: cannot connect to {e.host}:{e.port}: {reason}"[:500]
    return f"{name}: {e}"[:500]


def _from_client_error(e: botocore.exceptions.ClientError) -> CallResult:
    error = e.response.get("Error", {})
    meta = e.response.get("ResponseMetadata", {})
    headers = {k.lower(): v for k, v in (meta.get("HTTPHeaders") or {}).items()}
    return CallResult(
        status=int(meta.get("HTTPStatusCode") or 0) or 500,
        code=str(error.get("Code") or ""),
        message=str(error.get("Message") or ""),
        retry_after=parse_retry_after(headers),
    )
