from __future__ import annotations

import math
from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.evidently.events import (EventError, encode_all, encode_event, encode_wire_body, ndjson_events,
                                       ndjson_lines, request_events)

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


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_events = st.fixed_dictionaries({}, optional={
    "data": st.one_of(
        st.dictionaries(st.text(max_size=5), _json_values, max_size=3).map(lambda d: orjson.dumps(d).decode()),
        st.dictionaries(st.text(max_size=5), _json_values, max_size=3),
        st.text(max_size=12), _json_values),
    "timestamp": st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                           st.just("2026-11-26T12:00:00Z"), st.text(max_size=5)),
    "type": st.sampled_from(["aws.evidently.custom", "aws.evidently.evaluation", "other", 3]),
    "extra": st.integers(),
})


@settings(max_examples=400, deadline=None)
@given(st.lists(_events, max_size=6))
def test_the_inline_fast_path_accepts_and_encodes_exactly_what_encode_event_does(events):
    encoded, errors = encode_all(events, 1_790_000_000.0)
    expected, expected_errors = [], []
    for i, event in enumerate(events):
        try:
            expected.append(orjson.loads(encode_event(event, i, 1_790_000_000.0)))
        except EventError as e:
            expected_errors.append((i, str(e)))
    assert [orjson.loads(e) for e in encoded] == expected
    assert errors == expected_errors


_wire_events = st.fixed_dictionaries({"data": st.one_of(
    st.dictionaries(st.text(max_size=5), _json_values, max_size=3).map(lambda d: orjson.dumps(d).decode()),
    st.dictionaries(st.text(max_size=5), _json_values, max_size=3).map(lambda d: " " + orjson.dumps(d).decode()),
    st.sampled_from(['{"a":"', '"},{"b":1}', "{}", '{"x":1}}', "[1]", '{"a":"}', "{", '{"é":1}']))},
    optional={"timestamp": st.one_of(st.integers(-5, 10**12), st.floats(min_value=-1, max_value=2e11),
                                     st.just("2026-11-26T12:00:00+01:00"), st.just("soon"), st.booleans()),
              "type": st.sampled_from(["aws.evidently.custom", "aws.evidently.evaluation", "other"])})


@settings(max_examples=500, deadline=None)
@given(st.lists(_wire_events, max_size=6))
def test_the_msgspec_fast_path_takes_only_bodies_the_general_path_accepts_whole(events):
    body = orjson.dumps({"events": events})
    fast = encode_wire_body(body, 1_790_000_000.0)
    encoded, errors = encode_all(request_events(orjson.loads(body)), 1_790_000_000.0)
    if fast is None:
        return  # the general path answers (and names what is wrong)
    assert errors == []
    assert [orjson.loads(e) for e in fast] == [orjson.loads(e) for e in encoded]


def test_data_strings_that_are_only_valid_when_joined_take_the_general_path():
    # '{"a":"' + ',' + '"},{"b":1}' parses as two objects when joined, yet neither string is one.
    body = orjson.dumps({"events": [{"data": '{"a":"'}, {"data": '"},{"b":1}'}]})
    assert encode_wire_body(body, 1.0) is None
    assert [i for i, _ in encode_all(request_events(orjson.loads(body)), 1.0)[1]] == [0, 1]


def test_a_valid_wire_body_takes_the_fast_path_with_defaults_filled_in():
    body = orjson.dumps({"events": [{"data": '{"a":1}'}, {"data": "{}", "timestamp": "2026-11-26T12:00:00Z",
                                                             "type": "aws.evidently.evaluation"}]})
    fast = encode_wire_body(body, 1_790_000_000.5)
    assert [orjson.loads(e) for e in fast] == [
        {"data": '{"a":1}', "timestamp": 1_790_000_000.5, "type": "aws.evidently.custom"},
        {"data": "{}", "timestamp": datetime(2026, 11, 26, 12, tzinfo=timezone.utc).timestamp(),
         "type": "aws.evidently.evaluation"}]


def test_ndjson_lines_numbers_every_line_skips_blank_ones_and_keeps_a_malformed_one_in_place():
    lines = list(ndjson_lines(b'{"a":1}\n\n  \n{"b":\n[2]\r\n'))
    assert [(number, line) for number, line, _ in lines] == [(1, b'{"a":1}'), (4, b'{"b":'), (5, b"[2]")]
    assert lines[0][2] == {"a": 1} and lines[2][2] == [2]
    assert isinstance(lines[1][2], orjson.JSONDecodeError)
