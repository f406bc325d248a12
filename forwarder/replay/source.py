"""Where replay reads from: a dead-letter file and its rotations, and how far each was replayed.

The forwarder rotates ``<path>`` to ``<path>.1``, ``.1`` to ``.2`` ... up to
``.5`` (forwarder/delivery/deadletter.py), so the oldest events are in the
highest number: replay reads ``.5`` down to ``.1``, then ``<path>``.

Progress is kept in a sidecar file, ``<path>.replayed``: for each file, the byte
offset up to which every line was answered by the intake, rewritten atomically
after each answered request. A file is known by its device, inode and first
line, which a rotation (a rename) keeps, so the offsets follow the files as the
forwarder rotates them, and a new file that reuses an inode starts at 0.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Iterator

import orjson

from forwarder.delivery.deadletter import KEEP

_ROTATED = re.compile(r"\.[1-9][0-9]*$")
STATE_SUFFIX = ".replayed"


class SourceError(Exception):
    """A dead-letter file or the offsets file cannot be read or written; the message says which and why."""


@dataclass(frozen=True)
class Entry:
    """One dead-letter line: its event as sent, where it goes, and the offset just past the line."""

    project: str
    event: bytes
    code: str
    end: int


@dataclass(frozen=True)
class Unreadable:
    """A line that is not a dead-letter entry (counted, then skipped for good); blank lines are not counted."""

    end: int
    blank: bool = False


def files_in_order(path: str) -> list[str]:
    """``path``'s rotations, oldest first, then ``path``; a rotation given by name is read alone."""
    if _ROTATED.search(path):
        candidates = [path]
    else:
        candidates = [f"{path}.{i}" for i in range(KEEP, 0, -1)] + [path]
    found = [p for p in candidates if os.path.isfile(p)]
    if not found:
        raise SourceError(f"cannot read {path}: no such file (nor rotated {path}.1 to .{KEEP})")
    return found


class Offsets:
    """How far each file was replayed, persisted in ``<path>.replayed`` after every commit."""

    def __init__(self, path: str, fresh: bool = False) -> None:
        self.path = path + STATE_SUFFIX
        self._done: dict[str, dict] = {} if fresh else self._load()

    def _load(self) -> dict[str, dict]:
        try:
            with open(self.path, "rb") as f:
                state = orjson.loads(f.read())
            return {k: v for k, v in state["files"].items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(f"cannot read the replay offsets {self.path}: {e}; remove it (or pass --from-start) "
                              "to replay everything again") from None

    def start(self, file: "DeadLetterFile") -> int:
        """Where replay of ``file`` resumes: its committed offset, or 0 for a file not seen before."""
        known = self._done.get(file.key)
        if known is None or known.get("head") != file.head or not 0 <= known.get("offset", -1) <= file.size:
            return 0
        return int(known["offset"])

    def commit(self, file: "DeadLetterFile", offset: int, live: list["DeadLetterFile"]) -> None:
        """Record ``offset`` for ``file``, forgetting files that no longer exist; durable on return."""
        keys = {f.key for f in live}
        self._done = {k: v for k, v in self._done.items() if k in keys}
        self._done[file.key] = {"offset": offset, "head": file.head, "name": os.path.basename(file.path)}
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(orjson.dumps({"files": self._done}, option=orjson.OPT_INDENT_2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise SourceError(f"cannot write the replay offsets {self.path}: {e.strerror or e}") from None


class DeadLetterFile:
    """One file as replay found it, held open: a rotation (a rename) while replay reads it changes nothing.

    Lines appended after it was opened wait for the next run (``size`` is fixed at open).
    """

    def __init__(self, path: str, f, key: str, head: str, size: int) -> None:
        self.path, self._f, self.key, self.head, self.size = path, f, key, head, size

    @classmethod
    def open(cls, path: str) -> "DeadLetterFile":
        try:
            f = open(path, "rb")
        except OSError as e:
            raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
        st = os.fstat(f.fileno())
        first = f.readline()
        return cls(path, f, f"{st.st_dev}:{st.st_ino}", hashlib.blake2b(first, digest_size=16).hexdigest(),
                   st.st_size)

    def close(self) -> None:
        self._f.close()

    def count_lines(self, start: int) -> int:
        """Complete lines from ``start`` to the size replay found (a progress total, not a parse)."""
        self._f.seek(start)
        count, left = 0, self.size - start
        while left > 0:
            chunk = self._f.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            count += chunk.count(b"\n")
        return count

    def entries(self, start: int, project: str | None) -> Iterator[Entry | Unreadable]:
        """The complete lines from ``start``, parsed; ``project`` overrides each line's own."""
        self._f.seek(start)
        position = start
        while position < self.size:
            line = self._f.readline(self.size - position)
            if not line.endswith(b"\n"):
                return  # a line still being written: the next run reads it
            position += len(line)
            if line.strip():
                yield _parse(line, position, project)
            else:
                yield Unreadable(position, blank=True)


def _parse(line: bytes, end: int, project: str | None) -> Entry | Unreadable:
    try:
        entry = orjson.loads(line)
        event, target, code = entry["event"], project or entry["project"], entry.get("errorCode", "unknown")
        if type(event) is not dict or type(target) is not str or not target:
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return Unreadable(end)
    return Entry(target, orjson.dumps(event), str(code), end)
