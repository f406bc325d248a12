"""The shared process harness (forwarder.emulator.harness): a metric that is not there fails, it never reads as 0."""

from __future__ import annotations

import pytest

from forwarder.emulator.harness import parse_metric

EXPOSITION = """\
# HELP forwarder_events_sent_total Events delivered
# TYPE forwarder_events_sent_total counter
forwarder_events_sent_total 12.0
forwarder_retries_total{reason="throttled"} 3.0
"""


def test_a_series_is_read_by_name_and_by_labels():
    assert parse_metric(EXPOSITION, "forwarder_events_sent_total") == 12.0
    assert parse_metric(EXPOSITION, "forwarder_retries_total", 'reason="throttled"') == 3.0


@pytest.mark.parametrize(("name", "labels"), [
    ("forwarder_events_snet_total", ""),  # a typo must not read as "nothing sent"
    ("forwarder_retries_total", 'reason="timeout"'),  # a label value never incremented
    ("forwarder_retries_total", ""),  # labelled series only
])
def test_a_series_that_does_not_exist_fails_naming_it_instead_of_reading_zero(name, labels):
    with pytest.raises(AssertionError, match=f"no series {name}"):
        parse_metric(EXPOSITION, name, labels)
