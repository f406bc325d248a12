from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from forwarder import config as config_mod
from forwarder.config import ConfigError, changed_keys, from_dict, load, region_quota


def test_defaults_match_the_documented_example_file():
    assert load("config.example.toml") == from_dict({})


@pytest.mark.parametrize("raw, message", [
    ({"batch": {"max_events": 80}}, "batch.max_events must be between 1 and 50, got 80"),
    ({"batch": {"max_evnts": 5}}, "unknown key batch.max_evnts"),
    ({"batc": {}}, "unknown section [batc]"),
    ({"intake": {"port": "8080"}}, "intake.port must be an integer, got '8080'"),
    ({"batch": {"flush_interval": 0}}, "batch.flush_interval must be between 0 (exclusive)"),
    ({"buffer": {"type": "redis"}}, "buffer.type must be one of 'memory', 'disk', got 'redis'"),
    ({"buffer": {"when_full": "block"}}, "buffer.when_full must be one of"),
    ({"evidently": {"endpoint_url": "localhost:1"}}, "evidently.endpoint_url must start with http://"),
    ({"evidently": {"default_project": "a/b"}}, "evidently.default_project is invalid"),
    ({"evidently": {"initial_rate": 50.0, "max_rate": 10.0}}, "evidently.initial_rate (50.0) must not exceed"),
    ({"retry": {"initial_backoff": 2.0, "max_backoff": 1.0}}, "retry.max_backoff must be at least"),
    ({"log": {"format": "xml"}}, "log.format must be one of"),
])
def test_invalid_values_are_refused_with_the_key_named(raw, message):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert message in str(err.value)


def test_environment_overrides_the_file_and_is_type_checked():
    cfg = from_dict({"evidently": {"region": "us-east-1"}},
                    {"FORWARDER_EVIDENTLY__REGION": "eu-central-1", "FORWARDER_BATCH__FLUSH_INTERVAL": "0.5"})
    assert cfg.evidently.region == "eu-central-1"
    assert cfg.batch.flush_interval == 0.5
    with pytest.raises(ConfigError, match="batch.max_events must be an integer"):
        from_dict({}, {"FORWARDER_BATCH__MAX_EVENTS": "many"})
    with pytest.raises(ConfigError, match="FORWARDER_BATCH__NOPE names no key"):
        from_dict({}, {"FORWARDER_BATCH__NOPE": "1"})


def test_max_rate_defaults_to_the_regions_published_quota():
    assert from_dict({}).evidently.effective_max_rate == 1000.0
    assert from_dict({"evidently": {"region": "ap-south-1"}}).evidently.effective_max_rate == 200.0
    assert region_quota("eu-west-1") == 1000.0
    assert from_dict({"evidently": {"max_rate": 40.0}}).evidently.effective_initial_rate == 4.0


def test_integers_are_accepted_where_seconds_are_floats():
    assert from_dict({"retry": {"max_elapsed": 30}}).retry.max_elapsed == 30.0


def test_missing_or_broken_file_is_reported_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[batch\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load(bad)


def test_printed_configuration_loads_back_to_the_same_values(tmp_path):
    cfg = from_dict({"evidently": {"default_project": "demo", "endpoint_url": "http://127.0.0.1:1"}},
                    {"FORWARDER_LOG__LEVEL": "debug", "FORWARDER_BATCH__FLUSH_INTERVAL": "0.25"})
    path = tmp_path / "round.toml"
    path.write_text(config_mod.to_toml(cfg))
    assert load(path, {}) == cfg


def test_changed_keys_lists_dotted_names():
    a = from_dict({})
    b = from_dict({"batch": {"flush_interval": 2.0}, "intake": {"port": 9}})
    assert changed_keys(a, b) == ["intake.port", "batch.flush_interval"]


def test_the_rate_controller_is_cubic_by_default_and_checked_by_name():
    assert from_dict({}, {}).evidently.rate_controller == "cubic"
    assert from_dict({"evidently": {"rate_controller": "scaled"}}, {}).evidently.rate_controller == "scaled"
    with pytest.raises(ConfigError, match="evidently.rate_controller"):
        from_dict({"evidently": {"rate_controller": "fast"}}, {})


@pytest.mark.parametrize("raw, message", [
    ({"batch": 5}, "[batch] must be a table of keys, got batch = 5"),
    ({"evidently": {"request_timeout": float("inf")}}, "evidently.request_timeout must be a finite number"),
    ({"retry": {"max_elapsed": float("inf")}}, "retry.max_elapsed must be a finite number"),
    ({"batch": {"flush_interval": float("nan")}}, "batch.flush_interval must be a finite number"),
    ({"shutdown": {"drain_timeout": float("inf")}}, "shutdown.drain_timeout must be a finite number"),
    ({"evidently": {"max_rate": 1e-9}}, "evidently.max_rate must be 0 (the default) or at least 0.5"),
    ({"evidently": {"initial_rate": 0.1}}, "evidently.initial_rate must be 0 (the default) or at least 0.5"),
    ({"intake": {"host": ""}}, "intake.host must not be empty"),
    ({"intake": {"host": "  "}}, "intake.host must not be empty"),
])
def test_values_that_would_misbehave_silently_are_refused_with_the_key_named(raw, message):
    with pytest.raises(ConfigError) as err:
        from_dict(raw, {})
    assert message in str(err.value)


@pytest.mark.parametrize("environ, message", [
    ({"FORWARDER_BATC__MAX_EVENTS": "3"}, "environment variable FORWARDER_BATC__MAX_EVENTS names no section"),
    ({"FORWARDER_BATCH__MAX_EVENTS": "many"}, "(set by FORWARDER_BATCH__MAX_EVENTS)"),
    ({"FORWARDER_BATCH__MAX_EVENTS": "80"}, "batch.max_events must be between 1 and 50, got 80 "
                                            "(set by FORWARDER_BATCH__MAX_EVENTS)"),
    ({"FORWARDER_RETRY__MAX_ELAPSED": "inf"}, "retry.max_elapsed must be a finite number"),
])
def test_environment_errors_name_the_variable(environ, message):
    with pytest.raises(ConfigError) as err:
        from_dict({}, environ)
    assert message in str(err.value)


def test_unrelated_forwarder_variables_are_left_alone():
    assert from_dict({}, {"FORWARDER_HOME": "/opt", "FORWARDER_VERSION": "1"}) == from_dict({}, {})


def test_a_file_that_cannot_be_read_as_toml_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[batch]\nmax_events = 5 # \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load(binary)


def test_the_live_marks_of_the_example_file_are_exactly_the_live_table():
    marked = set()
    section = ""
    for line in open("config.example.toml", encoding="utf-8"):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
        elif "=" in stripped and not stripped.startswith("#") and "(live)" in line:
            marked.add(f"{section}.{stripped.split('=')[0].strip()}")
    assert marked == set(live_keys())


def live_keys() -> dict[str, str]:
    """The daemon's table of live keys, built from what its stages declare."""
    from prometheus_client import CollectorRegistry

    from forwarder.app import Forwarder

    return Forwarder(from_dict({}, {}), registry=CollectorRegistry(), process_metrics=False).live_keys()


def test_a_reload_takes_the_given_keys_and_keeps_the_rest():
    old = from_dict({"batch": {"max_events": 50}, "intake": {"port": 8080}}, {})
    new = from_dict({"batch": {"max_events": 7}, "intake": {"port": 9090}, "evidently": {"max_rate": 20.0}}, {})
    merged = config_mod.merge_live(old, new, ["batch.max_events", "evidently.max_rate"])
    assert (merged.batch.max_events, merged.intake.port, merged.evidently.max_rate) == (7, 8080, 20.0)


def test_a_file_the_daemon_may_not_read_is_a_config_error(tmp_path, monkeypatch):
    # Root reads any file whatever its mode, so the refusal is the operating system's answer, staged.
    path = tmp_path / "secret.toml"
    path.write_text("[batch]\n")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr("forwarder.reading.os.open", refuse)
    with pytest.raises(ConfigError, match="cannot be read: permission denied"):
        load(path)


@pytest.mark.parametrize("raw, message", [
    ({"shutdown": {"drain_timeout": 1e308}}, "shutdown.drain_timeout must be between 0 and 3600 seconds, got 1e+308"),
    ({"retry": {"max_backoff": 1e300}}, "retry.max_backoff must be between 0.001 and 3600 seconds, got 1e+300"),
    ({"retry": {"initial_backoff": 0.0}}, "retry.initial_backoff must be between 0.001 and 3600 seconds, got 0.0"),
    ({"retry": {"max_elapsed": 1e9}}, "retry.max_elapsed must be between 0.001 and 604800 seconds, got 1000000000.0"),
    ({"evidently": {"request_timeout": 1e6}}, "evidently.request_timeout must be between 0.001 and 3600 seconds"),
    ({"evidently": {"max_rate": 1e12, "initial_rate": 1.0}},
     "evidently.max_rate must be between 0 and 1000000 requests/s, got 1000000000000.0"),
    ({"evidently": {"region": "../../etc"}}, "evidently.region must be an AWS region name such as us-east-1"),
    ({"evidently": {"region": "US-EAST-1"}}, "evidently.region must be an AWS region name"),
    ({"evidently": {"region": "us-east-1\n"}}, "evidently.region must be an AWS region name"),
    ({"intake": {"max_body_bytes": 2**40}}, "intake.max_body_bytes must be between 1024 and 1073741824 bytes"),
    ({"intake": {"max_connections": 10**9}}, "intake.max_connections must be between 1 and 1048576"),
    ({"intake": {"max_events_per_request": 10**9}}, "intake.max_events_per_request must be between 1 and 1000000"),
    ({"buffer": {"max_events": 10**12}}, "buffer.max_events must be between 1 and 1000000000"),
    ({"buffer": {"max_bytes": 2**50}}, "buffer.max_bytes must be between 1024 and 1099511627776 bytes"),
    ({"dead_letter": {"max_bytes": 2**50}}, "dead_letter.max_bytes must be between 4096 and 1099511627776 bytes"),
    ({"buffer": {"path": "/var/lib/\x00forwarder"}}, "buffer.path must not contain a NUL character"),
    ({"intake": {"unix_socket": "/tmp/" + "s" * 103}}, "intake.unix_socket must be at most 107 bytes long"),
    ({"intake": {"host": "x" * 100_000}}, "is not a loopback address"),
])
def test_numbers_and_names_out_of_their_sane_range_are_refused_with_the_bounds(raw, message):
    with pytest.raises(ConfigError) as err:
        from_dict(raw, {})
    assert message in str(err.value)
    assert len(str(err.value)) < 600  # a megabyte value is not echoed whole


@pytest.mark.parametrize("region", ["us-east-1", "eu-central-2", "us-gov-west-1", "cn-northwest-1", "ap-southeast-4",
                                    "il-central-1", "us-isob-east-1"])
def test_every_shape_of_aws_region_name_is_accepted(region):
    assert from_dict({"evidently": {"region": region}}, {}).evidently.region == region


@pytest.mark.parametrize("text", ["1_0", "\uff11\uff10", "\u0661\u0660", " 1 0", "0x10", "10.5"])
def test_an_integer_from_the_environment_must_be_ascii_digits(text):
    with pytest.raises(ConfigError) as err:
        from_dict({}, {"FORWARDER_BATCH__MAX_EVENTS": text})
    assert "batch.max_events must be an integer written in ASCII digits" in str(err.value)
    assert "(set by FORWARDER_BATCH__MAX_EVENTS)" in str(err.value)


@pytest.mark.parametrize("text", ["1_0.5", "\uff11\uff10", "1,5", "one"])
def test_a_number_from_the_environment_must_be_ascii_digits(text):
    with pytest.raises(ConfigError, match="batch.flush_interval must be a number written in ASCII digits"):
        from_dict({}, {"FORWARDER_BATCH__FLUSH_INTERVAL": text})


@pytest.mark.parametrize("text, value", [("10", 10.0), ("0.25", 0.25), (".5", 0.5), ("2e1", 20.0), ("+3", 3.0)])
def test_plain_numbers_from_the_environment_are_read(text, value):
    assert from_dict({}, {"FORWARDER_BATCH__FLUSH_INTERVAL": text}).batch.flush_interval == value


@pytest.mark.parametrize(("key", "kind"), [("unix_socket", socket.SOCK_STREAM), ("datagram_socket", socket.SOCK_DGRAM)])
def test_the_longest_unix_socket_path_check_config_allows_can_be_bound(tmp_path, key, kind):
    from forwarder.config import UNIX_PATH_MAX
    from forwarder.intake.unix_socket import bind_unix

    directory = str(tmp_path)
    longest = os.path.join(directory, "s" * (UNIX_PATH_MAX - len(directory) - 1))
    assert getattr(from_dict({"intake": {key: longest}}, {}).intake, key) == longest
    bind_unix(longest, 0o600, kind, f"intake.{key}").sock.close()
    with pytest.raises(ConfigError, match=f"intake.{key} must be at most {UNIX_PATH_MAX} bytes long"):
        from_dict({"intake": {key: longest + "s"}}, {})


@pytest.mark.parametrize("content, message", [
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nests arrays or inline tables too deeply"),
    ("x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "nests arrays or inline tables too deeply"),
    ("[batch]\n" + "#" * (2 << 20) + "\n", "is larger than 1 MiB"),
    ("[retry]\nmax_backoff = 1e300\n", "retry.max_backoff must be between 0.001 and 3600 seconds, got 1e+300"),
])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_no_configuration_file_makes_the_cli_print_more_than_one_line(tmp_path, content, message, command):
    path = tmp_path / "forwarder.toml"
    path.write_text(content)
    done = subprocess.run([sys.executable, "-m", "forwarder", command, "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_a_fifo_at_the_config_path_is_refused_on_reload_without_waiting_for_a_writer(tmp_path):
    path = tmp_path / "forwarder.toml"
    os.mkfifo(path)
    with pytest.raises(ConfigError, match="is not a regular file but a FIFO"):
        load(path, {}, regular_only=True)


@pytest.mark.parametrize("url, message", [
    ("http://[::1", "evidently.endpoint_url is not a URL (Invalid IPv6 URL)"),
    ("http://a b:1", "evidently.endpoint_url names an invalid host 'a b'"),
    ("http://", "evidently.endpoint_url names no host"),
    ("https://x:99999", "evidently.endpoint_url is not a URL (Port out of range 0-65535)"),
])
def test_an_endpoint_url_botocore_would_refuse_at_start_is_refused_by_the_configuration(url, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"evidently": {"endpoint_url": url}}, {})
    assert message in str(err.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8081", "http://[::1]:8081", "https://evidently.us-east-1.amazonaws.com",
                                 "http://localhost", "http://emulator.default.svc.cluster.local:8081/"])
def test_endpoint_urls_of_every_usual_shape_are_accepted(url):
    assert from_dict({"evidently": {"endpoint_url": url}}, {}).evidently.endpoint_url == url
