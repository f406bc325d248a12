"""Decoding datagrams (pure): each malformed class and its reason, project routing, NDJSON, the fast path."""

from __future__ import annotations

import json

import orjson
import pytest

from forwarder.intake.datagram.decode import DatagramDecoder
from forwarder.evidently.events import encode_all

NOW = 1_790_000_000.0


class Rejections(list):
    def __call__(self, reason: str, n: int, message: str) -> None:
        self.append((reason, n, message))

    @property
    def reasons(self) -> list[str]:
        return [r for r, _, _ in self]


def decode(datagrams: list[bytes], default: str = "") -> tuple[dict[str, list[dict]], Rejections, int]:
    rejected = Rejections()
    into: dict[str, list[bytes]] = {}
    n = DatagramDecoder(default, rejected).decode_all(datagrams, NOW, into)
    return {p: [orjson.loads(e) for e in evs] for p, evs in into.items()}, rejected, n


def wire(data: dict, **fields) -> bytes:
    return orjson.dumps({**fields, "data": orjson.dumps(data).decode()})


@pytest.mark.parametrize("datagram, reason, says", [
    (b"hello", "not_json", "not JSON"),
    (b"", "not_json", "not JSON"),
    (b'{"project": "p", "data": {"a": 1}} trailing', "not_json", "not JSON"),
    (b'{"project": "p", "data": {"user": "u1", "val', "truncated", "ends before it is complete"),
    (b'{"project": "p", "data": "{}"', "truncated", "ends before it is complete"),
    (b'{"project": "p", "data": 5}', "invalid_event", "data must be a JSON object"),
    (b'{"project": "p", "data": {}, "colour": "red"}', "invalid_event", "unknown field 'colour'"),
    (b'{"project": "p", "data": {}, "timestamp": 1e15}', "invalid_event", "timestamp"),
    (b'{"project": "p", "data": {}, "type": "aws.evidently.other"}', "invalid_event", "type must be one of"),
    (b'[{"project": "p", "data": {}}]', "invalid_event", "must be a JSON object"),
    (b'{"data": {"a": 1}}', "missing_project", "evidently.default_project is not set"),
    (b'{"project": "a/b", "data": {"a": 1}}', "invalid_project", "must match"),
    (b'{"project": 7, "data": {"a": 1}}', "invalid_project", "must be a string"),
    (b'{"project": "", "data": {"a": 1}}', "invalid_project", "must not be empty"),
])
def test_each_malformed_datagram_is_refused_with_its_reason_and_a_message(datagram, reason, says):
    events, rejected, n = decode([datagram])
    assert (events, n) == ({}, 0)
    assert rejected.reasons == [reason]
    assert says in rejected[0][2]


def test_a_malformed_datagram_costs_only_itself_among_the_datagrams_of_a_wake_up():
    good = [wire({"i": i}, project="p") for i in range(3)]
    events, rejected, n = decode([good[0], b"{oops", good[1], wire({"i": 9}, project="a/b"), good[2]])
    assert n == 3 and [e["data"] for e in events["p"]] == ['{"i":0}', '{"i":1}', '{"i":2}']
    assert rejected.reasons == ["not_json", "invalid_project"]


def test_events_go_to_their_own_project_or_to_the_default_one():
    events, rejected, n = decode([
        wire({"i": 1}, project="alpha"),
        orjson.dumps({"data": {"i": 2}, "project": "arn:aws:evidently:us-east-1:123456789012:project/beta"}),
        wire({"i": 3}),
        orjson.dumps({"data": {"i": 4}}),
    ], default="dflt")
    assert not rejected and n == 4
    assert {p: [e["data"] for e in evs] for p, evs in events.items()} == {
        "alpha": ['{"i":1}'],
        "arn:aws:evidently:us-east-1:123456789012:project/beta": ['{"i":2}'],
        "dflt": ['{"i":3}', '{"i":4}'],
    }


def test_an_ndjson_datagram_carries_several_events_and_a_bad_line_costs_only_itself():
    lines = [orjson.dumps({"project": "p", "data": {"i": 1}}), b"", b'{"project": "q", "data": {"i": 2}}',
             b"not json", orjson.dumps({"project": "p", "data": {"i": 3}, "timestamp": 1_700_000_000})]
    events, rejected, n = decode([b"\n".join(lines) + b"\n"])
    assert n == 3
    assert [e["data"] for e in events["p"]] == ['{"i":1}', '{"i":3}']
    assert [e["data"] for e in events["q"]] == ['{"i":2}']
    assert events["p"][1]["timestamp"] == 1_700_000_000
    assert rejected == [("not_json", 1, rejected[0][2])] and rejected[0][2].startswith("line 4: not JSON")


def test_an_event_without_a_timestamp_is_stamped_with_the_time_it_was_received():
    events, _, _ = decode([wire({"i": 1}, project="p"), orjson.dumps({"project": "p", "data": {"i": 2}})])
    assert [e["timestamp"] for e in events["p"]] == [NOW, NOW]


@pytest.mark.parametrize("encode", [
    lambda e: orjson.dumps(e),
    lambda e: json.dumps(e).encode(),  # Python's separators: '": "' and '", "'
    lambda e: json.dumps(e, indent=1).encode(),  # not the fast path's prefix: the general path
    lambda e: orjson.dumps(e) + b"\n",
])
def test_fast_and_general_paths_encode_the_same_bytes_as_the_http_intake(encode):
    raw = [{"project": "p", "data": orjson.dumps({"user": f"u{i}"}).decode(), "timestamp": 1_700_000_000 + i,
            "type": "aws.evidently.evaluation"} for i in range(5)]
    rejected = Rejections()
    into: dict[str, list[bytes]] = {}
    assert DatagramDecoder("", rejected).decode_all([encode(e) for e in raw], NOW, into) == 5
    expected, errors = encode_all([{k: v for k, v in e.items() if k != "project"} for e in raw], NOW)
    assert not rejected and not errors and into == {"p": expected}


def test_a_datagram_holding_two_objects_is_refused_even_when_its_neighbours_would_make_the_batch_split_evenly():
    # Joined with commas, "{...},{...}" and the two halves of one event would make
    # three events out of three datagrams: each datagram must be one event by itself.
    two = b'{"data": "{}"},{"data": "{}"}'
    first_half = b'{"data": "{\\"a\\":\\"'
    second_half = b'{\\"}"}'
    joined = orjson.loads(b"[" + b",".join([two, first_half, second_half]) + b"]")
    assert len(joined) == 3  # the trap is real
    events, rejected, n = decode([two, first_half, second_half], default="p")
    assert (events, n) == ({}, 0)
    assert rejected.reasons == ["not_json", "truncated", "not_json"]


def test_a_project_named_with_escapes_or_twice_takes_the_general_path_and_the_last_name_wins():
    escaped = b'{"project": "\\u0070", "data": "{}"}'  # "p", spelled with an escape
    twice = b'{"project": "a", "project": "b", "data": "{}"}'
    events, rejected, n = decode([escaped, twice])
    assert not rejected and n == 2
    assert {p: len(evs) for p, evs in events.items()} == {"p": 1, "b": 1}


def test_an_event_for_an_arn_in_a_region_not_served_is_refused_naming_both_regions_on_either_path():
    here = "arn:aws:evidently:eu-west-1:123456789012:project/shop"
    there = "arn:aws:evidently:us-east-1:123456789012:project/shop"
    datagrams = [orjson.dumps({"project": p, "data": {"i": i}}) for i, p in enumerate((here, there))]
    datagrams.append(b'{"data": {"i": 2}, "project": "%s"}' % there.encode())  # the general path
    rejected = Rejections()
    into: dict[str, list[bytes]] = {}
    n = DatagramDecoder("", rejected, region="eu-west-1").decode_all(datagrams, NOW, into)
    assert n == 1 and list(into) == [here]
    assert rejected.reasons == ["wrong_region", "wrong_region"]
    assert all("'us-east-1'" in message and "'eu-west-1'" in message for _, _, message in rejected)
