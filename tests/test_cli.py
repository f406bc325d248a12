"""The command line as a user meets it: configuration mistakes are one line naming the key, exit 2."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def forwarder(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forwarder", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def bad_file(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "forwarder.toml"
    path.write_bytes(content)
    return str(path)


CASES = {
    "a section that is not a table": (lambda t: bad_file(t, b"batch = 5\n"), {}, "[batch] must be a table"),
    "a directory as the config": (lambda t: str(t), {}, "is a directory"),
    "invalid UTF-8": (lambda t: bad_file(t, b"[log]\nlevel = \"info\xff\"\n"), {}, "is not UTF-8"),
    "a syntax error": (lambda t: bad_file(t, b"[batch\n"), {}, "is not valid TOML"),
    "an unknown section in a variable": (lambda t: None, {"FORWARDER_BATC__MAX_EVENTS": "3"},
                                         "FORWARDER_BATC__MAX_EVENTS names no section"),
    "a bad value in a variable": (lambda t: None, {"FORWARDER_BATCH__MAX_EVENTS": "80"},
                                  "(set by FORWARDER_BATCH__MAX_EVENTS)"),
    "an infinite timeout": (lambda t: bad_file(t, b"[evidently]\nrequest_timeout = inf\n"), {},
                            "evidently.request_timeout must be a finite number"),
    "an infinite max_elapsed": (lambda t: bad_file(t, b"[retry]\nmax_elapsed = inf\n"), {},
                                "retry.max_elapsed must be a finite number"),
    "a rate below the floor": (lambda t: bad_file(t, b"[evidently]\nmax_rate = 1e-9\n"), {},
                               "evidently.max_rate must be 0"),
    "an empty host": (lambda t: bad_file(t, b"[intake]\nhost = \"\"\n"), {}, "intake.host must not be empty"),
}


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_configuration_mistake_is_one_line_naming_it_and_exit_2(tmp_path, command, case):
    make, env, message = case
    path = make(tmp_path)
    done = forwarder(command, *(["--config", path] if path else []), env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_replay_of_a_missing_file_is_one_line_and_exit_2(tmp_path):
    done = forwarder("replay", str(tmp_path / "nope.ndjson"))
    assert done.returncode == 2
    assert done.stderr.startswith("forwarder replay: cannot read") and "Traceback" not in done.stderr


# --- every command: expected failures are one line, exit 2 -------------------------------------------------


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_every_command_on_a_busy_port_is_one_line_and_exit_2_without_draining_or_stopped(tmp_path, busy_port):
    state = {"FORWARDER_BUFFER__PATH": str(tmp_path), "FORWARDER_DEAD_LETTER__PATH": str(tmp_path / "dl.ndjson"),
             "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "XDG_STATE_HOME": str(tmp_path)}
    for args in (["run"], ["dev", "--port", str(busy_port)], ["dev", "--emulator-port", str(busy_port), "--port", "0"],
                 ["emulator", "--port", str(busy_port)]):
        done = forwarder(*args, env={**state, "FORWARDER_INTAKE__PORT": str(busy_port)})
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "address already in use" in done.stderr.lower(), (args, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout
        assert "draining" not in done.stdout + done.stderr and "stopped" not in done.stdout + done.stderr


@pytest.mark.parametrize("args", [["run", "--config"], ["check-config", "--config"], ["healthcheck", "--config"],
                                  ["replay", "--config"], ["replay"]])
def test_every_command_given_a_missing_file_is_one_line_and_exit_2(tmp_path, args):
    done = forwarder(*args, str(tmp_path / "missing"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert str(tmp_path / "missing") in done.stderr and "Traceback" not in done.stderr


def test_help_has_text_for_every_option_and_no_rst_markup():
    from forwarder.cli import build_parser
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text, name
        for action in sub._actions:
            assert action.help, f"forwarder {name} {action.option_strings or action.dest} has no help text"
    assert "``" not in parser.format_help()
    dev_help = forwarder("dev", "--help").stdout
    assert "(default: 8080)" in dev_help and "(default: 8081)" in dev_help and "XDG_STATE_HOME" in dev_help


def test_version_names_the_evidently_model_package():
    done = forwarder("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("forwarder ") and "botocore-a-la-carte-evidently 1." in done.stdout


def test_dev_state_goes_to_the_xdg_state_directory_not_the_working_tree(tmp_path, monkeypatch):
    from forwarder.cli import default_state_dir
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_state_dir() == str(tmp_path / "state" / "forwarder" / "dev")
    monkeypatch.setenv("XDG_STATE_HOME", "relative")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == str(tmp_path / "home" / ".local" / "state" / "forwarder" / "dev")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == str(tmp_path / "home" / ".local" / "state" / "forwarder" / "dev")


def test_replay_dry_run_prints_what_would_be_sent_per_project_and_error_code(tmp_path):
    from forwarder.delivery.deadletter import lines
    path = tmp_path / "dead-letter.ndjson"
    event = b'{"data":"{}","timestamp":1,"type":"aws.evidently.custom"}'
    path.write_bytes(lines("checkout", [event, event], "ThrottlingException", "slow", 3, 1.0, 2.0)
                     + lines("search", [event], "ValidationException", "bad", 1, 1.0, 1.0))
    done = forwarder("replay", str(path), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"would send 3 events from {path}; unreadable lines 0",
        "  per project:", "           2  checkout", "           1  search",
        "  per error code:", "           2  ThrottlingException", "           1  ValidationException",
    ]
    assert not (tmp_path / "dead-letter.ndjson.replayed").exists()


def test_replay_takes_address_auth_limits_and_file_from_the_forwarder_config_unless_given(tmp_path):
    from forwarder.cli import _replay_settings, build_parser
    config = tmp_path / "forwarder.toml"
    config.write_text(f"""
[intake]
port = -1
unix_socket = "{tmp_path}/intake.sock"
auth = "token"
token_file = "{tmp_path}/tokens"
max_body_bytes = 65536
max_events_per_request = 100
[evidently]
region = "eu-west-1"
[dead_letter]
path = "{tmp_path}/dl.ndjson"
""")
    settings = _replay_settings(build_parser().parse_args(["replay", "--config", str(config)]))
    assert settings == {"file": f"{tmp_path}/dl.ndjson", "intake": f"unix://{tmp_path}/intake.sock", "auth": "token",
                        "token_file": f"{tmp_path}/tokens", "region": "eu-west-1", "max_body_bytes": 65536,
                        "max_events": 100}
    given = _replay_settings(build_parser().parse_args(
        ["replay", "other.ndjson", "--config", str(config), "--intake", "https://central:8080", "--auth", "sigv4",
         "--max-events", "7"]))
    assert (given["file"], given["intake"], given["auth"], given["max_events"]) == (
        "other.ndjson", "https://central:8080", "sigv4", 7)
