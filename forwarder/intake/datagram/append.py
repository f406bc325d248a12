"""Appending the datagram intake's decoded groups to the buffer, without losing any.

The groups decoded together (one per project) go to the buffer at once, so
that a disk buffer commits them together. A group the buffer refuses is kept
and tried again, reading paused meanwhile, until the buffer takes it: nothing
read is dropped for lack of room, and the groups decoded next wait behind it,
so a project's events keep their order.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from forwarder.buffer.contract import Buffer, BufferFull
from forwarder.observability import Observer

Group = tuple[str, list[bytes]]  # a project and its encoded events, in order


def retry_after(group: Group, error: Exception) -> list[Group]:
    """What to try again after the buffer refused ``group``: halved when it has no room,
    so that part of it fits as soon as there is some (a group may even exceed the whole buffer)."""
    project, events = group
    if not isinstance(error, BufferFull) or len(events) == 1:
        return [group]
    half = len(events) // 2
    return [(project, events[:half]), (project, events[half:])]


class GroupAppender:
    """Appends decoded groups to the buffer; holds the ones it refused until it takes them."""

    def __init__(self, buffer: Buffer, observer: Observer, full_poll: float,
                 pause: Callable[[str], None], resume: Callable[[str], None]) -> None:
        self._buffer = buffer
        self._observer = observer
        self._full_poll = full_poll
        self._pause = pause  # stop reading, for a reason: the senders see the backpressure
        self._resume = resume
        self.in_flight = 0  # events handed to ``append`` and not in the buffer yet

    async def append(self, groups: list[Group], events: int, received_at: float) -> None:
        """Append every group (``events`` in all), keeping the refused ones (and reading paused)
        until the buffer takes them."""
        self.in_flight = events
        if len(groups) == 1:
            refused = await self._append_in_order(groups, received_at)
        else:  # one append per project in flight together: one disk commit takes them all
            results = await asyncio.gather(*(self._buffer.append(p, evs, received_at) for p, evs in groups),
                                           return_exceptions=True)
            refused = []
            for group, result in zip(groups, results):
                if not isinstance(result, BaseException):  # the append's id: taken
                    self._appended(len(group[1]))
                elif isinstance(result, Exception):
                    refused += self._refused(group, result)
                else:
                    raise result  # CancelledError and friends
        while refused:
            await self._wait_for_room()
            refused = await self._append_in_order(refused, received_at)
        self._resume("buffer_full")

    def abandon(self) -> int:
        """Give up the events not appended yet (at shutdown); returns how many they were."""
        left, self.in_flight = self.in_flight, 0
        return left

    async def _append_in_order(self, groups: list[Group], received_at: float) -> list[Group]:
        """Append one group after the other; returns the first refused one and those after it."""
        for k, (project, events) in enumerate(groups):
            try:
                await self._buffer.append(project, events, received_at)
            except Exception as e:
                return self._refused(groups[k], e) + groups[k + 1:]
            self._appended(len(events))
        return []

    def _refused(self, group: Group, error: Exception) -> list[Group]:
        if not isinstance(error, BufferFull):
            self._observer.datagram_append_failed(len(group[1]), error)
        return retry_after(group, error)

    def _appended(self, n: int) -> None:
        self.in_flight -= n
        self._observer.events_received(n)

    async def _wait_for_room(self) -> None:
        # Polled: the buffer has no "room again" signal, and its ``full`` flag stays
        # up until an acknowledgement, which a too-large group may never get to see.
        self._pause("buffer_full")
        await asyncio.sleep(self._full_poll)
