from __future__ import annotations

import math

import orjson
import pytest

from forwarder.events import EventError, encode_all, encode_event, ndjson_events, request_events

NOW = 1_790_000_000.5


def decoded(event, now=NOW):
    return orjson.loads(encode_event(event, 0, now))


def test_object_data_is_sent_as_its_compact_json_string():
    assert decoded({"data": {"a": 1, "b": [1, 2]}}) == {
        "data": '{"a":1,"b":[1,2]}', "timestamp": NOW, "type": "aws.evidently.custom"}


def test_string_data_holding_an_object_is_kept_verbatim():
    assert decoded({"data": '{ "a" : 1 }', "type": "aws.evidently.evaluation", "timestamp": 5})["data"] == '{ "a" : 1 }'


@pytest.mark.parametrize("timestamp, expected", [
    (1_700_000_000, 1_700_000_000),
    (1_700_000_000.25, 1_700_000_000.25),
    ("2026-11-26T12:00:00Z", 1_795_694_400.0),
    ("2026-11-26T13:00:00.5+01:00", 1_795_694_400.5),
])
def test_timestamps_are_epoch_seconds_or_rfc3339(timestamp, expected):
    assert decoded({"data": {}, "timestamp": timestamp})["timestamp"] == expected


@pytest.mark.parametrize("event, field", [
    ("nope", "events[0] must be a JSON object"),
    ({}, "events[0].data is required"),
    ({"data": [1]}, "events[0].data must be a JSON object or a string holding one"),
    ({"data": "[1]"}, "events[0].data must be a JSON object or a string holding one"),
    ({"data": "{not json"}, "events[0].data must be a JSON object or a string holding one"),
    ({"data": {}, "type": "aws.evidently.other"}, "events[0].type must be one of"),
    ({"data": {}, "timestamp": True}, "events[0].timestamp must be epoch seconds or an RFC 3339"),
    ({"data": {}, "timestamp": -1}, "events[0].timestamp must be epoch seconds between"),
    ({"data": {}, "timestamp": 1_700_000_000_000}, "events[0].timestamp must be epoch seconds between"),
    ({"data": {}, "timestamp": math.nan}, "events[0].timestamp must be epoch seconds between"),
    ({"data": {}, "timestamp": "2026-11-26 12:00"}, "is not an RFC 3339 date-time with an offset"),
    ({"data": {}, "timestamp": "2026-11-26T12:00:00"}, "is not an RFC 3339 date-time with an offset"),
    ({"data": {}, "timeStamp": 1}, "events[0] has unknown field 'timeStamp'"),
])
def test_bad_events_are_refused_naming_the_field(event, field):
    with pytest.raises(EventError) as err:
        encode_event(event, 0, NOW)
    assert field in str(err.value)


def test_one_bad_event_does_not_cost_the_others_and_keeps_its_index():
    encoded, errors = encode_all([{"data": {"i": 0}}, {"data": 3}, {"data": {"i": 2}}], NOW)
    assert [orjson.loads(orjson.loads(e)["data"])["i"] for e in encoded] == [0, 2]
    assert errors == [(1, "events[1].data must be a JSON object or a string holding one")]


def test_request_body_must_hold_an_events_list():
    assert request_events({"events": []}) == []
    for body, message in [([], "must be a JSON object"), ({}, "events is required"),
                          ({"events": {}}, "events is required"), ({"events": [], "x": 1}, "unknown field 'x'")]:
        with pytest.raises(EventError, match=message):
            request_events(body)


def test_ndjson_keeps_malformed_lines_as_errors_in_place():
    events = ndjson_events(b'{"data":{"a":1}}\n\n{broken\n{"data":{"a":3}}\n')
    encoded, errors = encode_all(events, NOW)
    assert len(encoded) == 2
    assert errors[0][0] == 1 and "events[1] is not valid JSON" in errors[0][1]
