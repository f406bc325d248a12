"""The Evidently PutProjectEvents wire protocol, shared by the intake and the emulator.

Everything here is pure: project-name rules, the path parsing SDKs need
(an ARN's ``/`` arrives percent-encoded), and AWS rest-json error answers.
"""

from __future__ import annotations

import itertools
import re
import uuid
from urllib.parse import unquote

import orjson
from aiohttp import web

MAX_EVENTS_PER_CALL = 50
MAX_PROJECT_LENGTH = 2048
EVENT_TYPES = ("aws.evidently.evaluation", "aws.evidently.custom")
DEFAULT_EVENT_TYPE = "aws.evidently.custom"
PUT_PATH_PREFIX = "/events/projects/"

# The model's pattern, anchored as the service applies it (whole value).
_PROJECT_RE = re.compile(
    r"(?:[a-zA-Z0-9._-]*)|(?:arn:[^:]*:[^:]*:[^:]*:[^:]*:project/[a-zA-Z0-9._-]*)"
)


def uuid_prefix() -> str:
    """A random UUID's first 24 characters (``8-4-4-4-``): ids unique per process run are this and a counter
    in the last group, several times cheaper than a uuid4() each."""
    return str(uuid.uuid4())[:24]


# x-amzn-RequestId values: every answer carries one.
_REQUEST_ID_PREFIX = uuid_prefix()
_request_numbers = itertools.count()


def request_id() -> str:
    """A new ``x-amzn-RequestId`` (no wrap-around: 16**12 answers take 89 years at 100k/s)."""
    return _REQUEST_ID_PREFIX + "%012x" % next(_request_numbers)


class ProtocolError(Exception):
    """A whole request refused: status, AWS error type, message, and any headers the answer needs."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers


def project_error(project: str) -> str | None:
    """Why ``project`` is not a valid project name or ARN, or None when it is."""
    if not project:
        return "project must not be empty"
    if len(project) > MAX_PROJECT_LENGTH:
        return f"project must be at most {MAX_PROJECT_LENGTH} characters, got {len(project)}"
    if _PROJECT_RE.fullmatch(project) is None:
        shown = project if len(project) <= 80 else project[:77] + "..."
        return (
            f"project {shown!r} must match [a-zA-Z0-9._-]* or "
            "arn:<partition>:<service>:<region>:<account>:project/<name>"
        )
    return None


def project_region(project: str) -> str | None:
    """The region a project ARN names (possibly ""), or None for a plain project name."""
    if not project.startswith("arn:"):
        return None
    return project.split(":", 4)[3]


def region_error(project: str, region: str) -> str | None:
    """Why a valid ``project`` cannot be delivered by a forwarder for ``region``, or None when it can.

    A project ARN names its region, and Evidently knows a project only in its
    own region: sent elsewhere, the call could only fail, later and far from
    the app. A plain name means the forwarder's region.
    """
    named = project_region(project)
    if named is None or named == region:
        return None
    return (f"project {project[:200]!r} is in region {named!r}; this forwarder delivers to {region!r} "
            f"(evidently.region): send it to a forwarder for {named!r}")


def project_from_raw_path(raw_path: str) -> str:
    """The project named by a raw ``/events/projects/{project}`` request path.

    The path must be the undecoded one: SDKs percent-encode an ARN's ``/`` as
    ``%2F``, while a raw ``/`` means an extra path segment, not one project.
    """
    if not raw_path.startswith(PUT_PATH_PREFIX):
        raise ProtocolError(
            400, "ValidationException",
            f"the request target must be a path such as {PUT_PATH_PREFIX}{{project}}, "
            f"got {raw_path[:100]!r} (absolute-form targets are for proxies)",
        )
    raw = raw_path.split("?", 1)[0][len(PUT_PATH_PREFIX):]
    if "/" in raw:
        raise ProtocolError(
            400, "ValidationException",
            f"project {unquote(raw)!r} is not one path segment; percent-encode '/' as %2F",
        )
    project = unquote(raw)
    problem = project_error(project)
    if problem is not None:
        raise ProtocolError(400, "ValidationException", problem)
    return project


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An AWS rest-json error answer that botocore parses into the right exception."""
    all_headers = {
        "x-amzn-ErrorType": error_type,
        "x-amzn-RequestId": request_id(),
    }
    if headers:
        all_headers.update(headers)
    return web.Response(
        status=status,
        body=orjson.dumps({"message": message}),
        content_type="application/json",
        headers=all_headers,
    )


def protocol_error_response(err: ProtocolError) -> web.Response:
    return error_response(err.status, err.error_type, err.message, err.headers)
