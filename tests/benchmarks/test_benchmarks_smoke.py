"""The benchmark suite still runs: ``python -m benchmarks --quick`` end to end.

No timing is asserted (the figures of a quick run mean nothing); what rots is
the suite itself, so this checks that it completes and reports every row.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# One row name prefix per benchmark the suite must report.
EXPECTED_ROWS = (
    "intake, 1 event/POST",
    "intake, 50 events/POST",
    "sender, 50-event calls",
    "sender stretch: one process",
    "sender vs stock aiobotocore",
    "memory per buffered event",
    "delivery latency, 5k ev/s: 100 POST/s",
    "delivery latency, 5k ev/s: 500 POST/s",
    "app's wait per event: POST to the forwarder",
    "app's wait per event: boto3 pointed at the forwarder",
    "uvloop vs asyncio, 1 event/POST intake",
    "uvloop vs asyncio, sender",
    "orjson vs json: parse+encode, 1 event/POST",
    "orjson vs json: parse+encode, 50 events/POST",
    "memory held per encoded event",
    "intake, 1 event/POST, intake.auth = sigv4",
    "intake, 1 event/POST, intake.auth = token",
    "connection flood:",
    "goodput, 1% of events throttled, demand under the quota",
    "accepted calls at a 100 calls/s quota, 1% of events throttled",
    "central tier, 5 ev/request, TLS, intake.auth = mtls",
    "central tier, 5 ev/request: CPU per request split by A/B",
)


@pytest.mark.e2e
@pytest.mark.timeout(340)
def test_quick_benchmark_run_completes_and_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=330)
    assert run.returncode == 0, run.stderr[-4000:]
    report = out.read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    for name in EXPECTED_ROWS:
        assert any(line.startswith(f"| {name}") for line in table), f"no row {name!r} in:\n{report}"
    for name in EXPECTED_ROWS:
        assert name in run.stdout, f"no row {name!r} in the printed table:\n{run.stdout}"
    assert "- CPU: " in report and "- Python: " in report
