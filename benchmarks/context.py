"""What every benchmark gets: the HTTP session, the log directory, the run's size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp

T = TypeVar("T")


@dataclass
class Context:
    session: aiohttp.ClientSession
    logdir: Path
    quick: bool
    use_wrk: bool

    def pick(self, full: T, quick: T) -> T:
        """``full`` for ``make bench``, ``quick`` for the smoke run."""
        return quick if self.quick else full
