"""The fleet's report: a Markdown table, one row per run, and the per-forwarder trace as CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from benchmarks.fleet.analysis import Result, Sample

COLUMNS = ("controller", "forwarders", "quota", "goodput", "throttled", "jain", "reconverge_down",
           "reconverge_up", "rate_down", "rate_up", "goodput_half", "goodput_back", "fleet_cpu", "emulator_cpu")


def _cell(value: Any) -> str:
    if value is None:
        return "none"  # did not re-converge within the phase
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per run."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        rows.append("| " + " | ".join(_cell(getattr(r, c)) for c in COLUMNS) + " |")
    return "\n".join(rows)


def write_trace(path: Path, runs: Sequence[tuple[Result, list[Sample]]]) -> None:
    """Per-forwarder trace (long CSV): accepted events, throttled requests and limiter rate per sample."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["controller", "forwarders", "t", "key", "accepted_events", "requests", "throttled", "rate"])
        for result, samples in runs:
            for s in samples:
                for key, rate in s.rates.items():
                    out.writerow([result.controller, result.forwarders, f"{s.t:.3f}", key, s.accepted.get(key, 0),
                                  s.requests.get(key, 0), s.throttled.get(key, 0), f"{rate:.3f}"])
