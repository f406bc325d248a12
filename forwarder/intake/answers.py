"""What the intake answers with: event ids, PutProjectEvents results, JSON and metrics bodies."""

from __future__ import annotations

import itertools
from typing import Callable

import orjson
from aiohttp import web
from multidict import istr
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from forwarder.buffer.contract import EVENT_ID_PREFIX
from forwarder.evidently.protocol import request_id

REQUEST_ID = istr("x-amzn-RequestId")  # istr: multidict skips case-folding it on every answer


class EventIds:
    """UUID-shaped event ids, unique per daemon run (``buffer.contract.event_id``):
    the run's prefix, the id of the append that took the events and each event's
    index in it, so that the delivery and dead-letter lines can name them too.
    Whole answers come from a cached template per event count with the append's
    id patched in, instead of building each id (docs/intake.md, "Why a low-level
    server...")."""

    _REQUEST = b"\x00REQUEST\x00"  # where each answer gets its append's id
    MAX_TEMPLATED = 4096

    def __init__(self, prefix: str = EVENT_ID_PREFIX) -> None:
        self._prefix = prefix  # 8-4-4-4- : the last group is the append's id and the index
        self._templates: dict[int, bytes] = {}

    def _template(self, n: int) -> bytes:
        ids = b",".join(b'{"eventId":"%s%s%04x"}' % (self._prefix.encode(), self._REQUEST, i) for i in range(n))
        return b'{"eventResults":[' + ids + b'],"failedEventCount":0}'

    def results(self, n: int, errors: list[tuple[int, str]], append_id: int) -> bytes:
        """The PutProjectEvents answer body for ``n`` events, ``errors`` being (index, message) of the refused;
        the accepted ones went into append ``append_id``, in order."""
        if not errors:
            return self.all_accepted(n, append_id)
        failed = dict(errors)
        event_id = self.one_request(append_id)
        accepted = itertools.count()
        results = [
            {"errorCode": "ValidationException", "errorMessage": failed[i]} if i in failed
            else {"eventId": event_id(next(accepted))}
            for i in range(n)
        ]
        return orjson.dumps({"eventResults": results, "failedEventCount": len(errors)})

    def all_accepted(self, n: int, append_id: int) -> bytes:
        """The answer for a request whose ``n`` events were all accepted into append ``append_id``."""
        template = self._templates.get(n)
        if template is None:
            template = self._template(n)
            if n <= self.MAX_TEMPLATED:
                self._templates[n] = template
        return template.replace(self._REQUEST, b"%08x" % (append_id & 0xFFFFFFFF))

    def one_request(self, append_id: int) -> Callable[[int], str]:
        """Ids for the events of append ``append_id``, by their index in it."""
        base = f"{self._prefix}{append_id & 0xFFFFFFFF:08x}"
        return lambda i: f"{base}{i & 0xFFFF:04x}"


def json_response(value: dict, status: int = 200) -> web.Response:
    response = web.Response(body=orjson.dumps(value), status=status, content_type="application/json")
    response.headers[REQUEST_ID] = request_id()
    return response


def metrics_response(registry: CollectorRegistry) -> web.Response:
    resp = web.Response(body=generate_latest(registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    resp.headers[REQUEST_ID] = request_id()
    return resp
