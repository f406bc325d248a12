"""The only code that talks to AWS: PutProjectEvents through one aiobotocore client.

aiobotocore brings credentials, endpoint rules, SigV4 signing and error parsing.
What it would cost us on the hot path is turned off through its documented
settings and event hooks, each worth its figure (2-core machine, 50 events):

* ``parameter_validation=False``: validation was ~37% of a default call's CPU;
  the intake has already validated every event against the model's rules.
* The body is not serialised by botocore at all. The events are bytes in their
  final form since the intake; ``before-parameter-build`` takes them out of the
  params (so the serialiser sees ``events=[]``) and ``before-call`` puts the
  joined bytes in as the body before signing. Serialisation was ~32% of a call,
  float timestamps alone ~40% (botocore parses each one and converts it through
  dateutil twice). A default call costs 3.4-4.1 ms of CPU; see benchmarks/.
* ``before-parse`` reads a 200's body with orjson and keeps only the failed
  entries; botocore then parses an empty object. Its generic parser walked 50
  ``eventResults`` structures per call, ~0.29 ms of the 0.8 ms a call cost.
* ``user_agent`` set once: botocore otherwise rebuilds and sanitises its
  detailed User-Agent twice per call (~0.25 ms of a call in a profile).
* ``retries={"total_max_attempts": 1}``: exactly one retry layer, ours.
* ``inject_host_prefix=False`` whenever ``endpoint_url`` is set, or botocore
  would call ``dataplane.127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import platform
from typing import Any, Protocol

import aiobotocore
import aiohttp
import botocore
import botocore.exceptions
import orjson
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

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


def _put_body(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    body = context.get(_BODY_KEY)
    if body is not None:
        params["body"] = body


def _summarise_results(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    if response_dict.get("status_code") != 200:
        return  # errors go through botocore's parser, which knows their shapes
    try:
        parsed = orjson.loads(response_dict["body"])
        results = parsed.get("eventResults") or ()
        failed = tuple((i, r.get("errorCode") or "Unknown", r.get("errorMessage") or "")
                       for i, r in enumerate(results) if r.get("errorCode"))
    except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
        return  # not what we expected: let botocore parse (or refuse) it
    customized_response_dict[_FAILED_KEY] = failed
    response_dict["body"] = b"{}"


def check_model(session: AioSession) -> None:
    """Fail with a clear message when botocore has no evidently model."""
    if "evidently" not in session.get_available_services():
        raise ModelMissing(
            "the botocore service model for 'evidently' is not installed (botocore removed it in "
            "1.42.51); install it with: pip install botocore-a-la-carte-evidently"
        )


class EvidentlyClient:
    """PutProjectEvents calls over one pooled aiobotocore client."""

    def __init__(self, config: EvidentlyConfig, credentials: tuple[str, str] | None = None) -> None:
        self._config = config
        self._credentials = credentials
        self._exit: Any = None
        self._client: Any = None

    async def start(self) -> None:
        """Create the client; raises ModelMissing before anything else."""
        session = AioSession()
        check_model(session)
        if self._credentials is not None:
            session.set_credentials(*self._credentials)
        c = self._config
        endpoint = c.endpoint_url or None
        cm = session.create_client(
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
            ),
        )
        self._client = await cm.__aenter__()
        self._exit = cm.__aexit__
        events = self._client.meta.events
        events.register(f"before-parameter-build.{_OPERATION}", _take_body)
        events.register(f"before-call.{_OPERATION}", _put_body)
        events.register(f"before-parse.{_OPERATION}", _summarise_results)

    async def put_events(self, project: str, events: list[bytes]) -> CallResult:
        """One PutProjectEvents call; every outcome becomes a CallResult, none raises."""
        try:
            # A hard deadline above botocore's own timeouts: a call can never hang a worker.
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
        if failed is None:  # botocore parsed the body itself
            failed = tuple((i, r.get("errorCode") or "Unknown", r.get("errorMessage") or "")
                           for i, r in enumerate(parsed.get("eventResults") or ()) if r.get("errorCode"))
        return CallResult(200, failed=failed)

    async def close(self) -> None:
        """Close the client's connection pool (idempotent)."""
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
