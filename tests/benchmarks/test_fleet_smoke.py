"""The fleet simulation (python -m benchmarks.fleet) runs and reports sane figures.

No timing targets are asserted here: a 2-core CI machine measures its own
noise. The targets and the figures live in docs/scaling.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.fleet import analysis, controllers, report
from benchmarks.fleet.runner import forwarder_config, parse_args
from forwarder.config import ConfigError, from_dict
from forwarder.delivery.rate import SHIPPED_CONTROLLERS, RateLimiter
from tests.fakes import FakeClock

ROOT = Path(__file__).resolve().parents[2]


def sample(t: float, accepted: int, requests: int, throttled: int) -> analysis.Sample:
    return analysis.Sample(t, {"fwd-0": accepted}, {"fwd-0": requests}, {"fwd-0": throttled})


def test_jain_index_is_one_when_fair_and_one_over_n_when_one_forwarder_takes_all():
    assert analysis.jain([5.0, 5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert analysis.jain([8.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert analysis.jain([0.0, 0.0]) == 0.0


def test_reconvergence_is_the_end_of_the_first_window_at_the_new_quota_that_holds():
    # 100 calls/s until t=10, then 50 calls/s (the new quota) with no throttling from t=12.
    samples, accepted, requests, throttled = [], 0, 0, 0
    for tenth in range(0, 201):
        t = tenth / 10
        calls = 10 if t <= 10 else (8 if t <= 12 else 5)
        refused = 0 if t <= 10 or t > 12 else 3
        accepted += (calls - refused) * analysis.EVENTS_PER_CALL
        requests += calls
        throttled += refused
        samples.append(sample(t, accepted, requests, throttled))
    took = analysis.reconvergence(samples, changed_at=10.0, until=20.0, quota=50.0)
    assert took is not None and 2.0 <= took <= 3.2


def test_reconvergence_of_the_rate_alone_ignores_throttling_that_the_full_figure_counts():
    # From t=10 the fleet is accepted at the new quota (50 calls/s) but 2 of its 7 calls/s are throttled.
    samples, accepted, requests, throttled = [], 0, 0, 0
    for tenth in range(0, 201):
        t = tenth / 10
        calls, refused = (10, 0) if t <= 10 else (7, 2)
        accepted += (calls - refused) * analysis.EVENTS_PER_CALL
        requests += calls
        throttled += refused
        samples.append(sample(t, accepted, requests, throttled))
    assert analysis.reconvergence(samples, changed_at=10.0, until=20.0, quota=50.0) is None
    took = analysis.reconvergence(samples, changed_at=10.0, until=20.0, quota=50.0, max_throttled=None)
    assert took is not None and analysis.WINDOW <= took <= 1.2


def test_reconvergence_is_none_when_the_rate_never_settles_at_the_new_quota():
    samples = [sample(t / 10, 100 * 50 * t // 10, 100 * t // 10, 0) for t in range(0, 201)]
    assert analysis.reconvergence(samples, changed_at=10.0, until=20.0, quota=50.0) is None


def test_dctcp_experiment_cuts_by_half_the_throttled_fraction_of_the_answers_it_saw():
    dctcp = controllers.Dctcp(10.0, now=0.0, interval=1.0, gain=0.5)
    for i in range(10):  # one answer in five a throttle, over one interval
        if i % 5 == 0:
            dctcp.throttle(10.0, now=0.1 * i)
        else:
            dctcp.success(now=0.1 * i)
    assert dctcp.alpha == 0.0  # the interval has not ended: no update yet
    dctcp.success(now=1.0)
    assert dctcp.alpha == pytest.approx(0.5 * 2 / 11)
    assert dctcp.throttle(10.0, now=1.0) == pytest.approx(10.0 * (1 - dctcp.alpha / 2))


def test_aimd_adds_per_second_and_multiplies_down():
    aimd = controllers.Aimd(10.0, now=0.0, increase=2.0, beta=0.5)
    assert aimd.success(now=1.5) == pytest.approx(13.0)
    assert aimd.throttle(13.0, now=1.5) == pytest.approx(6.5)


def test_experiments_reach_the_limiter_through_the_controllers_the_fleet_passes_in(tmp_path):
    args = parse_args(["--controller", "cubic", "scaled", "dctcp", "--cubic-c", "0.1", "--cubic-k-min", "3",
                       "--scaled-beta", "0.7"])
    cut_to, factories = {}, {}
    for controller in args.controller:
        name, factory = controllers.controller_for(controller, args)
        config = forwarder_config(0, "http://127.0.0.1:9", args, 250.0, tmp_path, name, {name: factory})
        limiter = RateLimiter(10.0, 100.0, factory, clock=FakeClock(0.0))
        limiter.on_throttle(sent_at=0.0)
        cut_to[config.evidently.rate_controller] = limiter.rate
        factories[name] = factory

    assert cut_to == {
        "cubic[c=0.1,beta=0.7,ref_rate=0,target=0,weight=0.05,k_min=3,k_calls=0]": pytest.approx(7.0),
        "scaled[growth=0.08,beta=0.7,tau=20]": pytest.approx(3.0),  # the shipped scaled cuts to 6
        "dctcp": pytest.approx(10.0),  # alpha is still 0: no throttled fraction seen yet
    }
    gentle, shipped = factories[next(iter(cut_to))](10.0, 100.0, 0.0), SHIPPED_CONTROLLERS["cubic"](10.0, 100.0, 0.0)
    for ctl in (gentle, shipped):
        ctl.throttle(10.0, now=0.0)
    assert gentle.success(now=1.5) < shipped.success(now=1.5)  # C = 0.1 and K >= 3 s probe more gently
    assert controllers.controller_for("cubic", parse_args([])) == ("cubic", SHIPPED_CONTROLLERS["cubic"])


@pytest.mark.parametrize("name", ["aimd", "dctcp"])
def test_the_fleet_s_controllers_do_not_pass_production_validation(name):
    assert name in controllers.FLEET_CONTROLLERS  # imported, and still unknown to a production configuration
    with pytest.raises(ConfigError, match="evidently.rate_controller must be one of 'cubic', 'scaled'"):
        from_dict({"evidently": {"rate_controller": name}}, {})


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_quick_fleet_run_reports_every_column_with_sane_values(tmp_path):
    out = tmp_path / "fleet.json"
    trace = tmp_path / "trace.csv"
    run = subprocess.run([sys.executable, "-m", "benchmarks.fleet", "--quick", "--json", str(out), "--trace",
                          str(trace)], capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    header = "| " + " | ".join(report.COLUMNS) + " |"
    assert header in run.stdout

    (result,) = json.loads(out.read_text())
    m = result["forwarders"]
    assert m == 4
    for column in report.COLUMNS:
        assert column in result, column
    assert 0 < result["goodput"] < 2  # accepted / quota; a little above 1 from the bucket's burst
    assert 0 <= result["throttled"] <= 1
    assert 0 <= result["throttled_after"] <= 1
    assert 0 <= result["feed_rejected"] <= 1
    assert 1 / m - 1e-9 <= result["jain"] <= 1 + 1e-9
    for key in ("reconverge_down", "reconverge_up", "rate_down", "rate_up"):
        assert result[key] is None or analysis.WINDOW <= result[key] <= result["duration"], key
    assert result["fleet_cpu"] > 0 and result["emulator_cpu"] > 0
    rows = trace.read_text().splitlines()
    assert rows[0].startswith("controller,forwarders,t,key")
    assert {row.split(",")[3] for row in rows[1:]} == {f"fwd-{i}" for i in range(m)}
