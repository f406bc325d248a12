"""Time and chance, injected into the stages so that tests control both."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True, slots=True)
class Clock:
    monotonic: Callable[[], float] = time.monotonic  # deadlines and pacing
    wall: Callable[[], float] = time.time  # event times and what the dead-letter file records
    rng: random.Random = field(default_factory=random.Random)  # backoff jitter
