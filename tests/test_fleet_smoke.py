"""The fleet simulation (benchmarks/fleet.py) runs and reports sane figures.

No timing targets are asserted here: a 2-core CI machine measures its own
noise. The targets and the figures live in docs/scaling.md.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import FakeClock

FLEET = Path(__file__).resolve().parent.parent / "benchmarks" / "fleet.py"


def load_fleet():
    spec = importlib.util.spec_from_file_location("fleet", FLEET)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fleet = load_fleet()


def sample(t: float, accepted: int, requests: int, throttled: int) -> "fleet.Sample":
    return fleet.Sample(t, {"fwd-0": accepted}, {"fwd-0": requests}, {"fwd-0": throttled})


def test_jain_index_is_one_when_fair_and_one_over_n_when_one_forwarder_takes_all():
    assert fleet.jain([5.0, 5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert fleet.jain([8.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert fleet.jain([0.0, 0.0]) == 0.0


def test_reconvergence_is_the_end_of_the_first_window_at_the_new_quota_that_holds():
    # 100 calls/s until t=10, then 50 calls/s (the new quota) with no throttling from t=12.
    samples, accepted, requests, throttled = [], 0, 0, 0
    for tenth in range(0, 201):
        t = tenth / 10
        calls = 10 if t <= 10 else (8 if t <= 12 else 5)
        refused = 0 if t <= 10 or t > 12 else 3
        accepted += (calls - refused) * fleet.EVENTS_PER_CALL
        requests += calls
        throttled += refused
        samples.append(sample(t, accepted, requests, throttled))
    took = fleet.reconvergence(samples, changed_at=10.0, until=20.0, quota=50.0)
    assert took is not None and 2.0 <= took <= 3.2


def test_reconvergence_of_the_rate_alone_ignores_throttling_that_the_full_figure_counts():
    # From t=10 the fleet is accepted at the new quota (50 calls/s) but 2 of its 7 calls/s are throttled.
    samples, accepted, requests, throttled = [], 0, 0, 0
    for tenth in range(0, 201):
        t = tenth / 10
        calls, refused = (10, 0) if t <= 10 else (7, 2)
        accepted += (calls - refused) * fleet.EVENTS_PER_CALL
        requests += calls
        throttled += refused
        samples.append(sample(t, accepted, requests, throttled))
    assert fleet.reconvergence(samples, changed_at=10.0, until=20.0, quota=50.0) is None
    took = fleet.reconvergence(samples, changed_at=10.0, until=20.0, quota=50.0, max_throttled=None)
    assert took is not None and fleet.WINDOW <= took <= 1.2


def test_reconvergence_is_none_when_the_rate_never_settles_at_the_new_quota():
    samples = [sample(t / 10, 100 * 50 * t // 10, 100 * t // 10, 0) for t in range(0, 201)]
    assert fleet.reconvergence(samples, changed_at=10.0, until=20.0, quota=50.0) is None


def test_dctcp_experiment_cuts_by_half_the_throttled_fraction_it_has_seen():
    dctcp = fleet.Dctcp(10.0, now=0.0, interval=1.0, gain=0.5)
    for i in range(10):  # one call in five throttled, over one interval
        dctcp.observe(i % 5 == 0, now=0.1 * i)
    assert dctcp.alpha == 0.0  # the interval has not ended: no update yet
    dctcp.observe(False, now=1.0)
    assert dctcp.alpha == pytest.approx(0.5 * 2 / 11)
    assert dctcp.throttle(10.0, now=1.0) == pytest.approx(10.0 * (1 - dctcp.alpha / 2))


def test_limiter_counts_throttles_it_ignores_for_the_rate_in_the_fraction():
    clock = FakeClock(0.0)
    limiter = fleet.ratelimit.RateLimiter(10.0, 100.0, clock=clock)
    limiter._controller = dctcp = fleet.Dctcp(10.0, now=0.0, interval=1.0, gain=1.0)
    fleet.observe_answers(limiter, lambda throttled: dctcp.observe(throttled, clock()))
    sent = clock()
    clock.advance(0.5)
    limiter.on_throttle(sent)
    limiter.on_throttle(sent)  # sent before that decrease: no second cut, but a throttled call all the same
    limiter.on_success()
    clock.advance(0.5)
    limiter.on_success()
    assert dctcp.alpha == pytest.approx(2 / 4)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_quick_fleet_run_reports_every_column_with_sane_values(tmp_path):
    out = tmp_path / "fleet.json"
    trace = tmp_path / "trace.csv"
    run = subprocess.run([sys.executable, str(FLEET), "--quick", "--json", str(out), "--trace", str(trace)],
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    header = "| " + " | ".join(fleet.COLUMNS) + " |"
    assert header in run.stdout

    (result,) = json.loads(out.read_text())
    m = result["forwarders"]
    assert m == 4
    for column in fleet.COLUMNS:
        assert column in result, column
    assert 0 < result["goodput"] < 2  # accepted / quota; a little above 1 from the bucket's burst
    assert 0 <= result["throttled"] <= 1
    assert 0 <= result["throttled_after"] <= 1
    assert 0 <= result["feed_rejected"] <= 1
    assert 1 / m - 1e-9 <= result["jain"] <= 1 + 1e-9
    for key in ("reconverge_down", "reconverge_up", "rate_down", "rate_up"):
        assert result[key] is None or fleet.WINDOW <= result[key] <= result["duration"], key
    assert result["fleet_cpu"] > 0 and result["emulator_cpu"] > 0
    rows = trace.read_text().splitlines()
    assert rows[0].startswith("controller,forwarders,t,key")
    assert {row.split(",")[3] for row in rows[1:]} == {f"fwd-{i}" for i in range(m)}
