"""The only code that talks to AWS: PutProjectEvents through one aiobotocore client.

aiobotocore brings credentials, endpoint rules, request serialisation, SigV4
signing and error parsing. What it would cost us on the hot path is turned off
through its documented settings and event hooks, each worth its figure (2-core
machine, 50 events per call; ``benchmarks/`` measures the whole):

* ``parameter_validation=False``: validation was ~37% of a default call's CPU;
  the intake has already validated every event against the model's rules.
* The body is not serialised by botocore at all. The events are bytes in their
  final form since the intake; ``before-parameter-build`` takes them out of the
  params (so the serialiser sees ``events=[]``) and the joined bytes become the
  body before signing. Serialisation was ~32% of a call, float timestamps alone
  ~40% (botocore parses each one and converts it through dateutil twice). A
  default call costs 3.4-4.1 ms of CPU.
* ``before-call`` is where a handler may answer a call itself (botocore's
  Stubber works this way). Ours signs the serialised request with the client's
  own request signer (its credentials, refreshed as botocore does), sends it on
  a plain aiohttp session and parses an error answer with botocore's parser
  for the model's protocol, so botocore raises the same ClientError. This skips
  the endpoint's generic machinery: five more hook emissions, the retry
  bookkeeping, header re-encoding, response wrapping and the generic parser
  walking 50 ``eventResults`` (a 200 without failed entries is recognised by
  a substring test; one with failures is read with orjson). With the proxy
  lookup done once per host (``_proxy``), sender CPU per event went from 11.1
  to 7.7 us (raw signed aiohttp: 4.5; ``make bench``).
* ``user_agent`` set once: botocore otherwise rebuilds and sanitises its
  detailed User-Agent twice per call (~0.25 ms of a call in a profile).
* ``retries={"total_max_attempts": 1}``: exactly one retry layer, ours.
* ``inject_host_prefix=False`` whenever ``endpoint_url`` is set, or botocore
  would call ``dataplane.127.0.0.1``.

The HTTP session follows what aiobotocore's would do for a daemon: TLS
verified against ``AWS_CA_BUNDLE`` or botocore's CA bundle, proxies from the
usual environment variables, the client's connect and read timeouts.
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
import orjson
import yarl
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.awsrequest import AWSResponse, create_request_object
from botocore.httpsession import get_cert_path
from botocore.parsers import create_parser

from . import __version__
from .config import EvidentlyConfig
from .retry import CallResult, parse_retry_after

_OPERATION = "evidently.PutProjectEvents"
_BODY_KEY = "forwarder_encoded_body"
_FAILED_KEY = "ForwarderFailedEntries"
_USER_AGENT = (f"forwarder/{__version__} aiobotocore/{aiobotocore.__version__} "
               f"botocore/{botocore.__version__} Python/{platform.python_version()}")


class ModelMissing(RuntimeError):
    """The botocore evidently model is not installed."""


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


def failed_entries(body: bytes) -> tuple[tuple[int, str, str], ...] | None:
    """(index, code, message) of each failed event of a 200's body; None if it is not the expected shape."""
    if b'"errorCode"' not in body and b'"eventResults"' in body:
        return ()  # the usual answer: a substring test instead of 50 parsed results (~4% of a call)
    try:
        results = orjson.loads(body).get("eventResults") or ()
        return tuple((i, r.get("errorCode") or "Unknown", r.get("errorMessage") or "")
                     for i, r in enumerate(results) if r.get("errorCode"))
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return None


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

    def __init__(self, config: EvidentlyConfig, credentials: tuple[str, str] | None = None) -> None:
        self._config = config
        self._credentials = credentials
        self._exit: Any = None
        self._client: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], str | None] = {}  # (scheme, host) -> proxy URL, see _proxy
        self._parser: Any = None

    async def start(self) -> None:
        """Create the client; raises ModelMissing before anything else."""
        session = AioSession()
        check_model(session)
        if self._credentials is not None:
            session.set_credentials(*self._credentials)
        c = self._config
        endpoint = c.endpoint_url or None
        connect_timeout = min(5.0, c.request_timeout)
        cm = session.create_client(
            "evidently",
            region_name=c.region,
            endpoint_url=endpoint,
            config=AioConfig(
                inject_host_prefix=endpoint is None,
                retries={"total_max_attempts": 1},
                parameter_validation=False,
                max_pool_connections=c.concurrency,
                connect_timeout=connect_timeout,
                read_timeout=c.request_timeout,
                tcp_keepalive=True,
                user_agent=_USER_AGENT,
            ),
        )
        self._client = await cm.__aenter__()
        self._exit = cm.__aexit__
        tls = ssl.create_default_context(cafile=get_cert_path(session.get_config_variable("ca_bundle") or True))
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=c.concurrency, ssl=tls),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=c.request_timeout),
        )
        model = self._client.meta.service_model
        self._parser = create_parser(model.protocol)
        events = self._client.meta.events
        events.register(f"before-parameter-build.{_OPERATION}", _take_body)
        events.register(f"before-call.{_OPERATION}", self._send)
        for event, handler in _NOOP_HANDLERS:
            events.unregister(event, handler)

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
        # and add the Content-Length aiohttp sets anyway (~6% of a call).
        url = yarl.URL(request.url, encoded=True)
        async with self._http.post(url, data=body, headers=dict(request.headers.items()),  # type: ignore[union-attr]
                                   proxy=self._proxy(url)) as resp:
            raw = await resp.read()
            status = resp.status
            if status == 200:
                failed = failed_entries(raw)
                if failed is not None:
                    return AWSResponse(request.url, status, {}, None), {_FAILED_KEY: failed}
            # botocore's own parser makes errors exactly what ClientError expects.
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in resp.raw_headers}
        response = {"status_code": status, "headers": headers, "body": raw, "context": {"operation_name": model.name}}
        return AWSResponse(request.url, status, headers, None), self._parser.parse(response, model.output_shape)

    def _proxy(self, url: yarl.URL) -> str | None:
        # HTTPS_PROXY / NO_PROXY as botocore honours them, looked up once per host:
        # aiohttp's trust_env does it per request in a thread (~20% of a call's CPU).
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
        except (botocore.exceptions.ReadTimeoutError, TimeoutError):
            return CallResult(0, "timeout", "no answer before the read timeout")
        except botocore.exceptions.NoCredentialsError as e:
            return CallResult(401, "NoCredentials", str(e))
        except (botocore.exceptions.BotoCoreError, aiohttp.ClientError, OSError) as e:
            return CallResult(0, "connection", f"{type(e).__name__}: {e}")
        failed = parsed.get(_FAILED_KEY)
        if failed is None:  # an unexpected 200 body that botocore parsed itself
            failed = tuple((i, r.get("errorCode") or "Unknown", r.get("errorMessage") or "")
                           for i, r in enumerate(parsed.get("eventResults") or ()) if r.get("errorCode"))
        return CallResult(200, failed=failed)

    async def close(self) -> None:
        """Close the HTTP session and the client (idempotent)."""
        http, self._http = self._http, None
        if http is not None:
            await http.close()
        exit_, self._exit = self._exit, None
        if exit_ is not None:
            await exit_(None, None, None)


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
