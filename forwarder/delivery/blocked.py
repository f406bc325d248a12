"""Refusals that are about the forwarder, not its events: blocked delivery and missing projects.

A call refused for the caller's identity (no credentials, credentials or a
signature the service does not accept, a region the signature is not scoped to)
would be refused for any event: such events are held, never dead-lettered, and
the forwarder says "delivery blocked: <code>: <message>" until a call goes
through. ``AccessDeniedException`` is about one project while others deliver,
and blocks delivery when nothing has been delivered for ``ACCESS_DENIED_AFTER``
seconds. A project that does not exist (404) is given ``retry.not_found_grace``
to appear (created during a deploy), then its events are dead-lettered.
Pure bookkeeping on an injected clock; the sender acts on what it says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

NOT_FOUND = "ResourceNotFoundException"
ACCESS_DENIED = "AccessDeniedException"
# The forwarder_delivery_blocked reason of each code that no event can get past.
IDENTITY_CODES = {
    "NoCredentials": "no_credentials",
    "UnrecognizedClientException": "credentials_refused",
    "InvalidClientTokenId": "credentials_refused",
    "ExpiredTokenException": "credentials_refused",
    "MissingAuthenticationTokenException": "credentials_refused",
    "RequestExpired": "signature_refused",
    "InvalidSignatureException": "signature_refused",
    "IncompleteSignatureException": "signature_refused",
    "SignatureDoesNotMatch": "signature_refused",
}
ACCESS_DENIED_AFTER = 60.0  # seconds without a delivery before access denials mean "blocked"
MAX_MISSING = 1024  # projects remembered as missing (project names come from clients)


@dataclass(frozen=True, slots=True)
class Blocked:
    reason: str  # a forwarder_delivery_blocked reason
    code: str
    message: str
    since: float  # on the monotonic clock


def held(code: str, blocked: Blocked | None) -> bool:
    """Whether a batch last refused with ``code`` is held rather than dead-lettered at retry.max_elapsed."""
    return code in IDENTITY_CODES or (code == ACCESS_DENIED and blocked is not None)


class Refusals:
    """What the refusals since the last delivery say: blocked delivery, missing projects."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.blocked: Blocked | None = None
        self._delivered_at: float | None = None  # last call Evidently answered without refusing
        self._missing: dict[str, float] = {}  # project -> first 404 since it last delivered

    def refused(self, project: str, code: str, message: str) -> tuple[Blocked | None, bool]:
        """A call for ``project`` was refused: (the blocked state, whether it began now)."""
        now = self._clock()
        if code == NOT_FOUND and project not in self._missing:
            if len(self._missing) >= MAX_MISSING:
                del self._missing[next(iter(self._missing))]
            self._missing[project] = now
        reason = IDENTITY_CODES.get(code)
        if reason is None and code == ACCESS_DENIED and (
                self._delivered_at is None or now - self._delivered_at >= ACCESS_DENIED_AFTER):
            reason = "access_denied"
        if reason is None:
            return self.blocked, False
        began = self.blocked is None
        since = now if self.blocked is None else self.blocked.since
        self.blocked = Blocked(reason, code, message, since)
        return self.blocked, began

    def answered(self, project: str) -> bool:
        """A call for ``project`` went through; True when this ended blocked delivery."""
        self._delivered_at = self._clock()
        self._missing.pop(project, None)
        ended, self.blocked = self.blocked is not None, None
        return ended

    def missing_since(self, project: str) -> float | None:
        """When the project was first answered 404 (since it last delivered), or None."""
        return self._missing.get(project)
