"""The command line as a user meets it: configuration mistakes are one line naming the key, exit 2."""

from __future__ import annotations

import os
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
