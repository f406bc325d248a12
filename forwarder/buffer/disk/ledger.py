"""The disk buffer's ledger: the highest row id ever committed, kept where losing the WAL does not lose it.

Rows committed since the last checkpoint live only in the WAL; if the WAL is
deleted or overwritten after the process stopped, the database file is still
valid, only smaller. The ledger tells: it records the highest id committed,
and at start a file holding lower ids has lost rows. It is kept twice, so that
the loss is not hidden by whatever also took the one plain file
(docs/diskbuffer.md, "Damage found at start"):

- ``buffer.ledger``, rewritten in place after each commit;
- an extended attribute of the database file itself (``user.forwarder.ledger``),
  which goes with the file: it survives the ledger file and the WAL being
  deleted or garbled, and the database file being truncated.

Not fsynced: each copy survives what the WAL survives (a killed process), and
is only compared with what the file holds at the next start.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field

LEDGER_NAME = "buffer.ledger"
LEDGER_XATTR = "user.forwarder.ledger"
_FORMAT = b"%020d\n"
_VALID = re.compile(rb"\d{20}\n")
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})


@dataclass(slots=True)
class Recorded:
    """What the last run's ledger says."""

    max_id: int = 0  # the highest id either copy recorded; 0 when neither did
    problems: list[str] = field(default_factory=list)  # a copy missing or garbled, in words


class Ledger:
    """Both copies of the highest committed id: read at start, written after each commit."""

    def __init__(self, directory: str, db_file: str) -> None:
        self.path = os.path.join(directory, LEDGER_NAME)
        self.db_file = db_file
        self._fd: int | None = None
        self._db_fd: int | None = None  # the database file this run holds, for its attribute
        self.xattrs = True  # False on a file system without user extended attributes

    def read(self) -> Recorded:
        """Both copies as the last run left them."""
        recorded = Recorded()
        for value, problem in (self._read_file(), self._read_xattr()):
            recorded.max_id = max(recorded.max_id, value)
            if problem:
                recorded.problems.append(problem)
        return recorded

    def _read_file(self) -> tuple[int, str]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(64)
        except FileNotFoundError:
            return 0, f"{self.path} was missing"
        if not _VALID.fullmatch(data):
            return 0, f"{self.path} was garbled ({data[:24]!r})"
        return int(data), ""

    def _read_xattr(self) -> tuple[int, str]:
        try:
            data = os.getxattr(self.db_file, LEDGER_XATTR)
        except FileNotFoundError:
            return 0, ""  # no database file: nothing to compare with
        except OSError as e:
            if e.errno in _NO_XATTRS:
                self.xattrs = False
            return 0, ""  # ENODATA: a file from before this copy existed
        if not _VALID.fullmatch(data):
            return 0, f"the ledger attribute of {self.db_file} was garbled ({data[:24]!r})"
        return int(data), ""

    def open(self, max_id: int) -> None:
        """Hold both copies for this run's file, starting at ``max_id``."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._db_fd = os.open(self.db_file, os.O_RDONLY)
        os.ftruncate(self._fd, len(_FORMAT % max_id))  # a garbled, longer ledger must not keep its tail
        self.write(max_id)

    def write(self, max_id: int) -> None:
        data = _FORMAT % max_id
        if self._fd is not None:
            os.pwrite(self._fd, data, 0)
        if self._db_fd is not None and self.xattrs:
            try:
                os.setxattr(self._db_fd, LEDGER_XATTR, data)
            except OSError as e:
                # A full disk may refuse the attribute's block: this copy stays behind
                # (lower, so never a false alarm) until a later commit writes it.
                if e.errno in _NO_XATTRS:
                    self.xattrs = False

    def close(self) -> None:
        for fd in (self._fd, self._db_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._db_fd = None
