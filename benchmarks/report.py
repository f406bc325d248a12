"""The results table (stdout) and ``RESULTS.md``: each figure, its ratio, its target, PASS/FAIL."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Row:
    """One line of the table."""

    key: str  # the --only name of the benchmark that produced it
    name: str
    figure: str  # the measured side, e.g. "12.3k req/s, p50 2.1 ms"
    baseline: str  # what it is compared with, same units
    ratio: float | None  # figure / baseline (or as the target defines it)
    target: str = ""  # e.g. ">= 0.85"; "" for informational rows
    passed: bool | None = None  # None: no target
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "FAIL")


def at_least(value: float, target: float) -> bool:
    return not math.isnan(value) and value >= target


def at_most(value: float, target: float) -> bool:
    return not math.isnan(value) and value <= target


def fmt_ratio(r: float | None) -> str:
    return "" if r is None else ("n/a" if math.isnan(r) else f"{r:.2f}")


def table(rows: list[Row]) -> str:
    """A plain-text table for the terminal."""
    head = ("benchmark", "measured", "baseline", "ratio", "target", "")
    lines = [head] + [(r.name, r.figure, r.baseline, fmt_ratio(r.ratio), r.target, r.verdict) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rows: list[Row], machine: list[tuple[str, str]], method: list[str], title: str) -> str:
    out = [f"# {title}", "", "Written by `make bench` (`python -m benchmarks`); do not edit by hand.", "",
           "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in machine]
    out += ["", "## Results", "", "| benchmark | measured | baseline | ratio | target | verdict |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r.name} | {r.figure} | {r.baseline} | {fmt_ratio(r.ratio)} | {r.target} | {r.verdict} |")
    notes = [(r.name, n) for r in rows for n in r.notes]
    if notes:
        out += ["", "## Notes per benchmark", ""]
        out += [f"- **{name}**: {note}" for name, note in notes]
    out += ["", "## Method", ""] + [f"- {m}" for m in method]
    return "\n".join(out) + "\n"
