"""Pure helpers: medians, percentiles, ratios, and the order of alternated runs."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank: an observed value, never interpolated."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def alternate(names: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, name) in the order A, B, A, B, ...: drift in the machine hits each side alike."""
    return [(r, name) for r in range(rounds) for name in names]
